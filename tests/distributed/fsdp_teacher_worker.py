"""FSDP2 teacher placement on 2 CPU processes: `torchrun --nproc_per_node 2 fsdp_teacher_worker.py OUT.json`.

Accelerate switches FSDP on for GPU back-ends only, so the worker hands ``prepare_teacher`` what an FSDP2
Accelerator holds (the plugin, over a gloo process group) and checks the placed teacher: sharded, frozen, in eval
mode, giving the unsharded teacher's logits, and sharded again after its forward.
"""

import json
import os
import sys
import types
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from accelerate.utils import FullyShardedDataParallelPlugin  # noqa: E402
from clean_exit import exit_cleanly  # noqa: E402
from conftest import DDP_TIMEOUT, tiny_gpt2  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from hf_kd.teachers import LiveTeacher, freeze, prepare_teacher  # noqa: E402


def main(output: str) -> None:
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=DDP_TIMEOUT))
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["GPT2Block"]
    )
    accelerator = types.SimpleNamespace(
        is_fsdp2=True,
        state=types.SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=None),
        torch_device_mesh=None,
        parallelism_config=None,
        mixed_precision="no",
        device=torch.device("cpu"),
        is_main_process=torch.distributed.get_rank() == 0,
    )
    teacher = freeze(tiny_gpt2(seed=1))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher(input_ids=ids).logits
    total = sum(p.numel() for p in teacher.parameters())
    placed = prepare_teacher(teacher, accelerator)
    logits = LiveTeacher(placed)({"input_ids": ids, "labels": ids}, frozenset({"logits"})).logits
    local = [p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in placed.parameters()]
    result = {
        "max_abs_difference": (logits - expected).abs().max().item(),
        "sharded_after_forward": all(isinstance(p, DTensor) for p in placed.parameters()),
        "local_fraction": sum(local) / total,
        "training": placed.training,
        "requires_grad": any(p.requires_grad for p in placed.parameters()),
    }
    if torch.distributed.get_rank() == 0:
        with open(output, "w") as handle:
            json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_cleanly()  # barrier, destroy_process_group, os._exit(0): see clean_exit.py
