"""The base every distillation loss derives from."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..features import ModelFeatures


class DistillationLoss(nn.Module):
    """A loss between a student's and a teacher's :class:`~hf_kd.features.ModelFeatures`.

    Subclasses set ``needs`` (the feature fields they read) and implement :meth:`forward`. A loss with
    ``per_position = True`` returns the **sum** over the positions kept by ``mask`` (every example for
    sequence-level tasks, every supervised token for token-level ones); the trainer divides by the number of
    such positions in the whole accumulated batch, which keeps gradient accumulation exact. Learned parts
    (projectors, regressors) are ordinary submodules: the trainer optimises and checkpoints them with the
    student and never saves them into the student.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    per_position: ClassVar[bool] = True

    def forward(
        self,
        student: ModelFeatures,
        teacher: ModelFeatures,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError
