"""Cross-modal distillation: the teacher sees one modality of an example, the student another — a text classifier
teaches a speech classifier through the sentence and its spoken form (Gupta et al. 2016, *Cross Modal Distillation
for Supervision Transfer*; the survey's cross-modal scheme).

A paired row carries both views (:mod:`hf_kd.views`): the student's columns (``input_values`` of the audio) and the
teacher's as ``teacher_*`` columns (``teacher_input_ids``, ``teacher_attention_mask`` of the text). The trainer runs
each model on its own view only. Logit losses compare the two models' predictions over the shared label set; feature
and relation losses compare pooled embeddings (``source="hidden_states:-1"`` with a pooling; a speech encoder's
frames are pooled over its own frame mask) — feature maps of different shapes meet only through projectors or
pooling, as between any two architectures. The student may be a PEFT model (a LoRA speech student); every row's
audio must be long enough for its feature encoder to make a frame of it (:func:`min_input_length`), else
:func:`cross_modal` refuses the row before training.

    from hf_kd.schemes.cross_modal import CrossModalCollator, cross_modal, paired_views

    rows = paired_views(audio_rows, text_rows)       # audio_rows: input_values, labels; text_rows: input_ids, ...
    trainer = cross_modal(speech_student, text_teacher, args, train_dataset=rows,
                          data_collator=CrossModalCollator(feature_extractor, tokenizer))
    trainer.train()
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from datasets import Dataset
from torch import nn

from ..config import DistillationConfig
from ..data import list_lengths
from ..model_kinds import base_model
from ..trainer import DistillationTrainer
from ..views import TEACHER_PREFIX, ViewCollator, add_teacher_view, has_teacher_view, split_views
from .registry import SchemeConfig, SchemeInputs, SchemeResult, register_scheme

#: Columns that are never a model's input but ride along with a view (the trainer reads them itself).
_NOT_INPUTS = {"labels", "label", "sample_index", "distillation_positions"}


def paired_views(student_rows: Dataset, teacher_rows: Dataset) -> Dataset:
    """One data set of paired rows: ``student_rows``' columns (the student's modality, with the labels) and
    ``teacher_rows``' columns as the teacher's view, row ``i`` of each being the same example. Labels belong to the
    student's view; the teacher's rows must not carry any (the teacher learns nothing here).

    Args:
        student_rows: the student's modality (e.g. ``input_values`` of the audio), with the labels.
        teacher_rows: the teacher's modality (e.g. ``input_ids`` of the text), row for row, without labels.

    Returns:
        The student's rows with the teacher's columns added as ``teacher_*``.

    Raises:
        ValueError: the teacher's rows carry labels, or the student's rows already have ``teacher_*`` columns.
    """
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
    ``teacher_processor`` (e.g. the text teacher's tokenizer). Labels stay with the student's view.

    Args:
        student_processor: pads the student's view (it must have ``pad``).
        teacher_processor: pads the teacher's view (it must have ``pad``).

    Raises:
        TypeError: a processor without a ``pad`` method.
    """

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
    data set without a teacher view. A PEFT-wrapped model is judged by the model under its adapters.

    Args:
        student: the student (or its PEFT wrapper).
        teacher: the teacher.
        columns: the data set's column names.

    Raises:
        ValueError: no ``teacher_*`` column, or a view's column that its model's forward does not take.
    """
    columns = list(columns)
    if not has_teacher_view(columns):
        raise ValueError(
            "cross-modal distillation needs the teacher's view in every row (teacher_* columns, e.g. "
            "teacher_input_ids of the text while the student reads input_values of the audio): build the rows with "
            "hf_kd.schemes.cross_modal.paired_views."
        )
    student_view, teacher_view = split_views(dict.fromkeys(columns))
    for side, model, view in (("student", student, student_view), ("teacher", teacher, teacher_view)):
        taken = set(inspect.signature(base_model(model).forward).parameters)  # PeftModel.forward takes **kwargs
        unread = sorted(set(view) - taken - _NOT_INPUTS)
        if unread:
            prefix = TEACHER_PREFIX if side == "teacher" else ""
            raise ValueError(
                f"the {side} ({type(model).__name__}) does not take {[prefix + c for c in unread]} from its view: "
                f"the {side}'s columns must be inputs of its forward ({sorted(taken - {'kwargs', 'self'})[:8]}…)."
            )


def min_input_length(model: nn.Module) -> int | None:
    """The fewest input samples from which the model's convolutional feature encoder makes one frame (wav2vec 2.0,
    HuBERT, WavLM, …: ``config.conv_kernel`` / ``conv_stride``); None for a model without one. Each layer turns
    ``n`` samples into ``(n - kernel) // stride + 1`` frames, so one frame out needs ``(1 - 1)·s + k`` in, and so on
    back to the waveform.

    Args:
        model: the model (or its PEFT wrapper).

    Returns:
        The number of samples, or None when the model's config has no ``conv_kernel`` / ``conv_stride``.
    """
    config = getattr(base_model(model), "config", None)
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides:
        return None
    length = 1
    for kernel, stride in reversed(list(zip(kernels, strides))):
        length = (length - 1) * stride + kernel
    return length


def check_input_lengths(student: nn.Module, teacher: nn.Module, dataset, name: str = "train_dataset") -> None:
    """Every row's audio is long enough for its model's feature encoder to make a frame of it (see
    :func:`min_input_length`): a shorter row would be all padding after the convolutions — trained on silently
    within a batch, a raw convolution error in a batch of its own.

    Args:
        student: the student, which reads ``input_values``.
        teacher: the teacher, which reads ``teacher_input_values``.
        dataset: the paired rows.
        name: the data set's name in the error.

    Raises:
        ValueError: a row shorter than its model's minimum (the message names the row and the minimum).
    """
    columns = getattr(dataset, "column_names", None) or []
    for side, model, column in (
        ("student", student, "input_values"),
        ("teacher", teacher, TEACHER_PREFIX + "input_values"),
    ):
        need = None if column not in columns else min_input_length(model)
        if need is None:
            continue
        short = [(index, length) for index, length in enumerate(list_lengths(dataset, column)) if (length or 0) < need]
        if short:
            (index, length), config = short[0], base_model(model).config
            others = f" (and {len(short) - 1} more rows)" if len(short) > 1 else ""
            raise ValueError(
                f"row {index} of {name} has {length or 0} samples in {column!r}{others}: the {side}'s feature encoder "
                f"({type(base_model(model)).__name__}: conv kernels {tuple(config.conv_kernel)}, strides "
                f"{tuple(config.conv_stride)}) needs at least {need} samples to make one frame, so the row would be "
                f"all padding. Drop or lengthen rows shorter than {need} samples, e.g. "
                f"dataset.filter(lambda row: len(row[{column!r}]) >= {need})."
            )


def cross_modal(
    student: nn.Module, teacher: nn.Module, args: DistillationConfig, *, train_dataset: Dataset, **kwargs
) -> DistillationTrainer:
    """A :class:`~hf_kd.DistillationTrainer` for paired rows, checked up front: every given data set has the
    teacher's view, each model takes its view's columns, and every row's audio makes at least one frame. The
    student may be wrapped by PEFT (a LoRA speech student).

    Args:
        student: the student, reading its view (e.g. audio).
        teacher: the frozen teacher, reading the ``teacher_*`` view (e.g. text).
        args: the run's :class:`~hf_kd.DistillationConfig`.
        train_dataset: the paired rows (:func:`paired_views`).
        **kwargs: passed to the trainer (``eval_dataset``, whose sets are checked too; ``data_collator``, ...).

    Returns:
        The trainer, not yet trained.
    """
    for name, dataset in (("train_dataset", train_dataset), *_eval_sets(kwargs.get("eval_dataset"))):
        check_views(student, teacher, dataset.column_names)
        check_input_lengths(student, teacher, dataset, name)
    return DistillationTrainer(student, teacher, args, train_dataset=train_dataset, **kwargs)


def _eval_sets(eval_dataset) -> list[tuple[str, Dataset]]:
    if eval_dataset is None:
        return []
    if isinstance(eval_dataset, dict):
        return [(f"eval_dataset[{key!r}]", dataset) for key, dataset in eval_dataset.items()]
    return [("eval_dataset", eval_dataset)]


@dataclass
class CrossModalConfig(SchemeConfig):
    """Cross-modal distillation has no settings of its own: the rows carry both views (:func:`paired_views`) and the
    usual :class:`~hf_kd.DistillationConfig` losses compare the two models' outputs."""


@register_scheme("cross_modal", config=CrossModalConfig, teachers="one")
def run_cross_modal(config: CrossModalConfig, args: DistillationConfig, given: SchemeInputs) -> SchemeResult:
    """Cross-modal: the teacher reads one modality of each paired row (its teacher_* view), the student another (text
    → speech, say); the rows and models are checked up front.

    Args:
        config: the scheme's settings (none).
        args: the run's :class:`~hf_kd.DistillationConfig`.
        given: the student builder, the paired rows, the teacher and trainer arguments.

    Returns:
        The trained student's trainer, and no stages.
    """
    trainer = cross_modal(given.make_student(1), given.teacher, args, **given.trainer_kwargs)
    trainer.scheme_config = config
    trainer.train()
    return SchemeResult(trainer, [])
