"""Token-level distillation from final hidden states and LM heads, chunk by chunk.

The B×T×V logits of neither model are ever held whole: for each chunk of ``chunk_size`` supervised positions the
student's and teacher's logits are computed from their final hidden states (each model's own logits:
:class:`~hf_kd.losses.lm_head.LogitsHead`), every response loss (and the label
cross-entropy) is summed over the chunk, and the chunk's logits are freed; in the backward pass each chunk's
student logits are recomputed (activation checkpointing). Values and gradients equal the plain path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..features import ModelFeatures
from .lm_head import FSDPModule, LogitsHead  # noqa: F401  (FSDPModule: re-exported)


def chunked_token_terms(
    student_hidden: torch.Tensor,
    teacher_rows: tuple[torch.Tensor, ...],
    targets: torch.Tensor | None,
    *,
    student_head: LogitsHead,
    teacher_logits: Callable[..., torch.Tensor] | None,
    losses: list,
    with_label_loss: bool,
    chunk_size: int,
    min_chunks: int = 0,
) -> torch.Tensor:
    """Sums over positions of ``[label CE (if with_label_loss), loss₁, loss₂, ...]``, computed chunk by chunk.

    ``student_head`` is the student's own hidden → logits map (:class:`~hf_kd.losses.lm_head.LogitsHead`).
    ``student_hidden`` holds the final hidden states of the N supervised positions (N×H); ``teacher_rows`` one
    row per position of whatever the teacher's logits are made from (its hidden states, or cached top-k ids and
    log-probs), turned into logits chunk by chunk by ``teacher_logits(*rows)`` under ``no_grad``; ``targets``
    the next-token ids (N), needed for the label loss and ``dkd``. ``min_chunks`` pads the loop with empty chunks:
    with sharded LM heads (ZeRO-3) every process must call them the same number of times, whatever its token count.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}.")
    terms = functools.partial(
        _chunk_terms,
        student_head=student_head,
        teacher_logits=teacher_logits,
        losses=losses,
        with_label_loss=with_label_loss,
    )
    totals = []
    num_chunks = max(-(-len(student_hidden) // chunk_size), min_chunks)
    for start in range(0, num_chunks * chunk_size, chunk_size):
        stop = start + chunk_size
        chunk_targets = None if targets is None else targets[start:stop]
        rows = [row[start:stop] for row in teacher_rows]
        totals.append(checkpoint(terms, student_hidden[start:stop], chunk_targets, *rows, use_reentrant=False))
    if not totals:  # no supervised position in this batch
        size = len(losses) + int(with_label_loss)
        return student_hidden.sum() * 0 + torch.zeros(size, device=student_hidden.device)
    return torch.stack(totals).sum(0)


def _chunk_terms(student_hidden, targets, *teacher_rows, student_head, teacher_logits, losses, with_label_loss):
    student_logits = student_head(student_hidden)
    values = []
    if with_label_loss:
        values.append(F.cross_entropy(student_logits.float(), targets, ignore_index=-100, reduction="sum"))
    if losses:
        with torch.no_grad():
            teacher = teacher_logits(*teacher_rows)
        if student_logits.shape[-1] != teacher.shape[-1]:
            raise ValueError(
                f"the student has {student_logits.shape[-1]} vocabulary entries and the teacher "
                f"{teacher.shape[-1]}: logit-based losses need the same tokenizer; for different tokenizers use "
                "the uld loss with teacher_input_ids (see hf_kd.cross_tokenizer)."
            )
        student, teacher = ModelFeatures(logits=student_logits), ModelFeatures(logits=teacher)
        for loss in losses:
            values.append(loss(student, teacher, labels=targets))
    return torch.stack(values)
