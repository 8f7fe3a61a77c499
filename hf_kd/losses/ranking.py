"""Ranking knowledge: how the teacher scores each query's candidates, for rerankers and retrievers that score
groups (``B×G`` logits from :mod:`hf_kd.ranking`: cross-encoders, bi-encoders, or precomputed teacher scores)."""

from __future__ import annotations

from . import functional as F
from .base import DistillationLoss
from .registry import register_loss
from .response import ResponseLoss


@register_loss(
    "margin_mse",
    paper="Hofstätter et al. 2020, Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge "
    "Distillation, arXiv:2010.02666",
)
class MarginMSE(DistillationLoss):
    """Margin-MSE (Hofstätter et al. 2020): per query, the mean over candidate pairs of ((s_i − s_j) − (t_i − t_j))².

    With relevance labels, the pairs are a better-graded and a worse-graded candidate (a query without such a pair:
    every pair); without labels, every pair. Scores are compared as they are (no temperature, no options). See
    :func:`~hf_kd.losses.functional.margin_mse`.
    """

    min_group_size = 2  # a margin needs two candidates

    def __init__(self):  # scores are compared as they are: no temperature
        super().__init__()

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        return F.margin_mse(student.logits, teacher.dense_logits(), labels, mask=mask, reduction="sum")


@register_loss(
    "listwise_kl",
    paper="Hinton et al. 2015's KD over each query's candidates, as listwise reranker distillation does (e.g. "
    "Reddi et al. 2021, RankDistil)",
)
class ListwiseKL(ResponseLoss):
    """τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) over each query's candidates (candidates scored -inf take no part).

    See :func:`~hf_kd.losses.functional.listwise_kl`.

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
    """

    function = F.listwise_kl
    compares_distributions = False  # a softmax over each query's candidates, not over one head's logits
    min_group_size = 2  # a softmax over one candidate is 1 whatever its score
