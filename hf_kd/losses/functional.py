"""Response-based distillation losses as pure functions of plain tensors.

Every function has the signature ``fn(student_logits, teacher_logits, *, temperature=1.0, mask=None,
reduction="mean", **kw) -> scalar``. The last dimension holds classes (or vocabulary entries); all leading
dimensions are positions: ``B×C`` for sequence/image classification, ``B×T×V`` for token level. ``mask``
(bool, the shape of the leading dimensions) selects the positions that count. ``reduction="mean"`` averages
over those positions; ``reduction="sum"`` sums them, so a caller can normalise by a count taken over a
whole accumulated batch.

The math runs in float32 at least (float64 inputs stay float64), and vocabulary entries masked with ``-inf`` (in either
model, as long as the teacher gives them zero probability) produce neither NaN values nor NaN gradients.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "none"]


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ "
            "in shape: the student and teacher must share the label set (or vocabulary) and see the same positions."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def _finite(log_probs: torch.Tensor) -> torch.Tensor:
    # -inf log-probabilities (masked vocabulary entries) become the most negative float, so that 0 * log p is 0
    # in the forward pass and in the backward pass (0 * -inf would be NaN in both).
    return log_probs.clamp(min=torch.finfo(log_probs.dtype).min)


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position, summed over the last dimension; terms with p = 0 contribute 0."""
    p = log_p.exp()
    return (p * (_finite(log_p) - _finite(log_q))).sum(-1)


def reduce_positions(values: torch.Tensor, mask: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    """Reduce per-position loss values over the positions that ``mask`` keeps.

    Args:
        values: Per-position values (any shape).
        mask: Bool of ``values``' shape, True where a position counts; ``None``: every position.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` over them, or ``"none"`` (values with the others
            zeroed).

    Returns:
        A scalar, or ``values`` with the positions outside ``mask`` set to 0 for ``reduction="none"``.

    Raises:
        ValueError: ``mask``'s shape differs from ``values``', or ``reduction`` is none of the three.
    """
    if mask is not None:
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the positions {tuple(values.shape)}.")
        values = values.masked_fill(~mask.bool(), 0.0)
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        count = values.numel() if mask is None else mask.sum()
        return total / torch.clamp(torch.as_tensor(count, device=values.device, dtype=values.dtype), min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")


class _ForwardKL(torch.autograd.Function):
    """KL(p_T^τ ‖ p_S^τ) per position with ∂/∂z_S = (q − p)/τ written out: autograd through two log-softmaxes
    makes several more passes over the …×V logits, the largest cost of a KD step after the models."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature):
        log_p = _log_probs(teacher_logits, temperature)
        log_q = _log_probs(student_logits, temperature)
        p = log_p.exp()
        values = (p * (_finite(log_p) - _finite(log_q))).sum(-1)
        ctx.save_for_backward(log_q.exp_(), p)  # q in place of log q: the only buffers the gradient needs
        ctx.temperature, ctx.dtype = temperature, student_logits.dtype
        return values

    @staticmethod
    def backward(ctx, grad):
        q, p = ctx.saved_tensors
        return ((q - p) * (grad / ctx.temperature)[..., None]).to(ctx.dtype), None, None


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """τ²·KL(p_T^τ ‖ p_S^τ): Hinton et al. 2015, *Distilling the Knowledge in a Neural Network*.

    Args:
        student_logits: Student logits ``…×C`` (classes or vocabulary entries last).
        teacher_logits: Teacher logits of the same shape.
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: the logits differ in shape, or ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    if teacher_logits.requires_grad:  # both sides trained (mutual learning): plain autograd
        values = _kl_from_log_probs(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))
    else:
        values = _ForwardKL.apply(student_logits, teacher_logits, temperature)
    return reduce_positions(values * temperature**2, mask, reduction)


def subset_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """τ²·KL(p_T^τ ‖ p̂_S^τ), p̂_S the student's distribution restricted to the teacher's classes and renormalised:
    the cross-entropy objective of Vongkulbhisal et al. 2019, *Unifying Heterogeneous Classifiers with
    Distillation* (UHC), up to the teacher's entropy, which does not depend on the student.

    A teacher that knows only some of the student's classes gives ``-inf`` logits at the others (its logits placed
    at the student's class ids: :class:`~hf_kd.schemes.amalgamation.LabelSubsetTeacher`); the student's logits there
    are left out of its softmax, so ``p̂_S(c) = p_S(c) / Σ_{k ∈ C_T} p_S(k)`` for c in the teacher's classes C_T. The
    loss says nothing of how the student splits its mass between C_T and the other classes, and the other classes
    get no gradient. With every class known it equals :func:`forward_kl`.

    Args:
        student_logits: Student logits ``…×C`` over the student's classes.
        teacher_logits: Teacher logits of the same shape, ``-inf`` at the classes the teacher does not know (at least
            one finite entry per position).
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: the logits differ in shape, or ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    unknown = teacher_logits == float("-inf")
    restricted = student_logits.masked_fill(unknown, float("-inf"))  # no gradient reaches the left-out classes
    return forward_kl(restricted, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """τ²·KL(p_S^τ ‖ p_T^τ): mode-seeking KD (MiniLLM, Gu et al. 2024).

    Args:
        student_logits: Student logits ``…×C``.
        teacher_logits: Teacher logits of the same shape.
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: the logits differ in shape, or ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    values = _kl_from_log_probs(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))
    return reduce_positions(values * temperature**2, mask, reduction)


