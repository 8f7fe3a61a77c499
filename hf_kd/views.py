"""Input views: one row, one view of it per model.

A row's plain columns are the student's inputs; its columns prefixed ``teacher_`` are the teacher's, read with the
prefix dropped. The two views are the same example seen twice: the teacher's own tokenisation of the same text
(:mod:`hf_kd.cross_tokenizer`, :mod:`hf_kd.token_classification`), or another modality of it — the token ids of a
sentence for a text teacher while the student hears it spoken (:mod:`hf_kd.schemes.cross_modal`). The teacher never
receives the student's view and the student never the teacher's. Labels stay with the student (a teacher reads
``teacher_labels`` only where its own positions need them, to align tokenisations).

Sequence-level models (one prediction per example) compare their outputs as they are; token-level models with
different views align the k-th distilled position of each side (:func:`hf_kd.cross_tokenizer.aligned_positions`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from datasets import Dataset

TEACHER_PREFIX = "teacher_"
#: Padding of the columns whose fill is not the tokenizer's pad id.
PAD_FILLS = {"attention_mask": 0, "labels": -100, "distillation_positions": 0}


def has_teacher_view(columns) -> bool:
    """Whether a batch (or a data set's column names) carries a teacher view.

    Args:
        columns: A batch's keys or a data set's column names.

    Returns:
        True when a column starts with ``teacher_``.
    """
    return any(isinstance(key, str) and key.startswith(TEACHER_PREFIX) for key in columns)


def split_views(inputs: dict) -> tuple[dict, dict | None]:
    """The student's view and the teacher's view of a batch.

    Args:
        inputs: A batch or a row.

    Returns:
        ``(student, teacher)``; the teacher's is ``None`` when the batch has no ``teacher_*`` column (both models then
            read the same inputs), else its columns without the prefix.
    """
    if not has_teacher_view(inputs):
        return inputs, None
    student = {key: value for key, value in inputs.items() if not key.startswith(TEACHER_PREFIX)}
    teacher = {key[len(TEACHER_PREFIX) :]: value for key, value in inputs.items() if key.startswith(TEACHER_PREFIX)}
    return student, teacher


def add_teacher_view(dataset: Dataset, teacher_view: Dataset | dict[str, list]) -> Dataset:
    """``dataset`` (the student's view) with the columns of ``teacher_view`` added as ``teacher_COLUMN``, row for row.

    Args:
        dataset: The student's view.
        teacher_view: The teacher's view of the same rows: a data set or a dict of columns.

    Returns:
        The data set with both views (existing ``teacher_*`` columns of the same names are replaced).

    Raises:
        ValueError: the teacher's view has no columns, or a column with another number of rows.
    """
    columns = teacher_view.column_names if isinstance(teacher_view, Dataset) else list(teacher_view)
    if not columns:
        raise ValueError("the teacher's view has no columns.")
    for column in columns:
        values = teacher_view[column]
        if len(values) != len(dataset):
            raise ValueError(
                f"the teacher's view has {len(values)} rows in {column!r} for the student's {len(dataset)}; give one "
                "per row of the same examples."
            )
        name = TEACHER_PREFIX + column
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, list(values))
    return dataset


def pad_rows(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads the list columns of ``rows``; other columns are stacked as they are.

    Args:
        rows: Rows of one view.
        pad_id: The fill of the list columns other than ``attention_mask`` and ``distillation_positions`` (0) and
            ``labels`` (-100).

    Returns:
        The batch, one tensor per column.
    """
    batch = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if not isinstance(values[0], (list, tuple)):
            batch[key] = torch.tensor(values)
            continue
        fill = PAD_FILLS.get(key, pad_id)
        width = max(len(value) for value in values)
        batch[key] = torch.tensor([list(value) + [fill] * (width - len(value)) for value in values])
    return batch


class ViewCollator:
    """Collates each view of the rows with its own collator.

    ``student`` gets the plain columns, ``teacher`` the ``teacher_*`` columns without the prefix (e.g. a feature
    extractor's padding for audio and a tokenizer's for text); the teacher's batch comes back under the prefix.

    Args:
        student: A collator (a callable on a list of rows) for the student's view.
        teacher: A collator for the teacher's view.

    Raises:
        TypeError: a collator that is not callable.
    """

    def __init__(self, student: Callable[[list[dict]], dict], teacher: Callable[[list[dict]], dict]):
        if not callable(student) or not callable(teacher):
            raise TypeError("ViewCollator takes one collator (a callable on a list of rows) per view.")
        self.student, self.teacher = student, teacher

    def __call__(self, rows: list[dict]) -> dict:
        """Collate the rows' two views into one batch.

        Args:
            rows: The rows; either every row has a teacher view or none has (a set for the student alone).

        Returns:
            The student's batch, plus the teacher's under the ``teacher_`` prefix.

        Raises:
            ValueError: some rows have a teacher view and others do not.
        """
        views = [split_views(row) for row in rows]
        batch = dict(self.student([student for student, _ in views]))
        missing = sum(teacher is None for _, teacher in views)
        if missing == len(rows):  # e.g. an evaluation set for the student alone
            return batch
        if missing:
            raise ValueError(
                f"{missing} of the batch's {len(rows)} rows have no teacher_* columns: every row of a paired data set "
                "needs the teacher's view."
            )
        teacher = self.teacher([teacher for _, teacher in views])
        batch.update({TEACHER_PREFIX + key: value for key, value in teacher.items()})
        return batch
