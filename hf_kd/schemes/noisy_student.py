"""Noisy student (Xie et al. 2020, *Self-training with Noisy Student improves ImageNet classification*,
arXiv:1911.04252) — the expansion objective: the teacher labels the unlabeled rows, an equal-or-larger student
learns from the labels and those pseudo-labels under noise (dropout, and input noise on the student's side only:
:mod:`hf_kd.noise`), then becomes the next round's teacher.

Pseudo-labels are **soft** (the rows stay unlabeled and the configured distillation losses carry the teacher's
distribution, which the teacher computes on the clean inputs) or **hard** (the teacher's class becomes the row's
label for the student's CE; the distillation losses still apply on top — set ``alpha=0`` for CE alone, as in the
paper's hard variant). Rows whose teacher confidence is below ``threshold`` are left out; ``balance`` evens the
classes the teacher assigns (the most confident rows of the large classes, duplicates in the small ones).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator
from transformers.utils import logging

from ..cache import TeacherCache
from ..config import DistillationConfig
from ..data import SAMPLE_INDEX, UNLABELED
from ..evaluation import count_parameters
from ..model_kinds import is_token_level
from ..noise import TokenCrop, compose_noise
from ..views import TokenWindows
from .registry import SchemeConfig, SchemeInputs, SchemeResult, register_scheme
from .stages import Stage, chain_teachers, check_stages, describe, final_trainer, finished_stage, run_stage
from .teacher_assistant import _describe_teacher

logger = logging.get_logger(__name__)

MODES = ("soft", "hard")


@dataclass
class PseudoLabels:
    """The rows the teacher labelled, made by :func:`pseudo_label`.

    Args:
        dataset: the kept rows, duplicates included, labels −100 for soft pseudo-labels or the teacher's class for
            hard ones.
        classes: the teacher's class per kept row.
        confidence: the teacher's top probability per kept row.
        considered: how many unlabeled rows the teacher saw.
        num_classes: the teacher's number of classes.
    """

    dataset: Dataset
    classes: np.ndarray
    confidence: np.ndarray
    considered: int  # unlabeled rows the teacher saw
    num_classes: int

    def summary(self) -> dict:
        """What a round records about its pseudo-labels (in its ``distillation_config.json``, under ``"stage"``).

        Returns:
            ``unlabeled_rows``, ``kept_rows``, ``distinct_rows`` (None without ``sample_index``),
                ``rows_per_class`` and ``mean_confidence`` (None when no row was kept).
        """
        counts = np.bincount(self.classes, minlength=self.num_classes).tolist()
        return {
            "unlabeled_rows": self.considered,
            "kept_rows": len(self.dataset),
            "distinct_rows": len(set(self.dataset[SAMPLE_INDEX]))
            if SAMPLE_INDEX in self.dataset.column_names
            else None,
            "rows_per_class": counts,
            "mean_confidence": float(self.confidence.mean()) if len(self.confidence) else None,
        }


def pseudo_label(
    teacher: nn.Module | TeacherCache,
    dataset: Dataset,
    *,
    mode: str = "soft",
    threshold: float = 0.0,
    balance: bool | int = False,
    data_collator=None,
    batch_size: int = 64,
    label_column: str = "labels",
    views: Callable[[dict], Sequence[dict]] | None = None,
) -> PseudoLabels:
    """Label ``dataset`` (the unlabeled rows) with ``teacher`` — a sequence/image/audio classifier, or a
    :class:`~hf_kd.TeacherCache` of one (rows found by ``sample_index``) — on its clean inputs. Keeps the rows whose
    top probability is ≥ ``threshold``; ``balance=True`` brings every class the teacher assigns to the mean count
    per class (``balance=N``: to N): the most confident rows of a larger class, the rows of a smaller one repeated,
    most confident first. With ``views`` (e.g. :class:`~hf_kd.views.TokenWindows`) a row's probabilities are the
    teacher's mean over its views — windows spanning a document longer than the teacher's training inputs.

    Args:
        teacher: a classifier of whole examples, or a :class:`~hf_kd.TeacherCache` of one.
        dataset: the unlabeled rows (with ``sample_index`` for a cached teacher).
        mode: ``"soft"`` (labels −100: the distillation losses carry the teacher's distribution) or ``"hard"``
            (the teacher's class as the label).
        threshold: keep the rows whose top probability is at least this, in [0, 1).
        balance: even the kept rows' classes (``True``: to the mean count per class; a number: to it).
        data_collator: batches the rows for the teacher (default: ``default_data_collator``).
        batch_size: rows per teacher batch.
        label_column: the label column, replaced by the pseudo-labels.
        views: ``views(batch)`` → the batches whose softmax the teacher averages per row (None: the batch itself).

    Returns:
        The kept rows, with the teacher's class and confidence per row.

    Raises:
        ValueError: a bad ``mode``, ``threshold`` or ``balance``; no rows; a token-level teacher (or cache); a
            cached teacher without ``sample_index`` in the rows, or with ``views`` (it holds one reading per row);
            ``views`` that return no batch.
        TypeError: a teacher that is neither a model nor a :class:`~hf_kd.TeacherCache`.
    """
    _check_options(mode, threshold, balance)
    if len(dataset) == 0:
        raise ValueError("there are no unlabeled rows to pseudo-label.")
    probabilities = _teacher_probabilities(teacher, dataset, data_collator, batch_size, label_column, views)
    confidence, classes = probabilities.max(dim=-1)
    confidence, classes = confidence.numpy(), classes.numpy()
    kept = np.flatnonzero(confidence >= threshold)
    if len(kept) == 0:
        logger.warning(f"pseudo_label: no unlabeled row reaches the confidence threshold {threshold}.")
    elif missing := sorted(set(range(probabilities.shape[-1])) - set(classes[kept].tolist())):
        # (a teacher unsure of a whole class loses it from the pseudo-labels; balancing then evens the others)
        logger.warning(
            f"pseudo_label: no kept unlabeled row has class {', '.join(map(str, missing))} (confidence threshold "
            f"{threshold}): its examples come from the labeled rows only."
        )
    if balance:
        kept = _balanced(kept, classes, confidence, None if balance is True else int(balance))
    rows = dataset.select(kept.tolist()).flatten_indices()  # add_column needs the rows materialised
    labels = classes[kept].tolist() if mode == "hard" else [UNLABELED] * len(kept)
    if len(rows):  # (an empty dataset takes no new column; it keeps its label column as it is)
        rows = rows.remove_columns(label_column) if label_column in rows.column_names else rows
        rows = rows.add_column(label_column, labels).cast_column(label_column, dataset.features[label_column])
    rows = rows.with_format(dataset.format["type"])
    return PseudoLabels(rows, classes[kept], confidence[kept], len(dataset), probabilities.shape[-1])


@dataclass
class NoisyStudentConfig(SchemeConfig):
    """Settings of noisy-student training (Xie et al. 2020): teacher → student rounds, each student the next round's
    teacher; ``soft`` pseudo-labels carry the teacher's distribution, ``hard`` ones its arg-max as the label; the
    kept rows' classes are evened to the mean count. ``input_noise`` is the strength given to ``make_noise``
    (:func:`~hf_kd.schemes.registry.run_scheme`; ``None`` or 0: no input noise); ``student_dropout`` ``None`` keeps
    the student's own rate. For text rows tokenized longer than the models were trained on, ``crop_length`` gives
    the student a random window of that many tokens of each row (:class:`~hf_kd.noise.TokenCrop`, before the input
    noise) and ``label_windows`` has the teacher label each row as its mean over that many such windows spread over
    it (:class:`~hf_kd.views.TokenWindows`); both read the trainers' tokenizer (``processing_class``).

    Args:
        rounds: noisy_student: the number of rounds.
        pseudo_labels: noisy_student: soft or hard.
        pseudo_label_threshold: noisy_student: keep unlabeled rows the teacher is at least this sure of.
        balance_pseudo_labels: noisy_student: even the classes.
        input_noise: noisy_student: token masking probability (text) or pixel noise std (images).
        student_dropout: noisy_student: the student's dropout rate while it trains.
        crop_length: noisy_student: the student trains on a random window of this many tokens of each longer row.
        label_windows: noisy_student: the teacher labels each row as its mean over this many windows of crop_length
            tokens (0: one reading of the row).

    Raises:
        ValueError: ``rounds`` below 1, ``pseudo_labels`` neither soft nor hard, a threshold, dropout or input
            noise outside [0, 1), ``crop_length`` below 1, ``label_windows`` below 0 or without ``crop_length``.
    """

    stage_count_field: ClassVar[str] = "rounds"

    rounds: int = field(default=1, metadata={"help": "noisy_student: the number of rounds."})
    pseudo_labels: str = field(
        default="soft", metadata={"help": "noisy_student: soft or hard.", "choices": ["soft", "hard"]}
    )
    pseudo_label_threshold: float = field(
        default=0.0, metadata={"help": "noisy_student: keep unlabeled rows the teacher is at least this sure of."}
    )
    balance_pseudo_labels: bool = field(default=False, metadata={"help": "noisy_student: even the classes."})
    input_noise: float | None = field(
        default=0.1,
        metadata={"help": "noisy_student: token masking probability (text) or pixel noise std (images)."},
    )
    student_dropout: float | None = field(
        default=0.1, metadata={"help": "noisy_student: the student's dropout rate while it trains."}
    )
    crop_length: int | None = field(
        default=None,
        metadata={
            "help": "noisy_student: the student trains on a random window of this many tokens of each longer row."
        },
    )
    label_windows: int = field(
        default=0,
        metadata={
            "help": "noisy_student: the teacher labels each row as its mean over this many windows of crop_length "
            "tokens (0: one reading of the row)."
        },
    )

    def __post_init__(self):
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"noisy_student needs rounds >= 1, got {self.rounds!r}.")
        _check_options(self.pseudo_labels, self.pseudo_label_threshold, self.balance_pseudo_labels)
        if self.student_dropout is not None and not 0.0 <= self.student_dropout < 1.0:
            raise ValueError(f"student_dropout must lie in [0, 1), got {self.student_dropout}.")
        if self.input_noise is not None and not 0.0 <= self.input_noise < 1.0:
            raise ValueError(f"input_noise must lie in [0, 1), got {self.input_noise}.")
        if self.crop_length is not None and (not isinstance(self.crop_length, int) or self.crop_length < 1):
            raise ValueError(f"crop_length is a number of tokens >= 1 (or None: no crop), got {self.crop_length!r}.")
        if not isinstance(self.label_windows, int) or self.label_windows < 0:
            raise ValueError(f"label_windows is a number of windows >= 0, got {self.label_windows!r}.")
        if self.label_windows and self.crop_length is None:
            raise ValueError(
                f"label_windows={self.label_windows} spreads windows of crop_length tokens over each row: set "
                "crop_length too (the length the teacher was trained on)."
            )


def noisy_student(
    teacher,
    make_student: Callable[[int], nn.Module],
    args: DistillationConfig,
    *,
    train_dataset: Dataset,
    rounds: int = 1,
    pseudo_labels: str = "soft",
    pseudo_label_threshold: float = 0.0,
    balance_pseudo_labels: bool | int = False,
    pseudo_label_views: Callable[[dict], Sequence[dict]] | None = None,
    student_noise=None,
    student_dropout: float | None = None,
    load_student=None,
    label_column: str = "labels",
    scheme: NoisyStudentConfig | None = None,
    **trainer_kwargs,
) -> list[Stage]:
    """``rounds`` rounds of noisy-student training in ``args.output_dir/round{k}``. ``train_dataset`` holds the
    labeled rows and the unlabeled ones (label −100, as :func:`hf_kd.data.split_labeled_transfer` makes them;
    with none, e.g. language modelling, each round is noisy self-distillation on the labeled rows). In round k
    the round's teacher (``teacher``, then round k − 1's student) pseudo-labels the unlabeled rows and
    ``make_student(k)`` learns from the labeled rows plus the kept pseudo-labeled ones with ``student_noise`` on its
    inputs (:mod:`hf_kd.noise`) and, with ``student_dropout``, every ``nn.Dropout`` of the student at that rate while it
    trains. ``trainer_kwargs`` go to each round's :class:`~hf_kd.DistillationTrainer` (``data_collator`` also
    batches the pseudo-labelling). Each round's ``distillation_config.json`` records its pseudo-labels (rows kept
    per class, mean confidence) and its lineage; running again resumes as
    :func:`~hf_kd.schemes.teacher_assistant.teacher_assistant` does.

    Args:
        teacher: the first round's teacher (a model or a :class:`~hf_kd.TeacherCache` of one).
        make_student: ``make_student(k)`` builds round k's fresh student.
        args: the :class:`~hf_kd.DistillationConfig` of every round (its ``output_dir`` holds them).
        train_dataset: the labeled rows and the unlabeled ones (label −100).
        rounds: how many rounds.
        pseudo_labels: ``"soft"`` or ``"hard"`` (see :func:`pseudo_label`).
        pseudo_label_threshold: keep the unlabeled rows whose teacher confidence is at least this.
        balance_pseudo_labels: even the pseudo-labels' classes (``True``: to the mean count; a number: to it).
        pseudo_label_views: the views each round's teacher labels a row from, its probabilities averaged
            (:class:`~hf_kd.views.TokenWindows`: windows over a long document; see :func:`pseudo_label`).
        student_noise: the noise on the student's inputs (a callable ``batch → batch`` or a list of them).
        student_dropout: every ``nn.Dropout`` of the student at this rate while it trains (None: its own).
        load_student: reads a finished round's saved student back on a rerun.
        label_column: the label column (−100 marks the unlabeled rows).
        scheme: the scheme's settings, recorded in each round's summary (default: from the arguments above).
        **trainer_kwargs: passed to every round's trainer (``data_collator`` also batches the pseudo-labelling).

    Returns:
        The rounds in order.

    Raises:
        ValueError: hard pseudo-labels from a cached teacher, no ``label_column``, or what
            :func:`pseudo_label`, :func:`~hf_kd.schemes.stages.check_stages` and
            :func:`~hf_kd.schemes.stages.run_stage` refuse.
    """
    if scheme is None:  # what this call asks for, as the scheme records it (input noise: the given noise object's)
        scheme = NoisyStudentConfig(
            rounds, pseudo_labels, pseudo_label_threshold, balance_pseudo_labels, None, student_dropout
        )
    if pseudo_labels == "hard" and isinstance(teacher, TeacherCache):
        raise ValueError(
            "hard pseudo-labels rewrite the labels column, which a TeacherCache fingerprints per row; use "
            "pseudo_labels='soft' with a cached teacher, or pass the teacher model."
        )
    if label_column not in train_dataset.column_names:
        raise ValueError(f"train_dataset has no {label_column!r} column (−100 marks its unlabeled rows).")
    names = [f"round{round_number}" for round_number in range(1, rounds + 1)]
    check_stages(args, chain_teachers(names, teacher))
    noise = compose_noise(student_noise)
    unlabeled_rows = _unlabeled_rows(train_dataset[label_column])
    labeled = train_dataset.select(np.flatnonzero(~unlabeled_rows).tolist())
    unlabeled = train_dataset.select(np.flatnonzero(unlabeled_rows).tolist())
    lineage = [_describe_teacher(teacher)]
    stages: list[Stage] = []
    current = teacher
    for round_number in range(1, rounds + 1):
        name = f"round{round_number}"
        student = make_student(round_number)
        details, dataset = None, train_dataset
        if not finished_stage(args, name):  # a finished round is read back: no labelling, no training
            if isinstance(current, nn.Module) and count_parameters(student) < count_parameters(current):
                logger.warning(
                    f"noisy student round {round_number}: the student ({count_parameters(student):,} parameters) is "
                    f"smaller than its teacher ({count_parameters(current):,}); the method expects an equal-or-larger "
                    "student."
                )
            if student_dropout is not None:
                _set_dropout(student, student_dropout)
            details = {"pseudo_labels": None, "unlabeled_rows": 0}  # e.g. language modelling: every row has text
            if len(unlabeled):
                labelled = pseudo_label(
                    current,
                    unlabeled,
                    mode=pseudo_labels,
                    threshold=pseudo_label_threshold,
                    balance=balance_pseudo_labels,
                    data_collator=trainer_kwargs.get("data_collator"),
                    batch_size=args.per_device_eval_batch_size,
                    label_column=label_column,
                    views=pseudo_label_views,
                )
                details = {"pseudo_labels": pseudo_labels, "threshold": pseudo_label_threshold, **labelled.summary()}
                if pseudo_label_views is not None:
                    details["views"] = repr(pseudo_label_views)
                dataset = concatenate_datasets([labeled, labelled.dataset]).with_format(train_dataset.format["type"])
        stage = run_stage(
            name,
            student,
            current,
            args,
            lineage,
            load_student,
            details=details,
            scheme=scheme,
            train_dataset=dataset,
            student_noise=noise,
            **trainer_kwargs,
        )
        stages.append(stage)
        lineage = [*lineage, {**describe(name, stage.model, stage.metrics), **stage.details}]
        current = stage.model
    return stages


def _check_options(mode: str, threshold: float, balance) -> None:
    if mode not in MODES:
        raise ValueError(f"pseudo-labels are 'soft' or 'hard', got {mode!r}.")
    if not 0.0 <= threshold < 1.0:  # False for NaN too
        raise ValueError(f"the confidence threshold must lie in [0, 1), got {threshold}.")
    if not isinstance(balance, bool) and (not isinstance(balance, int) or balance < 1):
        raise ValueError(f"balance is True, False or a number of rows per class >= 1, got {balance!r}.")


def _unlabeled_rows(labels: list) -> np.ndarray:
    """Rows without a label: −100, or (token-level rows) −100 at every position."""
    return np.asarray([np.all(np.asarray(label) == UNLABELED) for label in labels], dtype=bool)


def _teacher_probabilities(teacher, dataset: Dataset, data_collator, batch_size: int, label_column: str, views):
    if isinstance(teacher, TeacherCache):
        if views is not None:
            raise ValueError("a TeacherCache holds one reading per row; pass the teacher model to label from views.")
        if teacher.manifest["token_level"]:
            raise ValueError("pseudo_label labels whole examples; this cache holds a token-level teacher.")
        if SAMPLE_INDEX not in dataset.column_names:
            raise ValueError("a cached teacher finds its rows by sample_index: add it with add_sample_index.")
        rows = [teacher.rows(int(index)) for index in dataset[SAMPLE_INDEX]]
        return torch.stack([teacher._sparse(ids, values).dense().softmax(-1)[0] for ids, values in rows])
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"pseudo_label needs a teacher model or a TeacherCache, got {type(teacher).__name__}.")
    if is_token_level(teacher):
        raise ValueError(f"pseudo_label labels whole examples; {type(teacher).__name__} predicts per token.")
    dropped = [c for c in (label_column, SAMPLE_INDEX) if c in dataset.column_names]
    loader = DataLoader(
        dataset.remove_columns(dropped), batch_size=batch_size, collate_fn=data_collator or default_data_collator
    )
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    chunks = []
    with torch.no_grad():
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items() if torch.is_tensor(value)}
            readings = [batch] if views is None else list(views(batch))
            if not readings:
                raise ValueError(f"views {views!r} returned no batch to label from.")
            chunks.append(torch.stack([teacher(**view).logits.float().softmax(-1) for view in readings]).mean(0).cpu())
    teacher.train(was_training)
    return torch.cat(chunks)


def _balanced(kept: np.ndarray, classes: np.ndarray, confidence: np.ndarray, target: int | None) -> np.ndarray:
    by_class = {}
    for cls in np.unique(classes[kept]):
        rows = kept[classes[kept] == cls]
        by_class[cls] = rows[np.argsort(-confidence[rows], kind="stable")]  # most confident first
    if not by_class:  # nothing passed the threshold
        return kept
    if target is None:
        target = int(round(np.mean([len(rows) for rows in by_class.values()])))
    chosen = [np.resize(rows, target) for rows in by_class.values()]  # truncates, or repeats in order
    return np.sort(np.concatenate(chosen))


def _set_dropout(model: nn.Module, rate: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate


@register_scheme("noisy_student", config=NoisyStudentConfig, teachers="one", stages=True)
def run_noisy_student(config: NoisyStudentConfig, args: DistillationConfig, given: SchemeInputs) -> SchemeResult:
    """Noisy student: the teacher pseudo-labels the unlabeled rows, an equal-or-larger student learns from them with
    noised inputs and dropout, and becomes the next round's teacher (Xie et al. 2020).

    Args:
        config: the rounds, pseudo-labels, noise and dropout.
        args: the :class:`~hf_kd.DistillationConfig` of every round.
        given: the student builder, data, teacher, noise builder and trainer arguments.

    Returns:
        The last round's trainer, and the rounds before it.
    """
    crop, views = _token_views(config, given.extra.get("processing_class"), given.teacher)
    noise = given.noise(config.input_noise)  # a callable or a list of them (e.g. an image recipe's shift + noise)
    if crop is not None:  # the window first, then the noise on it
        noise = [crop, *([] if noise is None else noise if isinstance(noise, (list, tuple)) else [noise])]
    stages = noisy_student(
        given.teacher,
        given.make_student,
        args,
        rounds=config.rounds,
        pseudo_labels=config.pseudo_labels,
        pseudo_label_threshold=config.pseudo_label_threshold,
        balance_pseudo_labels=config.balance_pseudo_labels,
        pseudo_label_views=views,
        student_noise=noise,
        student_dropout=config.student_dropout,
        load_student=given.load_student,
        scheme=config,
        **given.trainer_kwargs,
    )
    return SchemeResult(final_trainer(stages, args, config, given), stages[:-1])


def _token_views(config: NoisyStudentConfig, tokenizer, teacher) -> tuple[TokenCrop | None, TokenWindows | None]:
    """The student's crop and the teacher's label windows that ``config`` asks for, from the trainers' tokenizer."""
    if config.crop_length is None:
        return None, None
    if isinstance(teacher, nn.Module) and is_token_level(teacher):  # before training, not at its first batch
        raise ValueError(
            f"crop_length={config.crop_length} moves tokens, which per-token labels cannot follow: it is for models "
            f"with one output per row; the teacher {type(teacher).__name__} predicts per token."
        )
    if not hasattr(tokenizer, "all_special_ids"):
        raise ValueError(
            f"crop_length={config.crop_length} cuts token rows and keeps the tokenizer's special tokens at each "
            f"window's ends: give the trainers a tokenizer as processing_class (got {type(tokenizer).__name__})."
        )
    crop = TokenCrop.from_tokenizer(tokenizer, config.crop_length)
    if not config.label_windows:
        return crop, None
    return crop, TokenWindows.from_tokenizer(tokenizer, config.crop_length, config.label_windows)
