"""The teacher is the student's own base model with its adapters off (a PEFT/LoRA student)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..features import ModelFeatures, run_model
from ..losses.lm_head import LogitsHead
from .base import TeacherSource
from .live import LiveTeacher
from .loading import unwrap


class AdapterBaseTeacher(TeacherSource):
    """The teacher is the student's own base model with its adapters switched off (a PEFT/LoRA student on the
    teacher's weights): one copy of the base in memory, the teacher pass runs under ``disable_adapter()``.

    Args:
        student: The PEFT student (``peft.get_peft_model(base, LoraConfig(...))``; unwrapped from DDP or
            DeepSpeed if wrapped), whose base model is the teacher.

    Raises:
        ValueError: ``student`` is not a PEFT model (it has no ``disable_adapter`` / ``get_base_model``).
    """

    def __init__(self, student: nn.Module):
        student = unwrap(student)
        if not hasattr(student, "disable_adapter") or not hasattr(student, "get_base_model"):
            raise ValueError(
                "AdapterBaseTeacher needs a PEFT student (peft.get_peft_model(base, LoraConfig(...))) whose base "
                f"model is the teacher; got {type(student).__name__}."
            )
        self.student = student
        self.model = None  # the base is not a separate network
        self._live = LiveTeacher(student)
        self._logits_checked = False

    @contextlib.contextmanager
    def _base(self):
        was_training = self.student.training
        self.student.eval()  # no dropout in the teacher pass, as for a separate teacher
        try:
            with self.student.disable_adapter(), torch.no_grad():
                yield
        finally:
            self.student.train(was_training)

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        with self._base():
            return run_model(self.student, self._live.inputs(inputs), needs)[1]

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        with self._base():
            outputs = self.student(**self._live.inputs(inputs), output_hidden_states=True, logits_to_keep=1)
        head = LogitsHead(self.student.get_base_model(), "the teacher (the student's base)")

        def to_logits(hidden):
            with self._base():  # a LoRA on the LM head must be off for the teacher's logits too
                return head(hidden)

        if not self._logits_checked:  # once, on the first batch: the head's logits are the model's own
            self._logits_checked = True
            with self._base():
                head.check(outputs.hidden_states[-1][:, -1], outputs.logits[:, -1])
        return (outputs.hidden_states[-1][:, :-1][mask],), to_logits

    def describe(self) -> dict:
        base = self.student.get_base_model()
        return {
            "teacher": getattr(base, "name_or_path", None) or None,
            "teacher_class": type(base).__name__ + " (the student's base, adapters off)",
            # The adapters are the only trainable parameters (modules_to_save copies included): the rest is the base.
            "teacher_parameters": sum(p.numel() for p in base.parameters() if not p.requires_grad),
        }