def generalized_jsd(
    student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, reduction: Reduction = "mean"
):
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), with TRL's convention.

    With the mixture m = β·p_T + (1 − β)·p_S: JSD_β = β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m), times τ².
    The endpoints are defined as the limits GKD uses: β = 0 gives forward KL(p_T ‖ p_S), β = 1 gives
    reverse KL(p_S ‖ p_T).

    Args:
        student_logits: Student logits ``…×C``.
        teacher_logits: Teacher logits of the same shape.
        beta: β in [0, 1], the teacher's share of the mixture.
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: ``beta`` outside [0, 1], logits of different shapes, or ``temperature <= 0``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd needs 0 <= beta <= 1, got beta={beta}.")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    _check(student_logits, teacher_logits, temperature)
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits, temperature)
    log_m = _log_mixture(log_t, log_s, beta)
    values = beta * _kl_from_log_probs(log_t, log_m) + (1 - beta) * _kl_from_log_probs(log_s, log_m)
    return reduce_positions(values * temperature**2, mask, reduction)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1 − w)·b) computed stably from log a and log b."""
    weights = torch.tensor([weight_a, 1.0 - weight_a], dtype=log_a.dtype, device=log_a.device).log()
    shape = (2,) + (1,) * log_a.dim()
    # Finite inputs: logsumexp of two -inf entries would give a NaN gradient.
    return torch.logsumexp(torch.stack([_finite(log_a), _finite(log_b)]) + weights.view(shape), dim=0)


def skew_kl(student_logits, teacher_logits, *, skew=0.1, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """α-skew KL of DistiLLM (Ko et al. 2024): τ²·KL(p_T ‖ α·p_T + (1 − α)·p_S), α = ``skew``.

    Args:
        student_logits: Student logits ``…×C``.
        teacher_logits: Teacher logits of the same shape.
        skew: α in [0, 1): the teacher's share of the mixture the KL is taken against (0 gives forward KL).
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: ``skew`` outside [0, 1), logits of different shapes, or ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew_kl needs 0 <= skew < 1, got skew={skew}.")
    log_t = _log_probs(teacher_logits, temperature)
    log_m = _log_mixture(log_t, _log_probs(student_logits, temperature), skew)
    return reduce_positions(_kl_from_log_probs(log_t, log_m) * temperature**2, mask, reduction)


def skew_reverse_kl(
    student_logits, teacher_logits, *, skew=0.1, temperature=1.0, mask=None, reduction: Reduction = "mean"
):
    """α-skew reverse KL of DistiLLM: τ²·KL(p_S ‖ (1 − α)·p_T + α·p_S), α = ``skew``.

    Args:
        student_logits: Student logits ``…×C``.
        teacher_logits: Teacher logits of the same shape.
        skew: α in [0, 1): the student's share of the mixture the KL is taken against (0 gives reverse KL).
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: ``skew`` outside [0, 1), logits of different shapes, or ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew_reverse_kl needs 0 <= skew < 1, got skew={skew}.")
    log_s = _log_probs(student_logits, temperature)
    log_m = _log_mixture(log_s, _log_probs(teacher_logits, temperature), skew)
    return reduce_positions(_kl_from_log_probs(log_s, log_m) * temperature**2, mask, reduction)


def uld(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """Universal Logit Distillation (Boizard et al. 2024, arXiv:2402.12030): Σₖ |p_S^τ₍ₖ₎ − p_T^τ₍ₖ₎| over both
    distributions sorted in decreasing order, the shorter one padded with zeros.

    The Wasserstein distance between the two distributions under a cost that ignores token identity, so it needs
    no shared vocabulary: teacher and student may use different tokenizers (positions aligned by the caller).

    Args:
        student_logits: Student logits ``…×V_S``.
        teacher_logits: Teacher logits ``…×V_T`` over the same positions (the vocabularies may differ).
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: the logits cover different positions, or ``temperature <= 0``.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} cover "
            "different positions; align them first (hf_kd.cross_tokenizer)."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    p_s = _log_probs(student_logits, temperature).exp().sort(dim=-1, descending=True).values
    p_t = _log_probs(teacher_logits, temperature).exp().sort(dim=-1, descending=True).values
    gap = p_s.shape[-1] - p_t.shape[-1]
    p_s, p_t = F.pad(p_s, (0, max(0, -gap))), F.pad(p_t, (0, max(0, gap)))
    return reduce_positions((p_s - p_t).abs().sum(-1), mask, reduction)


def _tempered_sparse(teacher, temperature: float):
    """log p_T^τ of a :class:`~hf_kd.features.SparseDistribution`: at the kept entries (…×k), at each other entry
    (…), and how many other entries there are."""
    softened = teacher.softened(temperature)
    return softened.logprobs, softened.fill, teacher.vocab_size - teacher.ids.shape[-1]


class _SparseTeacherCrossEntropy(torch.autograd.Function):
    """Per position: −Σ p_T^τ log p_S^τ (``with_entropy``: + Σ p_T^τ log p_T^τ, i.e. the KL) for a sparse teacher.

    A fused function because autograd through log_softmax/gather/sum makes ~10 passes over the …×V logits; here
    the forward makes three (z/τ, its logsumexp, its sum; log q is never materialised) and the backward one buffer:
    ∂/∂z = (q − p_T^τ)/τ, with p_T^τ = u off the kept entries.
    """

    @staticmethod
    def forward(ctx, logits, ids, log_p, log_u, others, temperature, with_entropy):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        scaled = logits.to(dtype) / temperature
        log_z = torch.logsumexp(scaled, dim=-1)
        log_q_kept = scaled.gather(-1, ids) - log_z[..., None]
        # Σ over the other entries of log q = Σ_all log q − Σ_kept log q, with Σ_all log q = Σ z/τ − V·log Z.
        rest = scaled.sum(-1) - scaled.shape[-1] * log_z - log_q_kept.sum(-1)
        p, u = log_p.exp(), log_u.exp()
        cross = -(p * log_q_kept).sum(-1) - torch.where(u > 0, u * rest, torch.zeros_like(u))
        if with_entropy:
            entropy = (p * _finite(log_p)).sum(-1) + torch.where(u > 0, others * u * log_u, torch.zeros_like(u))
            cross = cross + entropy
        # q, computed in place of z/τ and kept for the backward pass (as autograd keeps log_softmax's output).
        ctx.save_for_backward(scaled.sub_(log_z[..., None]).exp_(), ids, p, u)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return cross

    @staticmethod
    def backward(ctx, grad):
        q, ids, p, u = ctx.saved_tensors
        gradient = q - u[..., None]  # q − u off the kept entries
        gradient.scatter_add_(-1, ids, u[..., None] - p)  # q − p on them
        gradient.mul_((grad / ctx.temperature)[..., None])
        return gradient.to(ctx.dtype), None, None, None, None, None, None


