"""Checks that refuse, before training starts, a set-up whose distillation could not take effect.

Each raises with what was wrong, the value seen and what to set instead (the docs' "What hf_kd refuses", generated
from the tests).
"""

from __future__ import annotations

import os

import numpy as np
from datasets import Dataset
from torch import nn

from .config import DistillationConfig
from .data import SAMPLE_INDEX
from .features import ModelFeatures
from .losses.registry import resolve_loss_class
from .model_kinds import is_classifier, is_regression, num_classes, output_size
from .teachers import check_materialized
from .teachers.ensemble import check_aggregation


def check_setup(model, teacher_model, args, trainer_kwargs: dict) -> None:
    """What a DistillationTrainer refuses before anything is loaded.

    Args:
        model: The student.
        teacher_model: The teacher(s) as given.
        args: The trainer's arguments.
        trainer_kwargs: The other keyword arguments of the trainer (data sets, collator, ``compute_loss_func``).

    Raises:
        TypeError: ``args`` is not a :class:`~hf_kd.DistillationConfig`.
        ValueError: a ``compute_loss_func``, no student, no teacher, the student as its own teacher, a student on the
            meta device, an empty training set, or data sets :func:`check_datasets` refuses.
    """
    if not isinstance(args, DistillationConfig):
        raise TypeError(
            f"args must be a DistillationConfig, got {type(args).__name__}; "
            "DistillationConfig takes every TrainingArguments field."
        )
    if trainer_kwargs.get("compute_loss_func") is not None:
        raise ValueError(
            "DistillationTrainer computes its own loss; configure it with DistillationConfig.losses "
            "instead of compute_loss_func."
        )
    if model is None:
        raise ValueError("DistillationTrainer needs the student as model=.")
    if teacher_model is None or (isinstance(teacher_model, (list, tuple, dict)) and len(teacher_model) == 0):
        raise ValueError(
            "no teacher: pass teacher_model= (a model, a path, a TeacherCache or AdapterBaseTeacher, or a list or "
            "dict of them) or set DistillationConfig.teacher_model_name_or_path."
        )
    several = (
        teacher_model.values()
        if isinstance(teacher_model, dict)
        else (teacher_model if isinstance(teacher_model, (list, tuple)) else [teacher_model])
    )
    if any(teacher is model for teacher in several):
        raise ValueError(
            "teacher_model is the student itself: it would be frozen with the teacher and learn nothing. For a "
            "frozen copy, pass copy.deepcopy(model); for a LoRA student taught by its own base, "
            "AdapterBaseTeacher(model)."
        )
    check_materialized(model, "student")
    train_dataset = trainer_kwargs.get("train_dataset")
    if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
        raise ValueError("train_dataset is empty (0 rows): check the data loading and filtering before training.")
    check_datasets(model, args, trainer_kwargs)


def check_datasets(model, args, trainer_kwargs: dict) -> None:
    """What the given data sets hold that would stop training at some step.

    A regression student's targets that are not finite, and rows the data collator would refuse (a collator with
    ``check_dataset(dataset, losses)``, e.g. :class:`hf_kd.ranking.RankingCollator`, is given each data set and the
    loss classes). Errors name the data set.

    Args:
        model: The student.
        args: The trainer's arguments (its losses and label names).
        trainer_kwargs: The trainer's keyword arguments (``train_dataset``, ``eval_dataset``, ``data_collator``).

    Raises:
        ValueError: an infinite regression target, or rows the collator refuses.
    """
    datasets = [("train_dataset", trainer_kwargs.get("train_dataset"))]
    evaluation = trainer_kwargs.get("eval_dataset")
    if isinstance(evaluation, dict):
        datasets += [(f"eval_dataset[{key!r}]", dataset) for key, dataset in evaluation.items()]
    else:
        datasets.append(("eval_dataset", evaluation))
    datasets = [(name, dataset) for name, dataset in datasets if dataset is not None]
    if is_regression(model):
        label_columns = list(dict.fromkeys(["labels", "label", *(args.label_names or [])]))
        for name, dataset in datasets:
            check_regression_targets(dataset, name, label_columns)
    check_rows = getattr(trainer_kwargs.get("data_collator"), "check_dataset", None)
    if check_rows is not None:
        losses = [resolve_loss_class(spec.name) for spec in args.loss_specs]
        for name, dataset in datasets:
            try:
                check_rows(dataset, losses)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None


