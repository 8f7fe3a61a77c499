"""Response-based knowledge: losses between the student's and the teacher's logits.

Each class wires one function of :mod:`hf_kd.losses.functional`; see there for formulas and papers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from . import functional as F
from .base import DistillationLoss
from .registry import register_loss


class ResponseLoss(DistillationLoss):
    """Calls ``function(student.logits, teacher.logits, temperature=…, mask=…, reduction="sum", **options)``.

    A subclass names its function of :mod:`hf_kd.losses.functional` (and, optionally, the one that reads a sparse
    cached teacher directly) and adds its own options.

    Every response loss takes ``confidence_threshold``: the positions where the teacher's top-class probability
    (softmax of its logits at temperature 1) is below it contribute nothing, as in French et al. 2018's
    self-ensembling for domain adaptation (0.968 there) and FixMatch; they still count in the normalisation (the
    loss is a mean over every distilled position, as theirs is), so a teacher confident nowhere gives 0.

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Keep only the positions where the teacher's top-class probability is at least this,
            in (0, 1); ``None``: every position.

    Raises:
        ValueError: ``temperature`` is not a finite number > 0, or ``confidence_threshold`` is not in (0, 1).
    """

    needs = frozenset({"logits"})
    function: ClassVar[Callable]
    # Reads a sparse teacher (a cache's top-k rows) directly; without one the teacher is made dense first.
    sparse_function: ClassVar[Callable | None] = None

    # Reads a distribution over the classes (softmax of the logits): meaningless for a one-logit head.
    compares_distributions: ClassVar[bool] = True

    def __init__(self, temperature: float = 1.0, confidence_threshold: float | None = None):
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature} for loss {self.name!r}.")
        check_confidence_threshold(self.name, confidence_threshold)
        self.temperature = temperature
        self.confidence_threshold = confidence_threshold
        self.options: dict = {}  # a subclass's own options, passed on to its function

    def confident_mask(self, teacher, mask: torch.Tensor | None) -> torch.Tensor | None:
        """``mask`` narrowed to the positions where the teacher is confident (unchanged without a threshold).

        Args:
            teacher: The teacher's features (dense or sparse logits).
            mask: Bool over the positions that count; ``None``: all.

        Returns:
            The positions that count and where the teacher's top-class probability reaches ``confidence_threshold``.
        """
        if self.confidence_threshold is None:
            return mask
        confident = teacher_confident(teacher, self.confidence_threshold)
        return confident if mask is None else mask.bool() & confident

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        function, teacher_logits = type(self).function, teacher.logits
        mask = self.confident_mask(teacher, mask)
        if teacher_logits is None and teacher.sparse_logits is not None:
            if type(self).sparse_function is not None:
                function, teacher_logits = type(self).sparse_function, teacher.sparse_logits
            else:
                teacher_logits = teacher.sparse_logits.dense()
        return function(
            student.logits, teacher_logits, temperature=self.temperature, mask=mask, reduction="sum", **self.options
        )

    def extra_repr(self) -> str:
        threshold = [] if self.confidence_threshold is None else [f"confidence_threshold={self.confidence_threshold}"]
        options = [f"{k}={v}" for k, v in self.options.items()]
        return ", ".join([f"temperature={self.temperature}", *options, *threshold])


def check_confidence_threshold(name: str, threshold: float | None) -> None:
    """Raise unless ``threshold`` is ``None`` or a number in (0, 1).

    Args:
        name: The loss's id, named in the error.
        threshold: The configured ``confidence_threshold``.

    Raises:
        ValueError: ``threshold`` is not in (0, 1).
    """
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
        raise ValueError(
            f"confidence_threshold of loss {name!r} must be a probability in (0, 1), got {threshold!r}: the positions "
            "where the teacher's top-class probability is below it are left out (French et al. 2018 use 0.968)."
        )


def thresholded(loss: torch.nn.Module) -> bool:
    """Whether ``loss`` keeps only the positions where the teacher is confident (a ``confidence_threshold``).

    Args:
        loss: A term's loss.

    Returns:
        True when it has a threshold set.
    """
    return getattr(loss, "confidence_threshold", None) is not None


def teacher_confident(teacher, threshold: float) -> torch.Tensor:
    """Where the teacher's top-class probability (temperature 1) reaches ``threshold``, from dense or sparse logits.

    Args:
        teacher: The teacher's :class:`~hf_kd.features.ModelFeatures`.
        threshold: A probability in (0, 1).

    Returns:
        Bool over the positions.
    """
    # Kept on the features (for the tensor it was computed from): the loss and the logged kept share
    # (objective.record_confident) both ask, and a token-level log-softmax over the vocabulary is worth doing once.
    sparse = teacher.sparse_logits if teacher.logits is None else None
    source = teacher.logits if sparse is None else sparse.logprobs
    memo = teacher.__dict__.get("_confident_positions")
    if memo is None or memo[0] is not source:
        memo = teacher.__dict__["_confident_positions"] = (source, {})
    known = memo[1]
    if threshold not in known:
        if sparse is not None:  # a cached top-k: the best kept entry or the rest
            top = torch.maximum(sparse.logprobs.float().amax(-1), sparse.fill.float())
            known[threshold] = top >= math.log(threshold)
        else:
            known[threshold] = F.confident_positions(teacher.logits, threshold)
    return known[threshold]


@register_loss(
    "kl",
    paper="Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531",
)
class ForwardKL(ResponseLoss):
    """Forward KL, τ²·KL(p_T^τ ‖ p_S^τ) (Hinton et al. 2015): :func:`~hf_kd.losses.functional.forward_kl`.

    Reads a cached teacher's top-k rows without their dense form (:func:`~hf_kd.losses.functional.sparse_forward_kl`).

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
    """

    function = F.forward_kl
    sparse_function = F.sparse_forward_kl
    linear_in_teacher = True


@register_loss(
    "reverse_kl",
    paper="Gu et al. 2024, MiniLLM: Knowledge Distillation of Large Language Models, arXiv:2306.08543",
)
class ReverseKL(ResponseLoss):
    """Reverse KL, τ²·KL(p_S^τ ‖ p_T^τ), mode-seeking (MiniLLM): :func:`~hf_kd.losses.functional.reverse_kl`.

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
    """

    function = F.reverse_kl


@register_loss(
    "jsd",
    paper="Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD), arXiv:2306.13649",
)
class GeneralizedJSD(ResponseLoss):
    """Generalised Jensen-Shannon divergence of GKD: :func:`~hf_kd.losses.functional.generalized_jsd`.

    β = 0 is forward KL(p_T ‖ p_S), β = 1 reverse KL(p_S ‖ p_T) (TRL's convention).

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
        beta: β in [0, 1], the teacher's share of the mixture m = β·p_T + (1 − β)·p_S.

    Raises:
        ValueError: ``beta`` outside [0, 1], or a bad ``temperature`` or ``confidence_threshold``.
    """

    function = F.generalized_jsd

    def __init__(self, temperature: float = 1.0, beta: float = 0.5, confidence_threshold: float | None = None):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd needs 0 <= beta <= 1, got beta={beta}.")
        super().__init__(temperature, confidence_threshold)
        self.options = {"beta": beta}


@register_loss(
    "skew_kl",
    paper="Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models, arXiv:2402.03898",
)
class SkewKL(ResponseLoss):
    """α-skew KL of DistiLLM, τ²·KL(p_T ‖ α·p_T + (1 − α)·p_S): :func:`~hf_kd.losses.functional.skew_kl`.

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
        skew: α in [0, 1).

    Raises:
        ValueError: ``skew`` outside [0, 1), or a bad ``temperature`` or ``confidence_threshold``.
    """

    function = F.skew_kl

    def __init__(self, temperature: float = 1.0, skew: float = 0.1, confidence_threshold: float | None = None):
        if not 0.0 <= skew < 1.0:
            raise ValueError(f"skew_kl needs 0 <= skew < 1, got skew={skew}.")
        super().__init__(temperature, confidence_threshold)
        self.options = {"skew": skew}


@register_loss(
    "skew_reverse_kl",
    paper="Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models, arXiv:2402.03898",
)
class SkewReverseKL(ResponseLoss):
    """α-skew reverse KL of DistiLLM, τ²·KL(p_S ‖ (1 − α)·p_T + α·p_S).

    See :func:`~hf_kd.losses.functional.skew_reverse_kl`.

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
        skew: α in [0, 1).

    Raises:
        ValueError: ``skew`` outside [0, 1), or a bad ``temperature`` or ``confidence_threshold``.
    """

    function = F.skew_reverse_kl

    def __init__(self, temperature: float = 1.0, skew: float = 0.1, confidence_threshold: float | None = None):
        if not 0.0 <= skew < 1.0:
            raise ValueError(f"skew_reverse_kl needs 0 <= skew < 1, got skew={skew}.")
        super().__init__(temperature, confidence_threshold)
        self.options = {"skew": skew}


@register_loss(
    "tvd",
    paper="Wen et al. 2023, f-Divergence Minimization for Sequence-Level Knowledge Distillation, arXiv:2307.15190",
)
class TotalVariation(ResponseLoss):
    """Total variation distance ½·Σ|p_T^τ − p_S^τ| (Wen et al. 2023): :func:`~hf_kd.losses.functional.tvd`.

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
    """

    function = F.tvd


@register_loss(
    "soft_ce",
    paper="Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531",
)
class SoftCrossEntropy(ResponseLoss):
    """Soft-target cross-entropy τ²·(−Σ p_T^τ log p_S^τ): :func:`~hf_kd.losses.functional.soft_ce`.

    Differs from ``kl`` by the teacher's entropy, a constant for the student (same gradients). Reads a cached
    teacher's top-k rows without their dense form (:func:`~hf_kd.losses.functional.sparse_soft_ce`).

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
    """

    function = F.soft_ce
    sparse_function = F.sparse_soft_ce
    linear_in_teacher = True


@register_loss("logit_mse", paper="Ba & Caruana 2014, Do Deep Nets Really Need to be Deep?, arXiv:1312.6184")
class LogitMSE(ResponseLoss):
    """Mean over classes of ((z_S − z_T)/τ)² (TextBrewer's kd_mse; Ba & Caruana 2014).

    See :func:`~hf_kd.losses.functional.logit_mse`. Compares raw logits, so it also works on a one-logit head (a
    score, a regression).

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
    """

    function = F.logit_mse
    compares_distributions = False  # compares raw logits: a one-logit head (a score, a regression) works


@register_loss(
    "prob_mse",
    paper="Tarvainen & Valpola 2017, Mean teachers are better role models, arXiv:1703.01780",
)
class ProbabilityMSE(ResponseLoss):
    """Mean over classes of (p_S^τ − p_T^τ)², the mean teacher's consistency cost.

    See :func:`~hf_kd.losses.functional.prob_mse`.

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
    """

    function = F.prob_mse


@register_loss("dkd", paper="Zhao et al. 2022, Decoupled Knowledge Distillation, arXiv:2203.08679")
class DecoupledKD(ResponseLoss):
    """Decoupled KD (Zhao et al. 2022), τ²·(α·TCKD + β·NCKD): :func:`~hf_kd.losses.functional.dkd`.

    The target class is the batch's label where labels are integer class ids of the positions' shape, else (and
    at positions labeled -100) the teacher's top class.

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
        alpha: α >= 0, the weight of the target-class term.
        beta: β >= 0, the weight of the non-target-class term.

    Raises:
        ValueError: a negative ``alpha`` or ``beta``, or a bad ``temperature`` or ``confidence_threshold``.
    """

    function = F.dkd

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        confidence_threshold: float | None = None,
    ):
        if alpha < 0 or beta < 0:
            raise ValueError(f"dkd needs alpha >= 0 and beta >= 0, got alpha={alpha}, beta={beta}.")
        super().__init__(temperature, confidence_threshold)
        self.options = {"alpha": alpha, "beta": beta}

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        # Only integer labels of the positions' shape are class targets; else dkd uses the teacher's top class.
        target = (
            labels
            if labels is not None and labels.shape == student.logits.shape[:-1] and not labels.is_floating_point()
            else None
        )
        return F.dkd(
            student.logits,
            teacher.dense_logits(),
            target=target,
            temperature=self.temperature,
            mask=self.confident_mask(teacher, mask),
            reduction="sum",
            **self.options,
        )


@register_loss(
    "uhc",
    paper="Vongkulbhisal, Vinayavekhin & Visentini-Scarzanella 2019, Unifying Heterogeneous Classifiers with "
    "Distillation, arXiv:1904.06062",
)
class UnifyingHeterogeneousClassifiers(ResponseLoss):
    """τ²·KL(p_T^τ ‖ p̂_S^τ) against the student restricted and renormalised to the teacher's classes (UHC,
    Vongkulbhisal et al. 2019): :func:`~hf_kd.losses.functional.subset_kl`.

    The teacher's classes are its finite logits: a teacher over a subset of the student's classes
    (:class:`~hf_kd.schemes.amalgamation.LabelSubsetTeacher`, the amalgamation scheme) gives ``-inf`` at the others,
    which this loss leaves out of the student's softmax. With every class known it is ``kl``.

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
    """

    function = F.subset_kl


@register_loss(
    "uld",
    paper="Boizard et al. 2024, Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for "
    "LLMs, arXiv:2402.12030",
)
class UniversalLogitDistillation(ResponseLoss):
    """Universal Logit Distillation (Boizard et al. 2024): :func:`~hf_kd.losses.functional.uld`.

    Compares the two distributions sorted by probability, so teacher and student vocabularies may differ
    (cross-tokenizer distillation, positions aligned by :mod:`hf_kd.cross_tokenizer`).

    Args:
        temperature: Softmax temperature τ > 0 (the trainer passes ``DistillationConfig.temperature`` unless the
            loss's options set one).
        confidence_threshold: Leave out the positions where the teacher's top-class probability is below it, in
            (0, 1) (see :class:`~hf_kd.losses.response.ResponseLoss`); ``None``: none.
    """

    function = F.uld
    cross_vocabulary = True


@register_loss(
    "class_balance",
    paper="French, Mackiewicz & Fisher 2018, Self-ensembling for visual domain adaptation, arXiv:1706.05208",
)
class ClassBalance(DistillationLoss):
    """French et al. 2018's class-balance loss: Σ_c BCE(m_c, 1/C), m the mean of the student's softmax over the
    batch's unlabeled (target) rows: :func:`~hf_kd.losses.functional.class_balance`.

    Keeps self-ensembling on unlabeled rows from piling its predictions onto a few classes. It reads the student
    alone (the teacher only for ``confidence_threshold``) and is one value per batch, not a sum over positions.

    Args:
        rows: ``"unlabeled"``: the rows labeled -100 (every row of a batch without labels), the target rows of
            domain adaptation; ``"all"``: every distilled row.
        confidence_threshold: Scale the loss by the fraction of those rows where the teacher's top-class probability
            reaches it, in (0, 1), as French et al. do with their thresholded consistency; ``None``: unscaled.

    Raises:
        ValueError: ``rows`` is neither ``"unlabeled"`` nor ``"all"``, or ``confidence_threshold`` is not in (0, 1).
    """

    per_position = False
    compares_distributions = True
    default_weight = 0.005  # French et al.'s code's default weight (cls_balance)

    def __init__(self, rows: str = "unlabeled", confidence_threshold: float | None = None):
        super().__init__()
        if rows not in ("unlabeled", "all"):
            raise ValueError(f"class_balance rows must be 'unlabeled' or 'all', got {rows!r}.")
        check_confidence_threshold(self.name, confidence_threshold)
        self.rows, self.confidence_threshold = rows, confidence_threshold

    def side_needs(self, side):
        if side == "teacher" and self.confidence_threshold is None:
            return frozenset()
        return self.needs

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        logits = student.logits
        positions = logits.shape[:-1]
        rows = torch.ones(positions, dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
        if self.rows == "unlabeled" and labels is not None:
            if labels.shape != positions:
                raise ValueError(
                    f"class_balance with rows='unlabeled' finds the unlabeled rows by their label -100, which needs "
                    f"one label per position {tuple(positions)}; got labels of shape {tuple(labels.shape)}. Use "
                    "rows='all'."
                )
            rows = rows & labels.eq(-100)
        value = F.class_balance(logits, mask=rows)
        if self.confidence_threshold is not None:
            confident = teacher_confident(teacher, self.confidence_threshold) & rows
            value = value * (confident.sum().to(value.dtype) / rows.sum().clamp(min=1).to(value.dtype))
        return value

    def extra_repr(self) -> str:
        return f"rows={self.rows!r}, confidence_threshold={self.confidence_threshold}"
