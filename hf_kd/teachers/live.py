"""A frozen teacher model run live on the student's inputs."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..evaluation import count_parameters
from ..features import ModelFeatures, run_model
from ..losses.lm_head import FSDPModule, LogitsHead
from .base import TeacherSource
from .loading import unwrap


class LiveTeacher(TeacherSource):
    """Teacher outputs computed on the fly by a frozen model, under ``no_grad``, on the student's inputs.

    Inputs the teacher's ``forward`` does not take (say ``token_type_ids`` for a teacher without them) are
    dropped, and labels are never passed: the teacher computes no loss.

    Args:
        model: The teacher, already placed and frozen by the trainer (a model, a PEFT model, or one wrapped by
            DDP, DeepSpeed or FSDP2).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self._accepted = None if takes_any else set(parameters)
        self._logits_checked = False

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        self.model.eval()  # Trainer.train() may have switched every module it saw to train mode
        with torch.no_grad():
            return run_model(self.model, self.inputs(inputs), needs, module_root=unwrap(self.model))[1]

    def outputs(self, inputs: dict, **kwargs):
        """The teacher's raw outputs for a batch of student inputs, with extra forward arguments.

        Args:
            inputs: The student's batch (its ``labels`` and arguments the teacher does not take are left out).
            **kwargs: More arguments of the teacher's ``forward`` (``output_hidden_states=True``, ...).

        Returns:
            What the teacher's ``forward`` returns, computed in eval mode under ``no_grad``.
        """
        self.model.eval()
        with torch.no_grad():
            return self.model(**self.inputs(inputs), **kwargs)

    def inputs(self, inputs: dict) -> dict:
        """The student inputs the teacher takes: never labels, and only arguments its forward accepts.

        Args:
            inputs: The student's batch.

        Returns:
            The entries of ``inputs`` to pass to the teacher's ``forward``.
        """
        return {
            key: value
            for key, value in inputs.items()
            if key != "labels" and (self._accepted is None or key in self._accepted)
        }

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        # logits_to_keep=1: the model projects only its last position; the chunks project the rest.
        outputs = self.outputs(inputs, output_hidden_states=True, logits_to_keep=1)
        if isinstance(self.model, FSDPModule):
            # The chunks call the LM head outside the teacher's forward (and again when the backward pass recomputes
            # them): gather the unit holding it (Accelerate gives the head its own) until release().
            self._head_unit().unshard()
        head = LogitsHead(unwrap(self.model), "the teacher")
        if not self._logits_checked:  # once, on the first batch: the head's logits are the model's own
            self._logits_checked = True
            head.check(outputs.hidden_states[-1][:, -1], outputs.logits[:, -1])
        return (outputs.hidden_states[-1][:, :-1][mask],), head

    def release(self) -> None:
        if isinstance(self.model, FSDPModule):
            self._head_unit().reshard()

    def _head_unit(self) -> nn.Module:
        """The FSDP2 unit whose parameters include the LM head's: its own when it has one, else the root."""
        head = self.model.get_output_embeddings()
        return head if isinstance(head, FSDPModule) else self.model

    def describe(self) -> dict:
        model = unwrap(self.model)
        return {
            "teacher": getattr(model, "name_or_path", None) or None,
            "teacher_class": type(model).__name__,
            "teacher_parameters": count_parameters(model),
        }
