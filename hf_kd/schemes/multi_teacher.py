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
"""

from __future__ import annotations

import torch
from torch import nn

AGGREGATIONS = ("mean_probs", "mean_logits", "weighted", "adaptive", "best")
ENSEMBLE = "ensemble"  # the name under which the combined teacher is read by the terms


class TeacherAggregator(nn.Module):
    """Weights over ``names`` per position and the combined logits; holds the running reliability (per teacher, the
    summed cross-entropy on labeled positions and their count) as buffers, so it checkpoints and resumes."""

    def __init__(
        self,
        names: list[str],
        mode: str = "mean_probs",
        static_weights: list[float] | None = None,
        weight_temperature: float = 1.0,
        use_confidence: bool = False,
    ):
        super().__init__()
        if mode not in AGGREGATIONS:
            raise ValueError(f"teacher_aggregation must be one of {AGGREGATIONS}, got {mode!r}.")
        self.names, self.mode = list(names), mode
        self.weight_temperature, self.use_confidence = weight_temperature, use_confidence
        if mode == "weighted":
            if static_weights is None or len(static_weights) != len(names):
                raise ValueError(
                    f"teacher_aggregation='weighted' needs teacher_weights with one weight per teacher {self.names}, "
                    f"got {static_weights}."
                )
            total = sum(static_weights)
            self.register_buffer("static", torch.tensor([w / total for w in static_weights]), persistent=False)
        self.register_buffer("ce_sum", torch.zeros(len(names), dtype=torch.float64))
        self.register_buffer("ce_count", torch.zeros((), dtype=torch.float64))

    @classmethod
    def from_config(cls, names: list[str], args) -> TeacherAggregator:
        """The aggregator ``args`` (a :class:`~hf_kd.DistillationConfig`) asks for over the teachers ``names``."""
        return cls(
            names, args.teacher_aggregation, args.teacher_weights, args.adaptive_temperature, args.adaptive_confidence
        )

    def forward(self, logits: list[torch.Tensor], labels: torch.Tensor | None, accelerator=None) -> torch.Tensor:
        """``N×K`` weights for the teachers' ``N×V`` logits at ``N`` positions (labels ``N``, -100 where none);
        in training also updates the running reliability from the labeled positions (summed over processes)."""
        count = logits[0].shape[0]
        device = logits[0].device
        if self.mode in ("mean_probs", "mean_logits"):
            return torch.full((count, len(logits)), 1.0 / len(logits), device=device)
        if self.mode == "weighted":
            return self.static.to(device).expand(count, -1)
        log_probs = torch.stack([z.float().log_softmax(-1) for z in logits], dim=1)  # N×K×V, temperature 1
        labeled = labels.ne(-100) if labels is not None else torch.zeros(count, dtype=torch.bool, device=device)
        target = labels.clamp(min=0) if labels is not None else torch.zeros(count, dtype=torch.long, device=device)
        label_log_probs = log_probs.gather(2, target[:, None, None].expand(-1, len(logits), 1)).squeeze(2)  # N×K
        if self.training:
            self._update(-label_log_probs[labeled], accelerator)
        mean_ce = self.ce_sum / self.ce_count.clamp(min=1)  # K; all equal before any label was seen
        if self.mode == "best":
            right = log_probs.argmax(-1).eq(target[:, None])
            per_position = (label_log_probs.exp() + right.float()).argmax(1)  # right teachers first
            fallback = mean_ce.argmin().expand(count).to(device)
            chosen = torch.where(labeled, per_position, fallback)
            return nn.functional.one_hot(chosen, len(logits)).float()
        labeled_scores = label_log_probs / self.weight_temperature  # −CE/τ_w
        unlabeled_scores = (-mean_ce / self.weight_temperature).float().to(device).expand(count, -1)
        if self.use_confidence:
            unlabeled_scores = unlabeled_scores + log_probs.max(-1).values
        scores = torch.where(labeled[:, None], labeled_scores, unlabeled_scores)
        return scores.softmax(-1)

    def _update(self, ce: torch.Tensor, accelerator) -> None:
        stats = torch.cat([ce.sum(0).double(), ce.new_tensor([ce.shape[0]]).double()])
        if accelerator is not None and accelerator.num_processes > 1:  # every process: same micro-batch count
            stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum")
        self.ce_sum += stats[:-1].to(self.ce_sum.device)
        self.ce_count += stats[-1].to(self.ce_count.device)

    def combine(self, logits: list[torch.Tensor], weights: torch.Tensor, temperature: float) -> torch.Tensor:
        """The combined teacher as logits that a loss at ``temperature`` softens into ``Σₖ wₖ p_k^τ``
        (``τ·log Σₖ wₖ p_k^τ``); ``mean_logits``: ``Σₖ wₖ z_k``."""
        if self.mode == "mean_logits":
            return torch.einsum("nk,nkv->nv", weights, torch.stack([z.float() for z in logits], dim=1))
        log_probs = torch.stack([(z.float() / temperature).log_softmax(-1) for z in logits], dim=1)
        log_weights = weights.clamp(min=1e-30).log()[:, :, None]
        return temperature * torch.logsumexp(log_probs + log_weights, dim=1)  # -inf stays -inf: masked entries
