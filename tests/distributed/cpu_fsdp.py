"""FSDP2 on CPU processes, for tests: Accelerate switches FSDP on for GPU back-ends only (a gloo ``MULTI_CPU`` run
drops the plugin without a word). ``enable()`` makes the Trainer's Accelerator keep it, as it would on GPUs: the state
says FSDP and holds the plugin, so ``prepare`` shards the student with ``fully_shard`` over the gloo group."""

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_accelerator_init = accelerate.Accelerator.__init__


def _init(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.state.distributed_type == DistributedType.MULTI_CPU:
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = fsdp_plugin
        # Every later AcceleratorState() copies the process state over its own: keep the two in step.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def enable() -> None:
    accelerate.Accelerator.__init__ = _init  # the class transformers.Trainer instantiates
