"""Cross-modal distillation: the teacher sees one modality of an example, the student another — a text classifier
teaches a speech classifier through the sentence and its spoken form (Gupta et al. 2016, *Cross Modal Distillation
for Supervision Transfer*; the survey's cross-modal scheme).

A paired row carries both views (:mod:`hf_kd.views`): the student's columns (``input_values`` of the audio) and the
teacher's as ``teacher_*`` columns (``teacher_input_ids``, ``teacher_attention_mask`` of the text). The trainer runs
each model on its own view only. Logit losses compare the two models' predictions over the shared label set; feature
and relation losses compare pooled embeddings (``source="hidden_states:-1"`` with a pooling; a speech encoder's
frames are pooled over its own frame mask) — feature maps of different shapes meet only through projectors or
pooling, as between any two architectures.

    from hf_kd.schemes.cross_modal import CrossModalCollator, cross_modal, paired_views

    rows = paired_views(audio_rows, text_rows)       # audio_rows: input_values, labels; text_rows: input_ids, ...
    trainer = cross_modal(speech_student, text_teacher, args, train_dataset=rows,
                          data_collator=CrossModalCollator(feature_extractor, tokenizer))
    trainer.train()
"""

from __future__ import annotations

import inspect

from datasets import Dataset
from torch import nn

from ..config import DistillationConfig
from ..trainer import DistillationTrainer
from ..views import TEACHER_PREFIX, ViewCollator, add_teacher_view, has_teacher_view, split_views

#: Columns that are never a model's input but ride along with a view (the trainer reads them itself).
_NOT_INPUTS = {"labels", "label", "sample_index", "distillation_positions"}


def paired_views(student_rows: Dataset, teacher_rows: Dataset) -> Dataset:
    """One data set of paired rows: ``student_rows``' columns (the student's modality, with the labels) and
    ``teacher_rows``' columns as the teacher's view, row ``i`` of each being the same example. Labels belong to the
    student's view; the teacher's rows must not carry any (the teacher learns nothing here)."""
    given = {"labels", "label"} & set(teacher_rows.column_names)
    if given:
        raise ValueError(
            f"the teacher's rows carry {sorted(given)}: labels go with the student's view (the teacher is frozen and "
            "never reads them). Drop the column from the teacher's rows."
        )
    if has_teacher_view(student_rows.column_names):
        raise ValueError("the student's rows already have teacher_* columns: give each view's rows once.")
    return add_teacher_view(student_rows, teacher_rows)


class CrossModalCollator(ViewCollator):
    """Pads each view with its own processor: the student's with ``student_processor`` (a feature extractor or
    processor with ``pad``, e.g. ``Wav2Vec2FeatureExtractor``; or a tokenizer), the teacher's with
    ``teacher_processor`` (e.g. the text teacher's tokenizer). Labels stay with the student's view."""

    def __init__(self, student_processor, teacher_processor):
        super().__init__(_padder(student_processor, "student"), _padder(teacher_processor, "teacher"))


def _padder(processor, side: str):
    if not hasattr(processor, "pad"):
        raise TypeError(
            f"the {side}'s processor must have a pad method (a tokenizer or feature extractor), got "
            f"{type(processor).__name__}."
        )

    def pad(rows: list[dict]) -> dict:
        return dict(processor.pad(rows, return_tensors="pt"))

    return pad


def check_views(student: nn.Module, teacher: nn.Module, columns) -> None:
    """Each model's forward takes its own view's columns: an error names a column a model would not read, and a
    data set without a teacher view."""
    columns = list(columns)
    if not has_teacher_view(columns):
        raise ValueError(
            "cross-modal distillation needs the teacher's view in every row (teacher_* columns, e.g. "
            "teacher_input_ids of the text while the student reads input_values of the audio): build the rows with "
            "hf_kd.schemes.cross_modal.paired_views."
        )
    student_view, teacher_view = split_views(dict.fromkeys(columns))
    for side, model, view in (("student", student, student_view), ("teacher", teacher, teacher_view)):
        taken = set(inspect.signature(model.forward).parameters)
        unread = sorted(set(view) - taken - _NOT_INPUTS)
        if unread:
            prefix = TEACHER_PREFIX if side == "teacher" else ""
            raise ValueError(
                f"the {side} ({type(model).__name__}) does not take {[prefix + c for c in unread]} from its view: "
                f"the {side}'s columns must be inputs of its forward ({sorted(taken - {'kwargs', 'self'})[:8]}…)."
            )


def cross_modal(
    student: nn.Module, teacher: nn.Module, args: DistillationConfig, *, train_dataset: Dataset, **kwargs
) -> DistillationTrainer:
    """A :class:`~hf_kd.DistillationTrainer` for paired rows, checked up front: every given data set has the
    teacher's view, and each model takes its view's columns."""
    for dataset in (train_dataset, *_eval_sets(kwargs.get("eval_dataset"))):
        check_views(student, teacher, dataset.column_names)
    return DistillationTrainer(student, teacher, args, train_dataset=train_dataset, **kwargs)


def _eval_sets(eval_dataset) -> list:
    if eval_dataset is None:
        return []
    return list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]
