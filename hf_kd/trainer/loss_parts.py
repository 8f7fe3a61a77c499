"""Learned parts of the losses (projectors, regressors, memory banks): sized from one batch, optimised beside the
student, checkpointed and resumed with it, never saved into it."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback, get_scheduler

from ..features import run_model
from ..losses import DistillationLoss
from ..positions import split_sample_index

LOSS_PARTS_NAME = "hf_kd_losses.safetensors"  # learned loss parts (projectors, banks) inside each checkpoint
LOSS_OPTIMIZER_NAME = "hf_kd_loss_optimizer.pt"  # their optimizer and schedule, under DeepSpeed and FSDP
AGGREGATOR_PREFIX = "aggregator."  # the multi-teacher aggregator's state, beside the losses' in the same file
TEACHER_PREFIX = "teacher."  # teachers that learn (a mean teacher): teacher.NAME.KEY, in the same file


class LossParts:
    """The loss modules of an objective and, under DeepSpeed or FSDP, the optimizer of their parameters.

    One device and DDP: the parameters join the student's optimizer as a group of their own (no weight decay).
    DeepSpeed and FSDP build, shard and checkpoint the student's optimizer from the model's parameters alone, so the
    parts get an optimizer of the student's kind, hyperparameters and schedule, stepped with it (the callback) and
    checkpointed beside it.

    Args:
        losses: the objective's loss modules.
        aggregator: the multi-teacher aggregator (its running reliability is checkpointed here), or None.
        teachers: the teacher sources by name; those with a ``state_dict`` (a teacher that learns) are checkpointed
            here.
    """

    def __init__(self, losses: nn.ModuleList, aggregator: nn.Module | None = None, teachers: dict | None = None):
        self.losses = losses
        self.aggregator = aggregator  # several teachers: its running reliability checkpoints with the parts
        self.teachers = dict(teachers or {})  # name → TeacherSource; those with a state_dict checkpoint here
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the losses (projectors, regressors, heads), optimised beside the student.

        Returns:
            The parameters that require gradients.
        """
        return [parameter for parameter in self.losses.parameters() if parameter.requires_grad]

    def setup(self, trainer, terms) -> None:
        """Let losses with learned parts size them from one training batch (before any optimizer exists).

        Args:
            trainer: the :class:`~hf_kd.DistillationTrainer`, its models and teachers placed.
            terms: the objective's terms.

        Raises:
            ValueError: a loss to size and no ``train_dataset``, or learned parts with fp16 under DeepSpeed or FSDP.
        """
        pending = [term for term in terms if type(term.loss).setup is not DistillationLoss.setup]
        if not pending:
            return
        if trainer.train_dataset is None:
            raise ValueError(
                f"losses {[term.loss.name for term in pending]} size their learned parts from a first training "
                "batch: pass train_dataset to DistillationTrainer."
            )
        with torch.random.fork_rng(devices=[]):  # the dry run must not shift the training shuffle
            batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        batch, sample_index = split_sample_index(batch)
        model_inputs = {key: value for key, value in batch.items() if key != "labels"}
        was_training = trainer.model.training
        trainer.model.eval()  # no dropout, no batch-norm statistics update in the dry run
        with torch.no_grad():
            _, student = run_model(trainer.model, model_inputs, trainer.distillation_objective.needs("student"))
            teachers = {  # teachers never see labels
                name: trainer.teachers[name](
                    batch, trainer.distillation_objective.needs("teacher", name), sample_index=sample_index
                )
                for name in dict.fromkeys(term.teacher for term in pending)
            }
        trainer.model.train(was_training)
        dataset = trainer.train_dataset
        num_samples = len(dataset) if hasattr(dataset, "__len__") else None
        for term in pending:
            term.loss.setup(student, teachers[term.teacher], num_samples=num_samples)
        self.losses.to(trainer.args.device)
        if trainer.accelerator.num_processes > 1:  # every process starts from rank 0's initialisation
            for tensor in self.losses.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        if engine_owns_optimizer(trainer) and trainer.args.fp16 and self.parameters():
            raise ValueError(
                f"losses {[term.loss.name for term in pending]} learn parameters beside the student, whose gradients "
                "DeepSpeed's or FSDP's fp16 loss scaling would leave scaled: use bf16 (or fp32) with these engines."
            )

    def join(self, optimizer: torch.optim.Optimizer) -> None:
        """Add the parameters to the student's optimizer: same learning rate and schedule, no weight decay (as for
        biases and norms).

        Args:
            optimizer: the student's optimizer (parameters already in it are not added again).
        """
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.parameters() if id(p) not in known]
        if missing:
            optimizer.add_param_group({"params": missing, "weight_decay": 0.0})

    def build_engine_optimizer(self, trainer, max_steps: int) -> None:
        """Under DeepSpeed and FSDP: the parts' own optimizer, of the student's kind and schedule.

        Args:
            trainer: the :class:`~hf_kd.DistillationTrainer` (its arguments give the optimizer and schedule).
            max_steps: the run's number of optimizer steps, for the schedule.
        """
        self.optimizer, self.scheduler = None, None
        parameters = self.parameters()
        if not (engine_owns_optimizer(trainer) and parameters):
            return
        optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
        self.optimizer = optimizer_cls([{"params": parameters, "weight_decay": 0.0}], **optimizer_kwargs)
        self.scheduler = get_scheduler(
            trainer.args.lr_scheduler_type,
            optimizer=self.optimizer,
            num_warmup_steps=trainer.args.get_warmup_steps(max_steps),
            num_training_steps=max_steps,
            scheduler_specific_kwargs=trainer.args.lr_scheduler_kwargs,
        )

    def state_dict(self) -> dict:
        """What a checkpoint holds of the parts.

        Returns:
            The losses' state, the aggregator's under ``aggregator.`` and each learning teacher's under
                ``teacher.NAME.``.
        """
        state = dict(self.losses.state_dict())
        if self.aggregator is not None:
            state.update({f"{AGGREGATOR_PREFIX}{key}": value for key, value in self.aggregator.state_dict().items()})
        for name, teacher in self.teachers.items():
            state.update({f"{TEACHER_PREFIX}{name}.{key}": value for key, value in teacher.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state: the entries, as :meth:`state_dict` names them.
        """
        prefixes = (AGGREGATOR_PREFIX, TEACHER_PREFIX)
        self.losses.load_state_dict({key: value for key, value in state.items() if not key.startswith(prefixes)})
        if self.aggregator is not None:
            self.aggregator.load_state_dict(_under(state, AGGREGATOR_PREFIX))
        for name, teacher in self.teachers.items():
            if teacher.state_dict():
                teacher.load_state_dict(_under(state, f"{TEACHER_PREFIX}{name}."))

    def save(self, folder: str) -> None:
        """Write the parts (``hf_kd_losses.safetensors``) and their own optimizer, if any, into a checkpoint.

        Args:
            folder: the checkpoint folder (made if missing; nothing is written when the parts have no state).
        """
        state = self.state_dict()
        if not state:
            return
        os.makedirs(folder, exist_ok=True)
        save_file(
            {key: value.detach().contiguous() for key, value in state.items()}, os.path.join(folder, LOSS_PARTS_NAME)
        )
        if self.optimizer is not None:
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                os.path.join(folder, LOSS_OPTIMIZER_NAME),
            )

    def load(self, checkpoint: str) -> None:
        """Read back what :meth:`save` wrote.

        Args:
            checkpoint: the checkpoint folder.

        Raises:
            ValueError: the checkpoint lacks the parts' file (while they have state) or their optimizer's file.
        """
        path = os.path.join(checkpoint, LOSS_PARTS_NAME)
        if os.path.exists(path):
            self.load_state_dict(load_file(path))  # copied onto the parameters' device
        elif self.state_dict():
            raise ValueError(
                f"{checkpoint} has no {LOSS_PARTS_NAME}: it was not written by a DistillationTrainer with these "
                "losses, whose learned parts would restart from scratch."
            )
        if self.optimizer is not None:
            path = os.path.join(checkpoint, LOSS_OPTIMIZER_NAME)
            if not os.path.exists(path):
                raise ValueError(f"{checkpoint} has no {LOSS_OPTIMIZER_NAME} for the learned loss parts' optimizer.")
            state = torch.load(path, map_location="cpu", weights_only=True)  # moved to the parameters' device
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])


def _under(state: dict, prefix: str) -> dict:
    """The entries of ``state`` whose keys start with ``prefix``, the prefix cut off."""
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def engine_owns_optimizer(trainer) -> bool:
    """DeepSpeed and FSDP build, shard and checkpoint the student's optimizer from the model's parameters alone.

    Args:
        trainer: the Trainer.

    Returns:
        Whether DeepSpeed or FSDP is enabled (the loss parts then need their own optimizer).
    """
    return trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled


class LossPartsCallback(TrainerCallback):
    """What the Trainer loop does for the student's gradients and optimizer, done for the loss parts too.

    Args:
        parts: the trainer's :class:`LossParts`.
        accelerator: the trainer's ``Accelerator`` (reduces the gradients across processes).
    """

    def __init__(self, parts: LossParts, accelerator):
        self.parts = parts
        self.accelerator = accelerator

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        parameters = [p for p in self.parts.parameters() if p.grad is not None]
        if not parameters:
            return
        if self.accelerator.num_processes > 1:  # average across processes, as DDP does for the student
            for parameter in parameters:
                parameter.grad = self.accelerator.reduce(parameter.grad, reduction="mean")
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.parts.optimizer is not None:  # DeepSpeed, FSDP: the loss parts' own optimizer
            self.parts.optimizer.step()
            self.parts.scheduler.step()
        for parameter in self.parts.parameters():
            parameter.grad = None  # the Trainer zeroes only the model's gradients
