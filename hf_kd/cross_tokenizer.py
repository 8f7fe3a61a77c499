"""Distillation between models with different tokenizers (vocabularies).

Each row carries the text tokenised twice: the student's ``input_ids`` / ``attention_mask`` / ``labels`` and the
teacher's ``teacher_input_ids`` / ``teacher_attention_mask`` / ``teacher_labels``
(:func:`add_teacher_tokenization`, padded by :class:`CrossTokenizerCollator`). The trainer runs the teacher on its
own tokens and aligns the supervised positions of the two sequences in order — the k-th supervised student token
with the k-th supervised teacher token, up to the shorter of the two, as in Boizard et al. 2024 — and a
vocabulary-free loss (``uld``) compares the aligned distributions.
"""

from __future__ import annotations

import functools

import torch
from datasets import Dataset

from .views import TEACHER_PREFIX, ViewCollator, pad_rows


def aligned_positions(student_mask: torch.Tensor, teacher_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks keeping, per row, the first min(nₛ, nₜ) supervised positions of each side.

    So ``student[keep_s]`` and ``teacher[keep_t]`` list aligned positions in the same order.

    Args:
        student_mask: ``B×Tₛ`` bool, the student's supervised positions.
        teacher_mask: ``B×Tₜ`` bool, the teacher's.

    Returns:
        ``(keep_s, keep_t)``, of the two masks' shapes.
    """
    student_mask, teacher_mask = student_mask.bool(), teacher_mask.bool()
    common = torch.minimum(student_mask.sum(1), teacher_mask.sum(1))[:, None]
    keep_student = student_mask & (student_mask.long().cumsum(1) <= common)
    keep_teacher = teacher_mask & (teacher_mask.long().cumsum(1) <= common)
    return keep_student, keep_teacher


def add_teacher_tokenization(
    dataset: Dataset,
    student_tokenizer,
    teacher_tokenizer,
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    max_length: int = 512,
) -> Dataset:
    """Rows with the student's and the teacher's tokenisation of ``prompt + completion``.

    Labels are on the completion only (-100 on the prompt), ready for ``uld`` distillation between different
    tokenizers; the teacher's columns carry the ``teacher_`` prefix.

    Args:
        dataset: Rows with a prompt and a completion column.
        student_tokenizer: The student's tokenizer.
        teacher_tokenizer: The teacher's tokenizer.
        prompt_column: The prompt column.
        completion_column: The completion column.
        max_length: Tokens kept per row and side.

    Returns:
        The tokenised data set.
    """
    from .generation import tokenize_prompt_completion

    student = tokenize_prompt_completion(
        dataset,
        student_tokenizer,
        prompt_column=prompt_column,
        completion_column=completion_column,
        max_length=max_length,
    )
    teacher = tokenize_prompt_completion(
        dataset,
        teacher_tokenizer,
        prompt_column=prompt_column,
        completion_column=completion_column,
        max_length=max_length,
    )
    for column in teacher.column_names:
        student = student.add_column(TEACHER_PREFIX + column, teacher[column])
    return student


class CrossTokenizerCollator(ViewCollator):
    """Right-pads the student's and the teacher's columns of a batch, each with its own pad id.

    ``attention_mask`` and ``distillation_positions`` are padded with 0, ``labels`` with -100; other columns are
    stacked as they are.

    Args:
        student_pad_id: The student tokenizer's pad id.
        teacher_pad_id: The teacher tokenizer's pad id.
    """

    def __init__(self, student_pad_id: int, teacher_pad_id: int):
        super().__init__(
            functools.partial(pad_rows, pad_id=student_pad_id), functools.partial(pad_rows, pad_id=teacher_pad_id)
        )