def check_regression_targets(dataset, name: str, columns) -> None:
    """A regression student's targets are finite numbers (NaN marks an unlabeled row).

    ±inf makes its label loss infinite at that row's step. Read from a ``datasets.Dataset``'s columns; other data
    sets are checked batch by batch (:func:`hf_kd.trainer.batch_loss.check_regression_batch`).

    Args:
        dataset: The data set.
        name: Its name in the message (``"train_dataset"``).
        columns: The label columns to check (those it lacks, or that are not numbers, are skipped).

    Raises:
        ValueError: a target of ±inf, naming the column and row.
    """
    for column in columns:
        if not isinstance(dataset, Dataset) or column not in dataset.column_names:
            continue
        try:
            targets = np.asarray(dataset[column], dtype=np.float64)
        except (TypeError, ValueError):  # not numbers (ragged lists, strings): not regression targets
            continue
        infinite = np.flatnonzero(np.isinf(targets.reshape(len(targets), -1)).any(-1))
        if len(infinite):
            row = int(infinite[0])
            more = f" (and {len(infinite) - 1} more rows)" if len(infinite) > 1 else ""
            raise ValueError(
                f"regression target {column!r} of row {row} of {name} is {targets[row].tolist()}{more}: a target must "
                "be a finite number (NaN marks an unlabeled row). Fix or drop such rows (dataset.filter) before "
                "training."
            )


def check_teachers(model, teachers: dict, objective, args, train_dataset) -> None:
    """What the objective cannot do with this student, these teachers and this batch size.

    Args:
        model: The student.
        teachers: Each teacher (a model or a source) by name.
        objective: The :class:`~hf_kd.objective.Objective`.
        args: The trainer's arguments.
        train_dataset: The training set (``None`` when not given).

    Raises:
        ValueError: what :func:`check_batch_relations`, :func:`check_logit_width`, :func:`check_sample_index`,
            :func:`check_vocabularies` or :func:`check_teacher_count` refuse.
    """
    check_batch_relations(objective.losses, args.per_device_train_batch_size)
    check_logit_width(model, objective.losses)
    check_sample_index(objective.losses, train_dataset)
    for name, teacher in teachers.items():
        if isinstance(teacher, nn.Module):
            check_vocabularies(model, teacher, [term.loss for term in objective.terms_of(name)])
    check_teacher_count(args, list(teachers))


def check_teacher_count(args, teachers: list[str]) -> None:
    """What ``args`` cannot do with this many teachers (known by name before any is loaded: a later stage's).

    Args:
        args: The trainer's arguments.
        teachers: The teachers' names.

    Raises:
        ValueError: teacher-aggregation settings that do not fit the teachers
            (:func:`~hf_kd.teachers.ensemble.check_aggregation`), or ``chunk_size`` with several teachers.
    """
    check_aggregation(args.teacher_aggregation, args.teacher_weights, args.adaptive_temperature, teachers)
    if args.chunk_size is not None and len(teachers) > 1:
        raise ValueError(
            f"chunk_size runs one teacher's LM head chunk by chunk; {len(teachers)} teachers were given. Leave "
            "chunk_size unset with several teachers."
        )


