"""Regression knowledge: losses between the student's and the teacher's predictions of real-valued targets, for
``num_labels=1`` (or multi-output, ``problem_type="regression"``) heads. The student's own label loss is then the
MSE to the targets over the labeled rows (unlabeled rows carry NaN targets, see
:func:`hf_kd.data.split_labeled_transfer`), mixed with these by the usual label weight.
"""

from __future__ import annotations

import math

from . import functional as F
from .base import DistillationLoss
from .registry import register_loss


@register_loss(
    "regression_mse",
    paper="Ba & Caruana 2014, Do Deep Nets Really Need to be Deep?, arXiv:1312.6184",
)
class RegressionMSE(DistillationLoss):
    __doc__ = F.regression_mse.__doc__

    def __init__(self):  # no options (no temperature: predictions are not softened)
        super().__init__()

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        return F.regression_mse(student.logits, teacher.dense_logits(), mask=mask, reduction="sum")


@register_loss(
    "teacher_bounded",
    paper="Chen et al. 2017, Learning Efficient Object Detection Models with Knowledge Distillation, NeurIPS",
)
class TeacherBounded(DistillationLoss):
    __doc__ = F.teacher_bounded.__doc__

    def __init__(self, margin: float = 0.0):
        super().__init__()
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"teacher_bounded needs a finite margin >= 0, got margin={margin}.")
        self.margin = margin

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        if labels is None or not labels.is_floating_point():
            raise ValueError(
                "teacher_bounded bounds the student's error on regression targets by the teacher's: it needs float "
                f"labels (NaN for unlabeled rows), got {'none' if labels is None else labels.dtype}."
            )
        return F.teacher_bounded(
            student.logits, teacher.dense_logits(), labels, margin=self.margin, mask=mask, reduction="sum"
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
