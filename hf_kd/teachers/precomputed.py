"""Teacher predictions computed elsewhere: a teacher whose predictions travel with the rows (ranking scores, federated
clients' predictions), and the sparse top-k rows that a cache on disk or an inference engine holds of a teacher's
distribution (:func:`sparse_rows`, :func:`sparse_batch`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..features import SparseDistribution


class PrecomputedPredictions(nn.Module):
    """A teacher whose predictions were computed beforehand and travel with the rows as its view (:mod:`hf_kd.views`):
    the column ``teacher_COLUMN`` is returned as its logits — ranking scores, or the predictions a federated client
    sent for a public data set. Several such teachers (one column each) form a multi-teacher ensemble.

    Args:
        column: The view column (``teacher_COLUMN``) that holds the predictions.
        hint: How to give every row that column, for the error when a batch lacks it.
    """

    def __init__(self, column: str, hint: str = "give every row the teacher's predictions"):
        super().__init__()
        self.column, self.hint = column, hint
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # places the teacher (device, dtype)

    def forward(self, **view):
        if view.get(self.column) is None:
            raise ValueError(f"{type(self).__name__} reads the teacher_{self.column} column: {self.hint}.")
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=view[self.column].float())


def sparse_rows(
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    vocab_size: int,
    spread_tail: bool = True,
    tail: torch.Tensor | None = None,
) -> SparseDistribution:
    """Known entries of a teacher's distribution as one distribution: the form of a top-k teacher cache's rows and of
    an inference engine's top-k answer.

    Args:
        ids: N×k vocabulary ids.
        logprobs: N×k log-probabilities of those ids.
        vocab_size: V, the number of entries of the distribution.
        spread_tail: Spread the remaining mass uniformly over the other V − k entries (else they get probability 0:
            a sampled cache's empirical distribution).
        tail: The remaining mass of each row where it is known as such (a packed cache stores it): spread wherever
            it is above 0. ``None``: 1 − Σ exp(logprobs), spread where it is above 1e-6 (below, it is within the
            rounding of stored log-probabilities).

    Returns:
        The rows as one distribution (a :class:`~hf_kd.features.SparseDistribution`).
    """
    logprobs = logprobs.float()
    k = ids.shape[-1]
    if tail is None:
        tail, threshold = (1 - torch.logsumexp(logprobs, dim=-1).exp()).clamp(min=0), 1e-6
    else:
        tail, threshold = tail.float().clamp(min=0), 0.0
    if spread_tail and k < vocab_size:
        fill = torch.where(tail > threshold, torch.log(tail / (vocab_size - k)), torch.full_like(tail, float("-inf")))
    else:
        fill = torch.full_like(tail, float("-inf"))
    return SparseDistribution(ids.long(), logprobs, fill, vocab_size)


def sparse_batch(rows: SparseDistribution, mask: torch.Tensor, length: int) -> SparseDistribution:
    """Rows of some positions laid out as a batch of positions.

    Args:
        rows: One row per True entry of ``mask``, in row-major order.
        mask: B×W positions the rows belong to; W is T − 1 for causal LMs (the last position predicts nothing in
            the batch).
        length: T, the positions of each example.

    Returns:
        A B×T distribution whose positions outside the mask, which no loss reads, hold the uniform distribution
            (ids 0..k−1 and every other entry at log(1/V)).
    """
    batch, k, vocab_size = mask.shape[0], rows.ids.shape[-1], rows.vocab_size
    device = rows.ids.device
    uniform = -math.log(vocab_size)
    ids = torch.arange(k, device=device).expand(batch, length, k).clone()
    logprobs = torch.full((batch, length, k), uniform, device=device)
    fill = torch.full((batch, length), uniform, device=device)
    width = mask.shape[1]
    ids[:, :width][mask] = rows.ids
    logprobs[:, :width][mask] = rows.logprobs
    fill[:, :width][mask] = rows.fill
    return SparseDistribution(ids, logprobs, fill, vocab_size)