def check_on_policy(args, token_level: bool, causal: bool, student: nn.Module, teachers: dict) -> None:
    """Refuse on-policy distillation where it cannot run.

    Args:
        args: The trainer's arguments (``on_policy_fraction``).
        token_level: Whether the logits are per token.
        causal: Whether the student is a causal LM.
        student: The student.
        teachers: Each teacher source by name.

    Raises:
        ValueError: ``on_policy_fraction > 0`` for a model that does not generate (not a causal or seq2seq LM), or
            with a teacher that cannot score new samples (a cache).
    """
    if args.on_policy_fraction <= 0:
        return
    config = getattr(student, "config", None)
    if not token_level or not (causal or getattr(config, "is_encoder_decoder", False)):
        raise ValueError("on_policy_fraction applies to causal and seq2seq LMs, which generate.")
    if not all(source.covers_eval for source in teachers.values()):
        raise ValueError(
            "on-policy distillation scores the student's new samples, which a teacher cache has no outputs "
            "for: use a live teacher, or on_policy_fraction=0."
        )


def check_batch_relations(losses, batch_size: int) -> None:
    """Relation losses compare the examples of a batch: below their minimum they are identically 0.

    Args:
        losses: The loss modules.
        batch_size: ``per_device_train_batch_size``.

    Raises:
        ValueError: the batch is smaller than a loss's ``min_batch_size``.
    """
    for loss in losses:
        if batch_size < loss.min_batch_size:
            raise ValueError(
                f"{loss.name} relates the examples of a batch to each other and is identically 0 below "
                f"{loss.min_batch_size} examples per process; per_device_train_batch_size is {batch_size}. Use at "
                f"least {loss.min_batch_size} (relation losses work best with dozens), or a loss that compares "
                "each example alone."
            )


def check_logit_width(student: nn.Module, losses) -> None:
    """A softmax over one logit is 1 whatever the logit: distribution losses are identically 0 on such heads.

    Args:
        student: The student.
        losses: The loss modules.

    Raises:
        ValueError: the student has one logit and a loss compares distributions.
    """
    if num_classes(student) != 1:
        return
    refused = [loss.name for loss in losses if loss.compares_distributions]
    if refused:
        raise ValueError(
            f"the student has a one-logit head (num_labels=1: a regression or a relevance score), on which "
            f"{refused} compare softmax distributions that are 1 whatever the logit, so they would be identically 0. "
            "Use logit_mse (or a regression/ranking loss) for one-logit heads."
        )


def check_sample_index(losses, train_dataset) -> None:
    """Losses with a memory entry per training example need each row's index.

    Args:
        losses: The loss modules.
        train_dataset: The training set (a data set without ``column_names`` is not checked).

    Raises:
        ValueError: a loss needs sample indices and the training set has no ``sample_index`` column.
    """
    needing = [loss.name for loss in losses if loss.needs_sample_index]
    columns = getattr(train_dataset, "column_names", None)
    if needing and columns is not None and SAMPLE_INDEX not in columns:
        raise ValueError(
            f"{needing} keep a memory entry per training example and need each row's index: add a sample_index "
            "column with hf_kd.data.add_sample_index(train_dataset)."
        )


def check_chunkable(losses, causal: bool, token_level: bool, fsdp: bool, fsdp2: bool) -> None:
    """Refuse ``chunk_size`` where the chunked path cannot compute the configured losses.

    Args:
        losses: The loss modules.
        causal: Whether the student is a causal LM.
        token_level: Whether the logits are per token.
        fsdp: Whether the run uses FSDP.
        fsdp2: Whether that FSDP is version 2.

    Raises:
        ValueError: a model that is not a causal LM, a loss that reads more than logits or is not per position, or
            FSDP1.
    """
    if not (causal and token_level):
        raise ValueError(
            "chunk_size applies to causal LMs (…ForCausalLM), whose logits come from an LM head; "
            "leave it unset for other models."
        )
    unchunkable = [loss.name for loss in losses if loss.side_needs("student") != {"logits"} or not loss.per_position]
    if unchunkable:
        raise ValueError(
            f"chunk_size works with logit losses only; {unchunkable} read other features. Leave "
            "chunk_size unset to combine them."
        )
    if fsdp and not fsdp2:
        raise ValueError(
            "chunk_size under FSDP needs FSDP2 (fsdp_config version 2), whose units hf_kd can gather for the LM "
            "heads called outside the models' forward; leave it unset with FSDP1."
        )


