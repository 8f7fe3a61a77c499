"""Which positions carry distillation, and the item counts the loss terms are normalised by.

Below the trainer: the trainer, the teacher cache's writer and its reader all decide positions here, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cross_tokenizer import aligned_positions
from .data import DISTILLATION_POSITIONS, SAMPLE_INDEX
from .views import split_views


@dataclass
class ItemCounts:
    """How many items the loss terms are normalised by, over every micro-batch of one optimizer step.

    Args:
        labels: The number of supervised label entries (for the student's own loss).
        positions: The number of positions that carry distillation (every example at sequence level, every
            supervised or attended token at token level).
        scale: The number of processes whose counts were summed, undoing DDP's gradient averaging.
    """

    labels: torch.Tensor
    positions: torch.Tensor
    scale: int = 1


def distillation_mask(inputs: dict, token_level: bool, shift: bool, by_labels: bool = True) -> torch.Tensor | None:
    """Bool mask of the positions that carry distillation, or ``None`` when every position does.

    Sequence level: every example (labeled or not, so unlabeled transfer data is distilled). Token level: the
    tokens a ``distillation_positions`` column marks, when the batch has one; else with ``by_labels`` (LMs):
    tokens with a label other than -100 when labels are given, else attended tokens; without ``by_labels`` (token
    classifiers): attended tokens, labeled or not.

    Args:
        inputs: The batch.
        token_level: Whether the logits are per token.
        shift: Causal LMs: drop the first position, since logits at position t predict token t + 1.
        by_labels: Token level: select the labeled tokens (LMs) rather than every attended one (token classifiers).

    Returns:
        ``B×T`` (``B×(T−1)`` shifted) bool, or ``None`` at sequence level or when the batch has no mask to go by.
    """
    if not token_level:
        return None
    labels = inputs.get("labels") if by_labels else None
    if DISTILLATION_POSITIONS in inputs:  # marked by the row itself (e.g. the first sub-token of every word)
        mask = inputs[DISTILLATION_POSITIONS]
    elif labels is not None:
        mask = labels.ne(-100)
    elif "decoder_input_ids" in inputs:
        mask = inputs.get("decoder_attention_mask")
    else:
        mask = inputs.get("attention_mask")
    if mask is None:
        return None
    mask = mask.bool()
    return mask[:, 1:] if shift else mask


def count_items(
    batches: list[dict], token_level: bool, shift: bool, by_labels: bool, device: torch.device, label_key: str
) -> torch.Tensor:
    """``[label entries, distilled positions]`` over ``batches`` (one process), summed where the batches live.

    No host sync. Batches whose ``label_key`` is set carry the student's own samples: no label loss.

    Args:
        batches: The micro-batches of one optimizer step.
        token_level: Whether the logits are per token.
        shift: Causal LMs: count positions shifted by one (see :func:`distillation_mask`).
        by_labels: See :func:`distillation_mask`.
        device: Where to sum.
        label_key: The batch key that marks on-policy batches (no label loss).

    Returns:
        A float32 tensor of 2 counts.
    """
    counts = torch.zeros(2, dtype=torch.float32, device=device)
    for batch in batches:
        if batch.get("labels") is not None and not batch.get(label_key):
            batch_labels = batch["labels"][..., 1:] if shift else batch["labels"]
            counts[0] += labeled_entries(batch_labels).sum().to(device)
        batch, teacher_batch = split_views(batch)
        mask = distillation_mask(batch, token_level, shift, by_labels)
        if teacher_batch is not None and mask is not None:  # different tokenizers: the aligned positions
            mask = aligned_positions(mask, distillation_mask(teacher_batch, token_level, shift, by_labels))[0]
        counts[1] += mask.sum().to(device) if mask is not None else num_positions(batch, token_level, shift)
    return counts


def labeled_entries(labels: torch.Tensor) -> torch.Tensor:
    """Which label entries are given.

    Args:
        labels: Class ids or tokens (-100 where none) or regression targets (NaN where none, see
            :func:`hf_kd.data.split_labeled_transfer`).

    Returns:
        A bool tensor of ``labels``' shape.
    """
    if labels.is_floating_point():
        return ~torch.isnan(labels)
    return labels.ne(-100)


def num_positions(batch: dict, token_level: bool, shift: bool) -> int:
    """Positions of a batch when every one carries distillation (no mask).

    Args:
        batch: The batch.
        token_level: Whether the logits are per token.
        shift: Causal LMs: one position fewer per sequence.

    Returns:
        The number of examples (sequence level) or of token positions.
    """
    first = next(value for value in batch.values() if torch.is_tensor(value))
    if not token_level:
        return first.shape[0]
    ids = batch.get("decoder_input_ids", batch.get("input_ids", first))
    return ids.shape[0] * (ids.shape[1] - 1 if shift else ids.shape[1])


def split_sample_index(inputs: dict) -> tuple[dict, torch.Tensor | None]:
    """The model inputs without the dataset-row column, and that column (None when absent).

    Args:
        inputs: The batch.

    Returns:
        ``(inputs, sample_index)``; ``inputs`` is a copy when the column was removed.
    """
    if SAMPLE_INDEX not in inputs:
        return inputs, None
    inputs = dict(inputs)
    return inputs, inputs.pop(SAMPLE_INDEX)
