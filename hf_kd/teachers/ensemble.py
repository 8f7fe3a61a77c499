"""Multi-teacher distillation (the enhancement objective): several teachers' logits combined, position by position,
into the one distribution the logit losses read.

``DistillationConfig.teacher_aggregation`` chooses how:

- ``mean_probs`` (default): the mean of the teachers' softened distributions, ``p̄ = Σₖ p_k^τ / K``;
- ``mean_logits``: the mean of their logits (TextBrewer's multi-teacher average);
- ``weighted``: ``Σₖ wₖ p_k^τ`` with static ``teacher_weights``;
- ``adaptive``: per-position weights. Where the position has a label, ``wₖ ∝ exp(−CEₖ/τ_w)`` from each teacher's
  cross-entropy on it; where it has none, ``wₖ ∝ exp(−CĒₖ/τ_w)`` from each teacher's mean cross-entropy on the
  labeled positions seen so far (a running estimate, reduced over processes and checkpointed), optionally times the
  teacher's confidence on the position (``adaptive_confidence``). Confidence alone cannot rank teachers: a
  confidently wrong teacher is as confident as a right one, so reliability comes from the labels;
- ``best``: per position, the teacher that is right with the highest confidence on the label (where none is right,
  the one giving the label the most probability); unlabeled positions take the most reliable teacher so far.

Weights sum to 1 per position. The logged ``teacher_weight/NAME`` is each teacher's mean weight.

Cached teachers (top-k rows, :class:`~hf_kd.features.SparseDistribution`) are mixed without their dense ×V form:
the mixture of K sparse distributions is one over the union of their ids (:func:`mix_sparse`), so K cached
teachers cost about what one does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..features import SparseDistribution

AGGREGATIONS = ("mean_probs", "mean_logits", "weighted", "adaptive", "best")
ENSEMBLE = "ensemble"  # the name under which the combined teacher is read by the terms


def check_aggregation(
    aggregation: str,
    teacher_weights: list[float] | str | None = None,
    adaptive_temperature: float = 1.0,
    teachers: list[str] | None = None,
) -> list[float] | None:
    """Refuse teacher-aggregation settings that cannot take effect: the one check behind
    :class:`~hf_kd.DistillationConfig` (before any teacher is known), :class:`TeacherAggregator` and the trainer's
    teacher-count check (once the teachers are named).

    Args:
        aggregation: ``teacher_aggregation``, one of :data:`AGGREGATIONS`.
        teacher_weights: static weights of ``"weighted"``, one per teacher (normalised later); a comma-separated
            string (the command line's ``"0.7,0.3"``) is read as a list of floats.
        adaptive_temperature: τ_w of ``"adaptive"``, in the weights ``softmax(−CE/τ_w)``.
        teachers: the teachers' names, in order; ``None`` skips the checks that need to know how many there are.

    Returns:
        ``teacher_weights`` as a list of floats, or ``None`` when unset.

    Raises:
        ValueError: an unknown ``aggregation``; ``teacher_weights`` with an aggregation other than ``"weighted"``,
            or weights that are not finite, are negative or are all 0; ``adaptive_temperature`` not a finite number
            > 0; ``"weighted"`` with a single teacher; or ``"weighted"`` without one weight per teacher.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"teacher_aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    if teacher_weights is not None:
        if aggregation != "weighted":
            raise ValueError(f"teacher_weights apply to teacher_aggregation='weighted', not {aggregation!r}.")
        if isinstance(teacher_weights, str):  # the command line: "0.7,0.3"
            teacher_weights = [float(part) for part in teacher_weights.split(",")]
        teacher_weights = list(teacher_weights)
        if not all(math.isfinite(w) and w >= 0 for w in teacher_weights) or sum(teacher_weights) <= 0:
            raise ValueError(f"teacher_weights must be finite, >= 0 and not all 0, got {teacher_weights}.")
    if not (math.isfinite(adaptive_temperature) and adaptive_temperature > 0):
        raise ValueError(f"adaptive_temperature must be a finite number > 0, got {adaptive_temperature}.")
    if teachers is None or aggregation != "weighted":
        return teacher_weights
    if len(teachers) == 1:
        raise ValueError(
            f"teacher_aggregation={aggregation!r} with teacher_weights={teacher_weights} combines several teachers; "
            f"this trainer has one ({teachers[0]!r}), so they would do nothing: leave both unset."
        )
    if teacher_weights is None or len(teacher_weights) != len(teachers):
        raise ValueError(
            f"teacher_aggregation='weighted' needs teacher_weights with one weight per teacher {list(teachers)}, "
            f"got {teacher_weights}."
        )
    return teacher_weights


class TeacherAggregator(nn.Module):
    """Weights over ``names`` per position and the combined logits; holds the running reliability (per teacher, the
    summed cross-entropy on labeled positions and their count) as buffers, so it checkpoints and resumes.

    Args:
        names: The teachers' names, in the order their logits are given.
        mode: How to combine them, one of :data:`AGGREGATIONS` (``teacher_aggregation``).
        static_weights: ``"weighted"``: one weight per teacher (normalised to sum to 1).
        weight_temperature: ``"adaptive"``: τ_w in the weights ``softmax(−CE/τ_w)``.
        use_confidence: ``"adaptive"``: on unlabeled positions, also weigh each teacher by its confidence there.

    Raises:
        ValueError: settings :func:`check_aggregation` refuses.
    """

    def __init__(
        self,
        names: list[str],
        mode: str = "mean_probs",
        static_weights: list[float] | None = None,
        weight_temperature: float = 1.0,
        use_confidence: bool = False,
    ):
        super().__init__()
        static_weights = check_aggregation(mode, static_weights, weight_temperature, names)
        self.names, self.mode = list(names), mode
        self.weight_temperature, self.use_confidence = weight_temperature, use_confidence
        if mode == "weighted":
            total = sum(static_weights)
            self.register_buffer("static", torch.tensor([w / total for w in static_weights]), persistent=False)
        self.register_buffer("ce_sum", torch.zeros(len(names), dtype=torch.float64))
        self.register_buffer("ce_count", torch.zeros((), dtype=torch.float64))

    @classmethod
    def from_config(cls, names: list[str], args) -> TeacherAggregator:
        """The aggregator a config asks for.

        Args:
            names: The teachers' names, in order.
            args: A :class:`~hf_kd.DistillationConfig` (its ``teacher_aggregation``, ``teacher_weights``,
                ``adaptive_temperature`` and ``adaptive_confidence``).

        Returns:
            The aggregator over ``names``.
        """
        return cls(
            names, args.teacher_aggregation, args.teacher_weights, args.adaptive_temperature, args.adaptive_confidence
        )

    def forward(
        self, logits: list[torch.Tensor | SparseDistribution], labels: torch.Tensor | None, accelerator=None
    ) -> torch.Tensor:
        """Each teacher's weight at each position; in training also updates the running reliability from the
        labeled positions (summed over processes).

        Args:
            logits: The K teachers' outputs at ``N`` positions: ``N×V`` logits or sparse distributions.
            labels: ``N`` labels, -100 where a position has none; ``None``: no position has one.
            accelerator: Sums the reliability statistics over processes when there are several.

        Returns:
            ``N×K`` weights, summing to 1 per position.
        """
        count = logits[0].shape[0]
        device = logits[0].fill.device if isinstance(logits[0], SparseDistribution) else logits[0].device
        if self.mode in ("mean_probs", "mean_logits"):
            return torch.full((count, len(logits)), 1.0 / len(logits), device=device)
        if self.mode == "weighted":
            return self.static.to(device).expand(count, -1)
        labeled = labels.ne(-100) if labels is not None else torch.zeros(count, dtype=torch.bool, device=device)
        target = labels.clamp(min=0) if labels is not None else torch.zeros(count, dtype=torch.long, device=device)
        evidence = [_evidence(z, target) for z in logits]
        label_log_probs, confidence, predicted = (torch.stack(parts, dim=1) for parts in zip(*evidence))  # N×K
        if self.training:
            self._update(-label_log_probs[labeled], accelerator)
        mean_ce = self.ce_sum / self.ce_count.clamp(min=1)  # K; all equal before any label was seen
        if self.mode == "best":
            right = predicted.eq(target[:, None])
            per_position = (label_log_probs.exp() + right.float()).argmax(1)  # right teachers first
            fallback = mean_ce.argmin().expand(count).to(device)
            chosen = torch.where(labeled, per_position, fallback)
            return nn.functional.one_hot(chosen, len(logits)).float()
        labeled_scores = label_log_probs / self.weight_temperature  # −CE/τ_w
        unlabeled_scores = (-mean_ce / self.weight_temperature).float().to(device).expand(count, -1)
        if self.use_confidence:
            unlabeled_scores = unlabeled_scores + confidence
        scores = torch.where(labeled[:, None], labeled_scores, unlabeled_scores)
        return scores.softmax(-1)

    def _update(self, ce: torch.Tensor, accelerator) -> None:
        stats = torch.cat([ce.sum(0).double(), ce.new_tensor([ce.shape[0]]).double()])
        if accelerator is not None and accelerator.num_processes > 1:  # every process: same micro-batch count
            stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum")
        self.ce_sum += stats[:-1].to(self.ce_sum.device)
        self.ce_count += stats[-1].to(self.ce_count.device)

    def combine(
        self, logits: list[torch.Tensor | SparseDistribution], weights: torch.Tensor, temperature: float
    ) -> torch.Tensor | SparseDistribution:
        """The combined teacher, as logits that a loss at ``temperature`` softens into ``Σₖ wₖ p_k^τ``.

        Args:
            logits: The K teachers' outputs at ``N`` positions (``N×V`` logits or sparse distributions).
            weights: ``N×K`` weights from :meth:`forward`.
            temperature: The temperature τ of the loss that reads the result.

        Returns:
            ``τ·log Σₖ wₖ p_k^τ`` (``N×V``), sparse when every teacher is and their kept ids fit the vocabulary
                (:func:`mix_sparse`); ``mean_logits``: ``Σₖ wₖ z_k`` (dense).
        """
        sparse = [z for z in logits if isinstance(z, SparseDistribution)]
        if self.mode != "mean_logits" and len(sparse) == len(logits):
            if sum(z.ids.shape[-1] for z in sparse) <= sparse[0].vocab_size:
                return mix_sparse(sparse, weights, temperature)
        dense = [z.dense() if isinstance(z, SparseDistribution) else z.float() for z in logits]
        if self.mode == "mean_logits":
            return torch.einsum("nk,nkv->nv", weights, torch.stack(dense, dim=1))
        log_probs = torch.stack([(z / temperature).log_softmax(-1) for z in dense], dim=1)
        log_weights = weights.clamp(min=1e-30).log()[:, :, None]
        return temperature * torch.logsumexp(log_probs + log_weights, dim=1)  # -inf stays -inf: masked entries


def _evidence(logits: torch.Tensor | SparseDistribution, target: torch.Tensor):
    """Per position (``N``): the log-probability (temperature 1) of ``target``, the largest log-probability, and the
    entry that has it (-1 where a sparse teacher's remainder holds more than any kept entry)."""
    if not isinstance(logits, SparseDistribution):
        log_probs = logits.float().log_softmax(-1)
        top, predicted = log_probs.max(-1)
        return log_probs.gather(1, target[:, None]).squeeze(1), top, predicted
    softened = logits.softened(1.0)
    ids = softened.ids.long()
    at_target = torch.where(ids.eq(target[:, None]), softened.logprobs, float("-inf")).max(-1).values
    label_log_prob = torch.where(ids.eq(target[:, None]).any(-1), at_target, softened.fill)
    kept_top, where = softened.logprobs.max(-1)
    predicted = torch.where(kept_top >= softened.fill, ids.gather(1, where[:, None]).squeeze(1), -1)
    return label_log_prob, torch.maximum(kept_top, softened.fill), predicted


def mix_sparse(teachers: list[SparseDistribution], weights: torch.Tensor, temperature: float) -> SparseDistribution:
    """``Σₖ wₖ p_k^τ`` of ``N``-position sparse teachers (weights ``N×K``), itself sparse over the union of their
    ids, stored as ``τ·log`` so that a loss softening it at ``τ`` reads the mixture.

    Each teacher's p^τ is its remainder value u_k everywhere plus an excess (p_kj − u_k) at its kept ids, so the
    mixture is T = Σₖ wₖ u_k everywhere plus the weighted excesses summed per id. An id kept by several teachers
    is one entry; the slots its repeats leave hold fresh ids outside the union at the value T, so the ids stay
    distinct and ``K·k`` wide (this needs ``K·k ≤ V``: the r-th id missing from a row is below ``K·k``).

    Args:
        teachers: K sparse distributions over the same ``N`` positions and vocabulary.
        weights: ``N×K`` weights, summing to 1 per position.
        temperature: The temperature τ of the loss that reads the mixture.

    Returns:
        The mixture as a :class:`~hf_kd.features.SparseDistribution` with ``K·k`` ids per position.
    """
    softened = [teacher.softened(temperature) for teacher in teachers]
    width = sum(teacher.ids.shape[-1] for teacher in teachers)
    tail = sum(weights[:, k] * teacher.fill.exp() for k, teacher in enumerate(softened))  # N
    ids = torch.cat([teacher.ids.long() for teacher in softened], dim=-1)  # N×width
    excess = torch.cat(
        [weights[:, k, None] * (t.logprobs.exp() - t.fill.exp()[:, None]) for k, t in enumerate(softened)], dim=-1
    )
    ids, order = ids.sort(dim=-1)
    excess = excess.gather(1, order)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    group = (~repeat).cumsum(-1) - 1  # each entry's index among the row's distinct ids
    summed = torch.zeros_like(excess).scatter_add_(1, group, excess)
    value = (tail[:, None] + summed.gather(1, group)).clamp(min=0)
    # The j-th (from 0) integer missing from the sorted distinct ids u is j + #{i : u_i − i ≤ j}.
    vocab_size = teachers[0].vocab_size
    distinct = torch.full_like(ids, vocab_size).scatter_(1, group, ids)  # distinct ids first, then V
    positions = torch.arange(width, device=ids.device).expand_as(ids)
    gaps = torch.where(distinct < vocab_size, distinct - positions, vocab_size + width).contiguous()
    missing = positions + torch.searchsorted(gaps, positions.contiguous(), right=True)
    fresh = missing.gather(1, (repeat.cumsum(-1) - 1).clamp(min=0))
    ids = torch.where(repeat, fresh, ids)
    value = torch.where(repeat, tail[:, None], value)
    return SparseDistribution(ids, temperature * value.log(), temperature * tail.log(), vocab_size)
