"""The teacher-source protocol: where a teacher's outputs come from (a live model, a cache, the student's own
base, a model that learns during training)."""

from __future__ import annotations

import torch
from torch import nn

from ..features import ModelFeatures


class TeacherSource:
    """Where the teacher's outputs come from: a model run live, a cache on disk, the student's own base model.

    ``compare_with_teacher`` measures the teacher through ``__call__``.

    Attributes:
        model: A separate teacher network held in memory (``None`` for a cache or the student's own base).
        covers_eval: Whether outputs exist for evaluation data too (a cache covers the data it was written for only).
        provides: The feature needs it can serve (``{"logits"}`` for a cache); ``None``: anything a model returns.
    """

    model: nn.Module | None = None
    covers_eval: bool = True
    provides: frozenset[str] | None = None  # the feature needs it can serve; None: anything a model returns

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        """The teacher's features for a batch of student inputs.

        Args:
            inputs: The student's batch (``input_ids``, ``attention_mask``, ..., as the collator made it).
            needs: The feature fields the losses read from this teacher (``"logits"``, ``"hidden_states"``, ...).
            sample_index: Each row's index in the training set (a cache looks its rows up by it).

        Returns:
            The teacher's :class:`~hf_kd.features.ModelFeatures` for the batch.
        """
        raise NotImplementedError

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        """The teacher's inputs to its LM head, per supervised position, for chunked causal-LM KD.

        Args:
            inputs: The student's batch.
            mask: Which logits positions (0..T−2) are supervised.
            sample_index: Each row's index in the training set.

        Returns:
            ``(rows, to_logits)``: ``rows`` is a tuple of tensors with one row per position of ``mask``, and
                ``to_logits(*row_chunk)`` gives those positions' logits (called under ``no_grad``).
        """
        raise NotImplementedError

    def release(self) -> None:
        """Free what ``token_rows`` held for the chunks once the backward pass that recomputes them is done."""

    def attach(self, trainer) -> None:
        """Called once by the trainer that will read this source (a teacher that learns during training places
        itself on the trainer's device and adds its callbacks here).

        Args:
            trainer: The :class:`~hf_kd.DistillationTrainer` that reads this source.
        """

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State that changes during training (a mean teacher's weights): checkpointed and resumed with the loss
        parts.

        Returns:
            Tensors by name; empty for frozen teachers and caches.
        """
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state: Tensors by name, as :meth:`state_dict` gave them.
        """

    def describe(self) -> dict:
        """What summaries and model cards record about this teacher.

        Returns:
            ``{"teacher": name or path, "teacher_class": ..., "teacher_parameters": ...}``.
        """
        raise NotImplementedError

    def check_needs(self, needs: frozenset[str]) -> None:
        """Refuse feature needs this source cannot serve.

        Args:
            needs: The feature fields the losses read from this teacher.

        Raises:
            ValueError: ``needs`` goes beyond :attr:`provides`.
        """
        if self.provides is not None and not needs <= self.provides:
            raise ValueError(
                f"the configured losses need teacher {sorted(needs - self.provides)}, which a "
                f"{type(self).__name__} does not provide (it provides {sorted(self.provides)}); use logit losses "
                "or a live teacher model."
            )
