"""The teacher-source protocol: where a teacher's outputs come from (a live model, a cache, the student's own
base, a model that learns during training)."""

from __future__ import annotations

import torch
from torch import nn

from ..features import ModelFeatures


class TeacherSource:
    """Where the teacher's outputs come from: a model run live, a cache on disk, the student's own base model.

    ``model`` is a separate teacher network held in memory (``None`` for a cache or the student's own base).
    ``covers_eval`` says whether outputs exist for evaluation data too (a cache covers the data it was written for
    only); ``compare_with_teacher`` measures the teacher through ``__call__``.
    """

    model: nn.Module | None = None
    covers_eval: bool = True
    provides: frozenset[str] | None = None  # the feature needs it can serve; None: anything a model returns

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        """The teacher's features for a batch of student inputs."""
        raise NotImplementedError

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        """For chunked causal-LM KD: ``(rows, to_logits)`` where ``rows`` is a tuple of tensors with one row per
        position of ``mask`` (over logits positions 0..T−2) and ``to_logits(*row_chunk)`` gives those positions'
        logits (called under ``no_grad``)."""
        raise NotImplementedError

    def release(self) -> None:
        """Free what ``token_rows`` held for the chunks once the backward pass that recomputes them is done."""

    def attach(self, trainer) -> None:
        """Called once by the trainer that will read this source (a teacher that learns during training places
        itself on the trainer's device and adds its callbacks here)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State that changes during training (a mean teacher's weights): checkpointed and resumed with the loss
        parts. Frozen teachers and caches have none."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def describe(self) -> dict:
        """``teacher`` (name or path), ``teacher_class`` and ``teacher_parameters`` for summaries and cards."""
        raise NotImplementedError

    def check_needs(self, needs: frozenset[str]) -> None:
        if self.provides is not None and not needs <= self.provides:
            raise ValueError(
                f"the configured losses need teacher {sorted(needs - self.provides)}, which a "
                f"{type(self).__name__} does not provide (it provides {sorted(self.provides)}); use logit losses "
                "or a live teacher model."
            )
