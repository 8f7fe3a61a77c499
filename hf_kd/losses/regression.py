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
    """Mean over outputs of (R_S − R_T)² per example: the student regresses onto the teacher's prediction.

    The label's own MSE is the student's label loss, mixed in by its weight. No options. See
    :func:`~hf_kd.losses.functional.regression_mse`.
    """

    def __init__(self):  # no options (no temperature: predictions are not softened)
        super().__init__()

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        return F.regression_mse(student.logits, teacher.dense_logits(), mask=mask, reduction="sum")


@register_loss(
    "teacher_bounded",
    paper="Chen et al. 2017, Learning Efficient Object Detection Models with Knowledge Distillation, NeurIPS",
)
class TeacherBounded(DistillationLoss):
    """Teacher-bounded regression (Chen et al. 2017): ‖R_S − y‖² where it exceeds ‖R_T − y‖² − m, else 0.

    The student pays its own squared error only while it is worse than the teacher (by more than the margin m).
    Needs float labels (NaN for unlabeled rows). See :func:`~hf_kd.losses.functional.teacher_bounded`.

    Args:
        margin: m >= 0, how much worse than the teacher the student may be before it pays.

    Raises:
        ValueError: ``margin`` is negative or not finite.
    """

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
