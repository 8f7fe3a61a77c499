"""Response-based distillation losses as pure functions of plain tensors.

Every function has the signature ``fn(student_logits, teacher_logits, *, temperature=1.0, mask=None,
reduction="mean", **kw) -> scalar``. The last dimension holds classes (or vocabulary entries); all leading
dimensions are positions: ``B×C`` for sequence/image classification, ``B×T×V`` for token level. ``mask``
(bool, the shape of the leading dimensions) selects the positions that count. ``reduction="mean"`` averages
over those positions; ``reduction="sum"`` sums them, so a caller can normalise by a count taken over a
whole accumulated batch.

The math runs in float32 whatever the input dtype, and vocabulary entries masked with ``-inf`` (in either
model, as long as the teacher gives them zero probability) produce neither NaN values nor NaN gradients.
"""

from __future__ import annotations

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
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _finite(log_probs: torch.Tensor) -> torch.Tensor:
    # -inf log-probabilities (masked vocabulary entries) become the most negative float, so that 0 * log p is 0
    # in the forward pass and in the backward pass (0 * -inf would be NaN in both).
    return log_probs.clamp(min=torch.finfo(log_probs.dtype).min)


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position, summed over the last dimension; terms with p = 0 contribute 0."""
    p = log_p.exp()
    return (p * (_finite(log_p) - _finite(log_q))).sum(-1)


def reduce_positions(values: torch.Tensor, mask: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    """Reduce per-position loss values over the positions that ``mask`` keeps."""
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


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """τ²·KL(p_T^τ ‖ p_S^τ): Hinton et al. 2015, *Distilling the Knowledge in a Neural Network*."""
    _check(student_logits, teacher_logits, temperature)
    values = _kl_from_log_probs(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))
    return reduce_positions(values * temperature**2, mask, reduction)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """τ²·KL(p_S^τ ‖ p_T^τ): mode-seeking KD (MiniLLM, Gu et al. 2024)."""
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
    """α-skew KL of DistiLLM (Ko et al. 2024): τ²·KL(p_T ‖ α·p_T + (1 − α)·p_S), α = ``skew``."""
    _check(student_logits, teacher_logits, temperature)
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew_kl needs 0 <= skew < 1, got skew={skew}.")
    log_t = _log_probs(teacher_logits, temperature)
    log_m = _log_mixture(log_t, _log_probs(student_logits, temperature), skew)
    return reduce_positions(_kl_from_log_probs(log_t, log_m) * temperature**2, mask, reduction)


def skew_reverse_kl(
    student_logits, teacher_logits, *, skew=0.1, temperature=1.0, mask=None, reduction: Reduction = "mean"
):
    """α-skew reverse KL of DistiLLM: τ²·KL(p_S ‖ (1 − α)·p_T + α·p_S), α = ``skew``."""
    _check(student_logits, teacher_logits, temperature)
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew_reverse_kl needs 0 <= skew < 1, got skew={skew}.")
    log_s = _log_probs(student_logits, temperature)
    log_m = _log_mixture(log_s, _log_probs(teacher_logits, temperature), skew)
    return reduce_positions(_kl_from_log_probs(log_s, log_m) * temperature**2, mask, reduction)


def tvd(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """Total variation distance ½·Σ|p_T^τ − p_S^τ| (Wen et al. 2023, f-divergence KD)."""
    _check(student_logits, teacher_logits, temperature)
    p_s = _log_probs(student_logits, temperature).exp()
    p_t = _log_probs(teacher_logits, temperature).exp()
    return reduce_positions(0.5 * (p_t - p_s).abs().sum(-1), mask, reduction)


def soft_ce(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """Soft-target cross-entropy τ²·(−Σ p_T^τ log p_S^τ), summed over classes and averaged over positions.

    It differs from ``forward_kl`` by τ²·H(p_T^τ), a constant for the student, so its gradients are the same.
    """
    _check(student_logits, teacher_logits, temperature)
    p_t = _log_probs(teacher_logits, temperature).exp()
    values = -(p_t * _finite(_log_probs(student_logits, temperature))).sum(-1)
    return reduce_positions(values * temperature**2, mask, reduction)


def logit_mse(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction: Reduction = "mean"):
    """Mean over classes of ((z_S − z_T)/τ)² per position (TextBrewer's ``kd_mse_loss``; Ba & Caruana 2014).

    Entries where either logit is infinite (masked vocabulary) are left out.
    """
    _check(student_logits, teacher_logits, temperature)
    z_s, z_t = student_logits.float(), teacher_logits.float()
    finite = torch.isfinite(z_s) & torch.isfinite(z_t)
    diff = torch.where(finite, z_s - z_t.masked_fill(~finite, 0.0), torch.zeros_like(z_s)) / temperature
    values = diff.pow(2).sum(-1) / finite.sum(-1).clamp(min=1)
    return reduce_positions(values, mask, reduction)


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
    non-target classes renormalised among themselves. ``target`` holds the class index per position; where it
    is missing (``None`` or ``-100``, e.g. unlabeled transfer data) the teacher's top class is used.
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
}