def compares_logits_entrywise(loss) -> bool:
    """Whether a loss compares the two sides' logits class by class (the response losses).

    Args:
        loss: A loss module.

    Returns:
        True for a per-position loss that reads logits on both sides.
    """
    return loss.per_position and all("logits" in loss.side_needs(side) for side in ("student", "teacher"))


def check_vocabularies(student: nn.Module, teacher: nn.Module | None, losses) -> None:
    """Fail at start-up, not at the first step, when label sets or LM vocabularies differ and no loss can bridge them.

    Args:
        student: The student.
        teacher: A teacher model; ``None`` (a cache, the student's own base) is checked where it is built.
        losses: The loss modules that read this teacher.

    Raises:
        ValueError: classifiers with different numbers of classes and a loss comparing logits class by class, or
            vocabularies of different sizes and a loss that does not work across vocabularies.
    """
    if teacher is None:  # a cache or the student's own base: checked where they are built
        return
    if is_classifier(student) and is_classifier(teacher):
        classes = [num_classes(student), num_classes(teacher)]
        entrywise = [loss.name for loss in losses if compares_logits_entrywise(loss)]
        if None not in classes and classes[0] != classes[1] and entrywise:
            raise ValueError(
                f"the student predicts {classes[0]} classes (config.num_labels) and the teacher {classes[1]}: "
                f"{entrywise} compare their logits class by class, so both need the same label set. Build the "
                "student with the teacher's num_labels, id2label and label2id."
            )
        return
    sizes = [output_size(student), output_size(teacher)]
    if None in sizes or sizes[0] == sizes[1]:
        return
    unaligned = [loss.name for loss in losses if not loss.cross_vocabulary]
    if unaligned:
        raise ValueError(
            f"the student's vocabulary has {sizes[0]} entries and the teacher's {sizes[1]}: the tokenizers differ, "
            f"and {unaligned} compare distributions entry by entry. Options: give the student the teacher's "
            "tokenizer; or distil across tokenizers with losses='uld' on rows tokenised for both "
            "(hf_kd.cross_tokenizer.add_teacher_tokenization + CrossTokenizerCollator); or replay sequence-level "
            "KD (hf_kd.generation.generate_teacher_outputs), which needs no shared vocabulary."
        )


def check_compatible(student: ModelFeatures, teacher: ModelFeatures) -> None:
    """Refuse student and teacher logits that cannot be compared.

    Args:
        student: The student's features.
        teacher: The teacher's features.

    Raises:
        ValueError: different numbers of classes (or vocabulary entries), or different positions.
    """
    if student.logits is not None and teacher.logits_shape is not None:
        s, t = student.logits.shape, teacher.logits_shape
        if s[-1] != t[-1]:
            raise ValueError(
                f"the student has {s[-1]} output classes/vocabulary entries and the teacher {t[-1]}: logit-based "
                "losses need the same label set or tokenizer. Give the student the teacher's label set "
                "(num_labels, id2label) or tokenizer, or, for different tokenizers, use the uld loss with rows "
                "tokenised for both (hf_kd.cross_tokenizer.add_teacher_tokenization)."
            )
        if s[:-1] != t[:-1]:
            raise ValueError(
                f"student logits {tuple(s)} and teacher logits {tuple(t)} cover different positions; "
                "feed both models the same inputs."
            )


def sharding_engine(args) -> str | None:
    """The sharding engine a run uses, from its arguments or an ``accelerate launch`` config.

    Args:
        args: The trainer's arguments.

    Returns:
        ``"DeepSpeed"``, ``"FSDP"`` or ``None``.
    """
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "DeepSpeed"
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    return None