def _sparse_terms(student_logits, teacher, temperature, with_entropy):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if tuple(student_logits.shape) != tuple(teacher.shape):
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and the cached teacher's {tuple(teacher.shape)} differ "
            "in shape: they must share the vocabulary and positions."
        )
    log_p, log_u, others = _tempered_sparse(teacher, temperature)
    values = _SparseTeacherCrossEntropy.apply(
        student_logits, teacher.ids.long(), log_p, log_u, others, temperature, with_entropy
    )
    return values * temperature**2


def sparse_forward_kl(student_logits, teacher, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """:func:`forward_kl` against a teacher known at k entries per position plus a uniform remainder (a
    :class:`~hf_kd.features.SparseDistribution`), without building its dense …×V form: the kept entries are summed
    directly and the other V − k entries share one value, so Σ over them needs only Σ_all log q − Σ_kept log q.

    Args:
        student_logits: Student logits ``…×V``.
        teacher: The teacher's sparse distribution over the same positions and vocabulary.
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: ``temperature <= 0``, or the student's logits and the teacher differ in shape.
    """
    return reduce_positions(_sparse_terms(student_logits, teacher, temperature, True), mask, reduction)


def sparse_soft_ce(student_logits, teacher, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """:func:`soft_ce` against a :class:`~hf_kd.features.SparseDistribution` teacher (see :func:`sparse_forward_kl`).

    Args:
        student_logits: Student logits ``…×V``.
        teacher: The teacher's sparse distribution over the same positions and vocabulary.
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: ``temperature <= 0``, or the student's logits and the teacher differ in shape.
    """
    return reduce_positions(_sparse_terms(student_logits, teacher, temperature, False), mask, reduction)


def tvd(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """Total variation distance ½·Σ|p_T^τ − p_S^τ| (Wen et al. 2023, f-divergence KD).

    Args:
        student_logits: Student logits ``…×C``.
        teacher_logits: Teacher logits of the same shape.
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: the logits differ in shape, or ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    p_s = _log_probs(student_logits, temperature).exp()
    p_t = _log_probs(teacher_logits, temperature).exp()
    return reduce_positions(0.5 * (p_t - p_s).abs().sum(-1), mask, reduction)


def soft_ce(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """Soft-target cross-entropy τ²·(−Σ p_T^τ log p_S^τ), summed over classes and averaged over positions.

    It differs from ``forward_kl`` by τ²·H(p_T^τ), a constant for the student, so its gradients are the same.

    Args:
        student_logits: Student logits ``…×C``.
        teacher_logits: Teacher logits of the same shape.
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: the logits differ in shape, or ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    p_t = _log_probs(teacher_logits, temperature).exp()
    values = -(p_t * _finite(_log_probs(student_logits, temperature))).sum(-1)
    return reduce_positions(values * temperature**2, mask, reduction)


def prob_mse(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """Mean over classes of (p_S^τ − p_T^τ)² per position: the squared distance between the two softmax outputs,
    the consistency cost of the mean teacher (Tarvainen & Valpola 2017, their ``softmax_mse_loss``) and of
    Π-model/temporal ensembling (Laine & Aila 2017). Bounded by 2/C per position, unlike ``logit_mse``.

    Args:
        student_logits: Student logits ``…×C``.
        teacher_logits: Teacher logits of the same shape.
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: the logits differ in shape, or ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    p_s = _log_probs(student_logits, temperature).exp()
    p_t = _log_probs(teacher_logits, temperature).exp()
    return reduce_positions((p_s - p_t).pow(2).mean(-1), mask, reduction)


def logit_mse(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """Mean over classes of ((z_S − z_T)/τ)² per position (TextBrewer's ``kd_mse_loss``; Ba & Caruana 2014).

    Entries where either logit is −inf (masked vocabulary) are left out; NaN and +inf are not, so a broken model
    gives a non-finite loss rather than a silently smaller one.

    Args:
        student_logits: Student logits ``…×C``.
        teacher_logits: Teacher logits of the same shape.
        temperature: τ > 0, dividing both logits.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: the logits differ in shape, or ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    z_s, z_t = student_logits.float(), teacher_logits.float()
    masked = torch.isneginf(z_s) | torch.isneginf(z_t)
    diff = torch.where(masked, torch.zeros_like(z_s), z_s - z_t.masked_fill(masked, 0.0)) / temperature
    values = diff.pow(2).sum(-1) / (~masked).sum(-1).clamp(min=1)
    return reduce_positions(values, mask, reduction)


def regression_mse(student_predictions, teacher_predictions, *, mask=None, reduction: Reduction = "mean"):
    """Mean over outputs of (R_S − R_T)² per example: the student regresses onto the teacher's prediction (the
    label's own MSE is the student's label loss, mixed in by its weight).

    Args:
        student_predictions: The student's predictions ``B×O``.
        teacher_predictions: The teacher's, of the same shape.
        mask: Bool ``B``: the examples that count; ``None``: all.
        reduction: ``"mean"`` over the kept examples, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-example values for ``reduction="none"``.

    Raises:
        ValueError: the predictions differ in shape.
    """
    if student_predictions.shape != teacher_predictions.shape:
        raise ValueError(
            f"student predictions {tuple(student_predictions.shape)} and teacher predictions "
            f"{tuple(teacher_predictions.shape)} differ in shape: give both models the same outputs (num_labels)."
        )
    values = (student_predictions.float() - teacher_predictions.float()).pow(2).mean(-1)
    return reduce_positions(values, mask, reduction)


def teacher_bounded(
    student_predictions, teacher_predictions, targets, *, margin=0.0, mask=None, reduction: Reduction = "mean"
):
    """Teacher-bounded regression (Chen et al. 2017): ‖R_S − y‖² where it exceeds ‖R_T − y‖² − m, else 0 — the
    student pays its own squared error only while it is worse than the teacher (by more than the margin m).
    ‖·‖² sums over outputs.

    Args:
        student_predictions: The student's predictions ``B×O``.
        teacher_predictions: The teacher's, of the same shape.
        targets: The labels y, of the predictions' shape (or one per example for one output); NaN marks an unlabeled
            example, which adds 0.
        margin: m, how much worse than the teacher the student may be before it pays.
        mask: Bool ``B``: the examples that count; ``None``: all.
        reduction: ``"mean"`` over the kept examples, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-example values for ``reduction="none"``.
    """
    targets = targets.float().reshape(student_predictions.shape)
    given = ~torch.isnan(targets).any(-1)
    targets = torch.nan_to_num(targets)
    student_error = (student_predictions.float() - targets).pow(2).sum(-1)
    teacher_error = (teacher_predictions.float() - targets).pow(2).sum(-1)
    values = torch.where(given & (student_error + margin > teacher_error), student_error, 0.0)
    return reduce_positions(values, mask, reduction)


def _check_groups(name: str, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> None:
    if student_scores.dim() != 2 or student_scores.shape[-1] < 2:
        raise ValueError(
            f"{name} compares each query's candidates: scores must be B×G with G >= 2 candidates per query, got "
            f"{tuple(student_scores.shape)}. Score groups with hf_kd.ranking (RankingCollator + CrossEncoderRanker "
            "or BiEncoderRanker)."
        )
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"{name}: the student scored {tuple(student_scores.shape)} candidates and the teacher "
            f"{tuple(teacher_scores.shape)}; both must score the same groups."
        )


def margin_mse(student_scores, teacher_scores, labels=None, *, mask=None, reduction: Reduction = "mean"):
    """Margin-MSE (Hofstätter et al. 2020) per query: the mean over candidate pairs (i, j) of
    ((s_i − s_j) − (t_i − t_j))². Pairs: with relevance ``labels``, those with label_i > label_j (a positive
    against a negative, the paper's triples); a query without such a pair, or no labels, uses every pair i < j.
    Candidates scored -inf (padding of ragged groups) are skipped.

    Args:
        student_scores: The student's scores ``B×G`` (G >= 2 candidates per query).
        teacher_scores: The teacher's, of the same shape.
        labels: Relevance grades ``B×G`` (-100 or NaN: unjudged); ``None``: every pair.
        mask: Bool ``B``: the queries that count; ``None``: all.
        reduction: ``"mean"`` over the kept queries, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-query values for ``reduction="none"``.

    Raises:
        ValueError: scores that are not ``B×G`` with G >= 2, student and teacher scores of different shapes, or
            labels of another shape.
    """
    _check_groups("margin_mse", student_scores, teacher_scores)
    present = torch.isfinite(teacher_scores) & torch.isfinite(student_scores)
    gap = torch.where(present, student_scores.float() - teacher_scores.float(), 0.0)
    differences = (gap[:, :, None] - gap[:, None, :]).pow(2)  # B×G×G: (d_i − d_j)², d = s − t
    both = present[:, :, None] & present[:, None, :]
    upper = torch.ones_like(both[0]).triu(diagonal=1)
    pairs = both & upper
    if labels is not None:
        if labels.shape != student_scores.shape:
            raise ValueError(
                f"margin_mse reads one relevance grade per candidate (labels {tuple(student_scores.shape)}, -100 "
                f"unjudged), got labels of shape {tuple(labels.shape)}."
            )
        grades = labels.float().masked_fill(labels.eq(-100) | labels.isnan(), float("nan"))
        ordered = both & (grades[:, :, None] > grades[:, None, :])  # NaN compares false: unjudged pairs drop out
        pairs = torch.where(ordered.flatten(1).any(1)[:, None, None], ordered, pairs)
    counts = pairs.flatten(1).sum(1)
    values = (differences * pairs).flatten(1).sum(1) / counts.clamp(min=1)
    return reduce_positions(values, mask, reduction)


def listwise_kl(student_scores, teacher_scores, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) over each query's candidates (candidates scored -inf take no part).

    Args:
        student_scores: The student's scores ``B×G`` (G >= 2 candidates per query).
        teacher_scores: The teacher's, of the same shape.
        temperature: Softmax temperature τ > 0.
        mask: Bool ``B``: the queries that count; ``None``: all.
        reduction: ``"mean"`` over the kept queries, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-query values for ``reduction="none"``.

    Raises:
        ValueError: scores that are not ``B×G`` with G >= 2, or of different shapes; ``temperature <= 0``.
    """
    _check_groups("listwise_kl", student_scores, teacher_scores)
    return forward_kl(student_scores, teacher_scores, temperature=temperature, mask=mask, reduction=reduction)


def dkd(
    student_logits,
    teacher_logits,
    *,
    target=None,
    alpha=1.0,
    beta=8.0,
    temperature=1.0,
    mask=None,
    reduction: Reduction = "mean",
):
    """Decoupled KD (Zhao et al. 2022): τ²·(α·TCKD + β·NCKD).

    TCKD = KL(b_T ‖ b_S) over the binary split [p_target, 1 − p_target]; NCKD = KL(p̂_T ‖ p̂_S) over the
    non-target classes renormalised among themselves.

    Args:
        student_logits: Student logits ``…×C``.
        teacher_logits: Teacher logits of the same shape.
        target: The class index per position; where it is missing (``None`` or ``-100``, e.g. unlabeled transfer
            data) the teacher's top class is used.
        alpha: α, the weight of the target-class term TCKD.
        beta: β, the weight of the non-target-class term NCKD.
        temperature: Softmax temperature τ > 0.
        mask: Bool over the leading dimensions: the positions that count; ``None``: all.
        reduction: ``"mean"`` over the kept positions, ``"sum"`` or ``"none"`` (see :func:`reduce_positions`).

    Returns:
        The loss: a scalar, or per-position values for ``reduction="none"``.

    Raises:
        ValueError: ``target``'s shape differs from the positions', logits of different shapes, or
            ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    teacher_top = teacher_logits.argmax(-1)
    if target is None:
        target = teacher_top
    else:
        if target.shape != teacher_top.shape:
            raise ValueError(
                f"dkd target shape {tuple(target.shape)} must match the positions {tuple(teacher_top.shape)}."
            )
        target = torch.where(target.eq(-100), teacher_top, target)
    is_target = F.one_hot(target.long(), student_logits.shape[-1]).bool()
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits, temperature)

    def binary(log_p: torch.Tensor) -> torch.Tensor:
        log_target = log_p.masked_fill(~is_target, float("-inf")).logsumexp(-1)
        log_rest = log_p.masked_fill(is_target, float("-inf")).logsumexp(-1)
        return torch.stack([log_target, log_rest], dim=-1)

    tckd = _kl_from_log_probs(binary(log_t), binary(log_s))
    # Renormalising over the non-target classes is a log-softmax with the target class removed.
    non_target_s = F.log_softmax(log_s.masked_fill(is_target, float("-inf")), dim=-1)
    non_target_t = F.log_softmax(log_t.masked_fill(is_target, float("-inf")), dim=-1)
    nckd = _kl_from_log_probs(non_target_t, non_target_s)
    return reduce_positions((alpha * tckd + beta * nckd) * temperature**2, mask, reduction)


def confident_positions(teacher_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Where the teacher's top-class probability (softmax at temperature 1) reaches ``threshold``: the positions a
    confidence-thresholded consistency keeps (French et al. 2018's self-ensembling for domain adaptation, FixMatch).

    Args:
        teacher_logits: Teacher logits ``…×C`` (C >= 2).
        threshold: The smallest top-class probability kept, in (0, 1).

    Returns:
        Bool over the leading dimensions: True where ``max_c softmax(teacher_logits)_c >= threshold``.

    Raises:
        ValueError: ``threshold`` is outside (0, 1), or the logits have one entry per position (whose softmax is 1
            whatever the logit, so no position would ever be left out).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"confidence_threshold must be in (0, 1), got {threshold}.")
    if teacher_logits.shape[-1] < 2:
        raise ValueError(
            "confidence_threshold reads the teacher's top-class probability, a softmax over its logits; the teacher "
            "has one logit per position (a regression or a relevance score), whose softmax is 1 whatever the logit. "
            "Leave confidence_threshold unset for one-logit heads."
        )
    return _log_probs(teacher_logits, 1.0).amax(-1) >= math.log(threshold)


def class_balance(student_logits: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """French et al. 2018's class-balance loss: Σ_c BCE(m_c, 1/C), m the mean of the student's softmax over the
    positions of ``mask``, BCE(m, u) = −u·log m − (1 − u)·log(1 − m).

    Penalises a batch whose predictions pile onto a few classes (the collapse of self-ensembling on unlabeled rows);
    its minimum, C·H(1/C) with H the binary entropy, is reached when every class has mean probability 1/C.

    Args:
        student_logits: Student logits ``…×C`` (C >= 2).
        mask: Bool over the leading dimensions: the positions averaged; ``None``: all. No position: 0.

    Returns:
        The loss, a scalar.

    Raises:
        ValueError: ``mask``'s shape differs from the positions', or the logits have fewer than 2 entries.
    """
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"class_balance needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}.")
    log_p = _log_probs(student_logits, 1.0).reshape(-1, num_classes)
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the positions {tuple(student_logits.shape[:-1])}."
            )
        log_p = log_p[mask.reshape(-1).bool()]
    if len(log_p) == 0:
        return student_logits.sum() * 0.0  # no position to balance: nothing, still in the graph
    tiny = torch.finfo(log_p.dtype).tiny
    mean = log_p.exp().mean(0)
    # 1 − m_c as the mean of 1 − p_c = −expm1(log p_c): exact where a class holds nearly all the mass.
    rest = (-torch.expm1(log_p)).mean(0)
    uniform = 1.0 / num_classes
    return -(uniform * mean.clamp(min=tiny).log() + (1 - uniform) * rest.clamp(min=tiny).log()).sum()


RESPONSE_FUNCTIONS = {
    "kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "soft_ce": soft_ce,
    "logit_mse": logit_mse,
    "dkd": dkd,
    "uld": uld,
}


# ---- intermediate representations --------------------------------------------------------------------------------
# Features are tokens B×T×H (channels last), feature maps B×C×H×W (channels at dim 1) or vectors B×D.
# ``token_mask`` (B×T, True on real tokens) restricts token averages to real tokens.


def _mean_over_tokens(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-position values ``B×T`` (or any shape without a mask) over real tokens."""
    if token_mask is None or values.dim() != 2 or token_mask.shape != values.shape:
        return values.mean()
    weights = token_mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def _channels_last(features: torch.Tensor) -> torch.Tensor:
    return features.movedim(1, -1) if features.dim() == 4 else features


def feature_mse(student, teacher, *, token_mask=None):
    """Mean squared error between features of equal shape, averaged over channels, then positions / real tokens.

    Args:
        student: Student features: tokens ``B×T×H``, maps ``B×C×H×W`` or vectors ``B×D``.
        teacher: Teacher features of the same shape.
        token_mask: Bool ``B×T``, True on real tokens (token features only); ``None``: every position.

    Returns:
        The scalar loss.

    Raises:
        ValueError: the features differ in shape.
    """
    s, t = _channels_last(student.float()), _channels_last(teacher.float())
    if s.shape != t.shape:
        raise ValueError(f"feature shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}.")
    return _mean_over_tokens((s - t).pow(2).mean(-1), token_mask)


def feature_cosine(student, teacher, *, token_mask=None):
    """1 − cos(h_S, h_T) over channels, averaged over positions / real tokens (DistilBERT's cosine loss).

    Args:
        student: Student features: tokens ``B×T×H``, maps ``B×C×H×W`` or vectors ``B×D``.
        teacher: Teacher features of the same shape.
        token_mask: Bool ``B×T``, True on real tokens (token features only); ``None``: every position.

    Returns:
        The scalar loss.

    Raises:
        ValueError: the features differ in shape.
    """
    s, t = _channels_last(student.float()), _channels_last(teacher.float())
    if s.shape != t.shape:
        raise ValueError(f"feature shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}.")
    return _mean_over_tokens(1 - F.cosine_similarity(s, t, dim=-1), token_mask)


def _kept_keys(student_attention, teacher_attention, sink_keys: int = 0):
    """Both sides' attention rows over the keys the student's attention dropout kept, less the first ``sink_keys``.

    transformers returns attention probabilities after dropout: in training, dropped entries are 0 and the others
    are scaled by 1/(1 − p), so comparing them as they are adds a large constant to a KL (the teacher's mass on
    dropped keys against log 0) and teaches ``attention_mse`` a target scaled by 1/(1 − p). The student's row
    divided by its sum is its softmax restricted to the kept keys; with equal head counts the teacher's row is
    restricted to the same keys and renormalised. Without dropout (evaluation, p = 0) both rows are unchanged.

    ``sink_keys`` leaves the first keys out of both rows (then renormalised over the rest): a trained model parks
    much of its attention on its first token (BERT's [CLS], a decoder's first token), whose value is small, so
    the parked mass reads nothing; a student that copies it reads a real vector instead.
    """
    tiny = torch.finfo(student_attention.dtype).tiny
    if sink_keys:
        keys = torch.arange(student_attention.shape[-1], device=student_attention.device) >= sink_keys
        student_attention, teacher_attention = student_attention * keys, teacher_attention * keys
    student = student_attention / student_attention.sum(-1, keepdim=True).clamp(min=tiny)
    if student_attention.shape[1] == teacher_attention.shape[1]:
        teacher_attention = teacher_attention * (student_attention > 0)
    elif not sink_keys:
        return student, teacher_attention  # heads do not correspond and no key is left out: nothing to restrict
    return student, teacher_attention / teacher_attention.sum(-1, keepdim=True).clamp(min=tiny)


def _match_heads(student_attention, teacher_attention, sink_keys: int = 0):
    """Average over heads on both sides when the head counts differ (B×h×T×T → B×1×T×T)."""
    student_attention, teacher_attention = _kept_keys(student_attention, teacher_attention, sink_keys)
    if student_attention.shape[1] != teacher_attention.shape[1]:
        return student_attention.mean(1, keepdim=True), teacher_attention.mean(1, keepdim=True)
    return student_attention, teacher_attention


def attention_mse(student_attention, teacher_attention, *, token_mask=None, sink_keys: int = 0):
    """TinyBERT: MSE between attention probabilities B×h×T×T, averaged over keys, heads and real query tokens.

    Head counts may differ: both sides are then averaged over their heads first. Keys the student's attention
    dropout zeroed are left out of both rows (:func:`_kept_keys`).

    Args:
        student_attention: The student's attention probabilities ``B×h×T×T``.
        teacher_attention: The teacher's, ``B×h'×T×T``.
        token_mask: Bool ``B×T``, True on real query tokens; ``None``: every token.
        sink_keys: Leave the first this many keys out of both rows, renormalised over the rest (attention sinks:
            :func:`_kept_keys`); 0 compares every key, as the paper does.

    Returns:
        The scalar loss.
    """
    s, t = _match_heads(student_attention.float(), teacher_attention.float(), sink_keys)
    return _mean_over_tokens((s - t).pow(2).mean(-1).mean(1), token_mask)


def attention_kl(student_attention, teacher_attention, *, token_mask=None, sink_keys: int = 0):
    """MiniLM: KL(A_T ‖ A_S) per query row, averaged over heads and real query tokens.

    Head counts may differ: both sides are then averaged over their heads first. Keys the student's attention
    dropout zeroed are left out of both rows (:func:`_kept_keys`).

    Args:
        student_attention: The student's attention probabilities ``B×h×T×T``.
        teacher_attention: The teacher's, ``B×h'×T×T``.
        token_mask: Bool ``B×T``, True on real query tokens; ``None``: every token.
        sink_keys: Leave the first this many keys out of both rows, renormalised over the rest (attention sinks:
            :func:`_kept_keys`); 0 compares every key, as the paper does.

    Returns:
        The scalar loss.
    """
    s, t = _match_heads(student_attention.float(), teacher_attention.float(), sink_keys)
    tiny = torch.finfo(torch.float32).tiny
    values = (t * (t.clamp(min=tiny).log() - s.clamp(min=tiny).log())).sum(-1)
    return _mean_over_tokens(values.mean(1), token_mask)


def pkd(student_cls, teacher_cls):
    """Patient KD: ‖h_S/‖h_S‖ − h_T/‖h_T‖‖² per example ([CLS] states B×H), averaged over the batch.

    Args:
        student_cls: The student's [CLS] states ``B×H``.
        teacher_cls: The teacher's, of the same shape.

    Returns:
        The scalar loss.
    """
    s, t = F.normalize(student_cls.float(), dim=-1), F.normalize(teacher_cls.float(), dim=-1)
    return (s - t).pow(2).sum(-1).mean()


def _common_grid(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool two feature maps B×C×H×W to the smaller spatial size."""
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis's attention map: normalize(vec(mean over channels of |F|^p)).

    Args:
        features: Feature maps ``B×C×H×W`` (channels at dim 1) or tokens ``B×T×H`` (channels last).
        p: The power p of ``|F|^p``.

    Returns:
        The L2-normalised maps, ``B×(H·W)`` or ``B×T``.
    """
    features = features.float()
    energy = features.abs().pow(p).mean(1) if features.dim() == 4 else features.abs().pow(p).mean(-1)
    return F.normalize(energy.flatten(1), dim=1)


def attention_transfer(student, teacher, *, p=2.0):
    """Attention transfer (Zagoruyko & Komodakis 2017): mean((Q_S − Q_T)²), Q = attention_map(F); widths may differ.

    Feature maps are pooled to a common spatial size; token features need the same number of tokens.

    Args:
        student: Student feature maps ``B×C×H×W`` or tokens ``B×T×H``.
        teacher: Teacher features of the same kind.
        p: The power p of :func:`attention_map`.

    Returns:
        The scalar loss.

    Raises:
        ValueError: token features with different batch or token counts.
    """
    if student.dim() == 4:
        student, teacher = _common_grid(student, teacher)
    elif student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"attention transfer on tokens needs equal B×T, got {tuple(student.shape[:2])} and "
            f"{tuple(teacher.shape[:2])}."
        )
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Flow of solution procedure (Yim et al. 2017): G = F₁ᵀF₂ / positions, B×C₁×C₂.

    Args:
        first: The features at a stage's start: maps ``B×C₁×H×W`` or tokens ``B×T×C₁``.
        second: The features at its end (maps are pooled to the smaller grid of the two).

    Returns:
        The Gram matrices ``B×C₁×C₂``.
    """
    if first.dim() == 4:
        first, second = _common_grid(first.float(), second.float())
        return first.flatten(2) @ second.flatten(2).transpose(1, 2) / first[0, 0].numel()
    first, second = first.float(), second.float()
    return first.transpose(1, 2) @ second / first.shape[1]


def fsp(student_features, teacher_features):
    """FSP loss: MSE between the Gram matrices of consecutive feature pairs, averaged over pairs.

    Args:
        student_features: The student's features, one per stage (at least 2).
        teacher_features: The teacher's, as many.

    Returns:
        The scalar loss.

    Raises:
        ValueError: fewer than 2 features or different counts per side, or Gram matrices of different shapes (stage
            widths that differ without a projector).
    """
    if len(student_features) < 2 or len(student_features) != len(teacher_features):
        raise ValueError("fsp needs the same number (>= 2) of student and teacher features, one per stage.")
    losses = []
    for index in range(len(student_features) - 1):
        g_s = fsp_matrix(student_features[index], student_features[index + 1])
        g_t = fsp_matrix(teacher_features[index], teacher_features[index + 1])
        if g_s.shape != g_t.shape:
            raise ValueError(
                f"fsp: Gram matrices differ in shape ({tuple(g_s.shape)} vs {tuple(g_t.shape)}); "
                "the student's stage widths must match the teacher's: set projector='linear'/'conv'."
            )
        losses.append((g_s - g_t).pow(2).mean())
    return torch.stack(losses).mean()


# ---- relations between examples (embeddings B×D; student and teacher widths may differ) --------------------------


def _pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    squared = embeddings.pow(2).sum(1)
    distances = (squared[:, None] + squared[None, :] - 2 * embeddings @ embeddings.T).clamp(min=1e-12).sqrt()
    return distances * (1 - torch.eye(len(embeddings), device=embeddings.device, dtype=embeddings.dtype))


def _mean_normalised_distances(embeddings: torch.Tensor) -> torch.Tensor:
    distances = _pairwise_distances(embeddings.float())
    off_diagonal = distances[distances > 0]
    return distances / off_diagonal.mean().clamp(min=1e-12) if off_diagonal.numel() else distances


def rkd_distance(student, teacher):
    """RKD distance (Park et al. 2019): Huber between pairwise distances, each divided by its mean.

    Args:
        student: Student embeddings ``B×D``.
        teacher: Teacher embeddings ``B×D'`` (widths may differ).

    Returns:
        The scalar loss.
    """
    return F.smooth_l1_loss(_mean_normalised_distances(student), _mean_normalised_distances(teacher))


def _angles(embeddings: torch.Tensor) -> torch.Tensor:
    differences = F.normalize(embeddings.float()[None, :, :] - embeddings.float()[:, None, :], p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).flatten()


def rkd_angle(student, teacher):
    """RKD angle (Park et al. 2019): Huber between cos∠(e_i, e_j, e_k) over all triplets.

    Args:
        student: Student embeddings ``B×D``.
        teacher: Teacher embeddings ``B×D'`` (widths may differ).

    Returns:
        The scalar loss.
    """
    return F.smooth_l1_loss(_angles(student), _angles(teacher))


def similarity_preserving(student, teacher):
    """Similarity-preserving KD (Tung & Mori 2019): ‖norm_rows(A_T A_Tᵀ) − norm_rows(A_S A_Sᵀ)‖_F² / B².

    Args:
        student: Student features ``B×…`` (flattened per example).
        teacher: Teacher features ``B×…`` (widths may differ).

    Returns:
        The scalar loss.
    """
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    g_s, g_t = F.normalize(s @ s.T, dim=1), F.normalize(t @ t.T, dim=1)
    return (g_t - g_s).pow(2).sum() / len(s) ** 2


def pkt(student, teacher, *, eps=1e-7):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): KL between row-normalised (cos + 1)/2 affinities.

    Args:
        student: Student features ``B×…`` (flattened per example).
        teacher: Teacher features ``B×…`` (widths may differ).
        eps: Added to both affinities inside the logarithm.

    Returns:
        The scalar loss.
    """

    def affinities(x):
        x = F.normalize(x.float().flatten(1), dim=1)
        similarity = (x @ x.T + 1) / 2
        return similarity / similarity.sum(1, keepdim=True)

    p_t, p_s = affinities(teacher), affinities(student)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def irg(student_layers, teacher_layers, *, cross_layer_weight=1.0):
    """Instance relation graph (Liu et al. 2019) over mapped layers of pooled embeddings.

    Edge term: MSE between the mean-normalised pairwise-distance graphs of each mapped layer pair. Cross-layer
    term (IRG's transformation): MSE between how the graph changes from one mapped layer to the next.

    Args:
        student_layers: The student's embeddings ``B×D`` per mapped layer.
        teacher_layers: The teacher's, one per student layer (widths may differ).
        cross_layer_weight: The weight of the cross-layer term (0: edges only).

    Returns:
        The scalar loss.

    Raises:
        ValueError: no layers, or different layer counts per side.
    """
    if len(student_layers) != len(teacher_layers) or not student_layers:
        raise ValueError("irg needs the same number (>= 1) of student and teacher layers.")
    graphs_s = [_mean_normalised_distances(layer) for layer in student_layers]
    graphs_t = [_mean_normalised_distances(layer) for layer in teacher_layers]
    loss = torch.stack([F.mse_loss(s, t) for s, t in zip(graphs_s, graphs_t)]).mean()
    if cross_layer_weight and len(graphs_s) > 1:
        transitions = [
            F.mse_loss(graphs_s[i + 1] - graphs_s[i], graphs_t[i + 1] - graphs_t[i]) for i in range(len(graphs_s) - 1)
        ]
        loss = loss + cross_layer_weight * torch.stack(transitions).mean()
    return loss


# ---- mutual information ------------------------------------------------------------------------------------------


def _same_shape(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name} needs embeddings of equal shape, got {tuple(student.shape)} and {tuple(teacher.shape)}; "
            "project the student first."
        )


def embedding_mse(student, teacher):
    """Mean squared error between student and teacher sentence embeddings, over examples and dimensions
    (sentence-transformers' MSELoss for distillation, Reimers & Gurevych 2020).

    Args:
        student: Student embeddings ``B×D``.
        teacher: Teacher embeddings of the same shape.

    Returns:
        The scalar loss.

    Raises:
        ValueError: the embeddings differ in shape.
    """
    _same_shape("embedding_mse", student, teacher)
    return (student.float() - teacher.float()).pow(2).mean()


def embedding_cosine(student, teacher):
    """Mean over examples of 1 − cos(s_i, t_i): the direction of each embedding, not its length.

    Args:
        student: Student embeddings ``B×D``.
        teacher: Teacher embeddings of the same shape.

    Returns:
        The scalar loss.

    Raises:
        ValueError: the embeddings differ in shape.
    """
    _same_shape("embedding_cosine", student, teacher)
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def info_nce(student, teacher, *, temperature=0.07):
    """In-batch InfoNCE: each student embedding must pick its own teacher embedding among the batch's.

    −mean_i log softmax_j(⟨ŝ_i, t̂_j⟩ / τ)[i] with L2-normalised embeddings of equal width.

    Args:
        student: Student embeddings ``B×D``.
        teacher: Teacher embeddings of the same shape.
        temperature: τ dividing the cosine similarities.

    Returns:
        The scalar loss.

    Raises:
        ValueError: the embeddings differ in shape.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"info_nce needs embeddings of equal shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}; project the student first."
        )
    logits = F.normalize(student.float(), dim=1) @ F.normalize(teacher.float(), dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def vid(teacher, mean, variance, *, token_mask=None):
    """Variational information distillation (Ahn et al. 2019): ½·mean((t − μ)²/σ² + log σ²).

    Averaged over channels, then positions / real tokens.

    Args:
        teacher: Teacher features t: tokens ``B×T×H``, maps ``B×C×H×W`` or vectors ``B×D``.
        mean: The regressor's prediction μ(s), shaped like ``teacher``.
        variance: σ² per channel (``H`` or ``C``), positive.
        token_mask: Bool ``B×T``, True on real tokens (token features only); ``None``: every position.

    Returns:
        The scalar loss.
    """
    t, mu = _channels_last(teacher.float()), _channels_last(mean.float())
    values = 0.5 * ((t - mu).pow(2) / variance + variance.log()).mean(-1)
    return _mean_over_tokens(values, token_mask)
