"""Input views: one row, one view of it per model.

A row's plain columns are the student's inputs; its columns prefixed ``teacher_`` are the teacher's, read with the
prefix dropped. The two views are the same example seen twice: the teacher's own tokenisation of the same text
(:mod:`hf_kd.cross_tokenizer`, :mod:`hf_kd.token_classification`), or another modality of it — the token ids of a
sentence for a text teacher while the student hears it spoken (:mod:`hf_kd.schemes.cross_modal`). The teacher never
receives the student's view and the student never the teacher's. Labels stay with the student (a teacher reads
``teacher_labels`` only where its own positions need them, to align tokenisations).

Sequence-level models (one prediction per example) compare their outputs as they are; token-level models with
different views align the k-th distilled position of each side (:func:`hf_kd.cross_tokenizer.aligned_positions`).

A model can also read one row as several views: :class:`TokenWindows` cuts each long row into windows of the length a
teacher was trained on, over which :func:`hf_kd.schemes.noisy_student.pseudo_label` averages its predictions
(:func:`crop_tokens` is the cut it shares with the student's random crop, :class:`hf_kd.noise.TokenCrop`).
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


def crop_tokens(
    batch: dict,
    length: int,
    protected_ids: torch.Tensor,
    pad_token_id: int,
    start_of: Callable[[int], int],
    owner: str,
) -> dict:
    """``batch`` with each row longer than ``length`` tokens cut to one window of it: its leading and trailing
    special tokens and a contiguous run of the tokens between them (what :class:`~hf_kd.noise.TokenCrop` and
    :class:`TokenWindows` share). Every per-token field is cut alike and the batch shrinks to its longest kept row,
    padded on the side it was padded on; rows of at most ``length`` tokens are kept whole.

    Args:
        batch: A batch with ``input_ids`` (and, optionally, ``attention_mask`` and other per-token fields).
        length: The tokens kept per row, special tokens included.
        protected_ids: The special token ids kept in place at the ends of each row.
        pad_token_id: The id that pads the cut rows.
        start_of: ``start_of(slack)`` picks where a row's run starts among its ``slack + 1`` possible starts.
        owner: The class that cuts, as the errors name it.

    Returns:
        A new batch whose per-token fields are cut; every other field is untouched.

    Raises:
        ValueError: per-token labels, or a row whose special tokens leave no room within ``length``.
    """
    input_ids = batch["input_ids"]
    if "attention_mask" not in batch:  # the cut rows differ in length: they need one
        batch = {**batch, "attention_mask": torch.ones_like(input_ids)}
    per_token = [name for name, value in batch.items() if torch.is_tensor(value) and value.shape == input_ids.shape]
    if "labels" in per_token:
        raise ValueError(
            f"{owner} moves tokens, so it cannot keep per-token labels aligned; use it for models with one output "
            "per row (sequence classification, embeddings)."
        )
    attention_mask = batch["attention_mask"].bool()
    protected = torch.isin(input_ids, protected_ids.to(input_ids.device)) & attention_mask
    left_padded = bool((~attention_mask[:, 0] & attention_mask.any(dim=1)).any())
    kept = [
        _window(row_mask, row_protected, length, start_of, owner)
        for row_mask, row_protected in zip(attention_mask, protected)
    ]
    width = max(len(positions) for positions in kept)
    cut = dict(batch)
    for name in per_token:
        fill = pad_token_id if name == "input_ids" else 0
        rows = batch[name].new_full((len(kept), width), fill)
        for row, positions in enumerate(kept):
            start = width - len(positions) if left_padded else 0
            rows[row, start : start + len(positions)] = batch[name][row, positions]
        cut[name] = rows
    return cut


def _window(
    attention_mask: torch.Tensor, protected: torch.Tensor, length: int, start_of: Callable[[int], int], owner: str
) -> torch.Tensor:
    """The positions one row keeps: its protected ends and a run of ``length`` minus those between them."""
    positions = attention_mask.nonzero().flatten()
    if len(positions) <= length:
        return positions
    ends = protected[positions]
    head = int(ends.int().cumprod(0).sum())  # special tokens leading the row
    tail = int(ends.flip(0).int().cumprod(0).sum())  # and trailing it
    room = length - head - tail
    if room < 1:
        raise ValueError(
            f"{owner}(length={length}) leaves no room for text in a row that starts with {head} and ends with {tail} "
            "special tokens; use a larger length."
        )
    middle = positions[head : len(positions) - tail]
    start = start_of(len(middle) - room)
    return torch.cat([positions[:head], middle[start : start + room], positions[len(positions) - tail :]])


class TokenWindows:
    """``count`` windows of ``length`` tokens spread evenly over each longer row — the first at the start of its text,
    the last at its end, each with the row's special tokens at its ends — as a list of batches: the views over which
    :func:`~hf_kd.schemes.noisy_student.pseudo_label` averages a teacher's probabilities. A teacher trained on
    ``length``-token inputs then labels a whole document from readings like those it learned from, rather than from
    its first ``length`` tokens or from a longer input it never saw in training. A row of at most ``length`` tokens
    is the same in every view (its mean is its one prediction); a batch without a longer row is one view.

    Args:
        length: The tokens per window, special tokens included; >= 1 more than the special tokens a row carries.
        count: The windows per row, >= 1 (1: the start of the text only).
        protected_ids: The special token ids kept in place at the ends of each window.
        pad_token_id: The id that pads the windows.

    Raises:
        ValueError: ``length`` or ``count`` < 1.
    """

    def __init__(self, length: int, count: int, protected_ids=(), pad_token_id: int = 0):
        if length < 1 or count < 1:
            raise ValueError(f"TokenWindows needs length >= 1 and count >= 1, got length={length}, count={count}.")
        self.length, self.count, self.pad_token_id = int(length), int(count), int(pad_token_id)
        self.protected_ids = torch.tensor(sorted(set(protected_ids)), dtype=torch.long)

    @classmethod
    def from_tokenizer(cls, tokenizer, length: int, count: int) -> TokenWindows:
        """Windows that keep a tokenizer's special tokens at their ends and pad with its pad token.

        Args:
            tokenizer: A transformers tokenizer.
            length: The tokens per window, special tokens included.
            count: The windows per row.

        Returns:
            The views.
        """
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(length, count, tokenizer.all_special_ids, pad)

    def __call__(self, batch: dict) -> list[dict]:
        """The batch's ``count`` views, the k-th holding each row's k-th window.

        Args:
            batch: A batch with ``input_ids`` (and, optionally, ``attention_mask`` and other per-token fields).

        Returns:
            ``count`` new batches (one when no row is longer than ``length``: its views would all be the same);
                fields that are not per token are the batch's own.

        Raises:
            ValueError: the batch has no ``input_ids``, its labels are per token, or a row's special tokens leave no
                room within ``length``.
        """
        if "input_ids" not in batch:
            raise ValueError(f"TokenWindows cuts 'input_ids', which this batch does not have (it has {sorted(batch)}).")
        mask = batch.get("attention_mask")
        longest = int(mask.sum(1).max()) if mask is not None else batch["input_ids"].shape[1]
        count = self.count if longest > self.length else 1  # (a teacher forward per identical view is wasted)
        return [
            crop_tokens(
                batch,
                self.length,
                self.protected_ids,
                self.pad_token_id,
                lambda slack, k=k: round(k * slack / (count - 1)) if count > 1 else 0,
                "TokenWindows",
            )
            for k in range(count)
        ]

    def __repr__(self) -> str:
        return f"TokenWindows(length={self.length}, count={self.count})"
