"""Knowledge amalgamation: teachers trained on different, possibly overlapping label sets teach one student over the
union of their classes (Vongkulbhisal et al. 2019, *Unifying Heterogeneous Classifiers with Distillation*,
arXiv:1904.06062; Shen et al. 2019, *Amalgamating Knowledge towards Comprehensive Classification*, AAAI 2019).

Classes are matched by name: each teacher's ``config.id2label`` against the student's. A teacher's logits are placed at
the student's ids of its classes, ``-inf`` at the classes it does not know (:class:`LabelSubsetTeacher`), and each
teacher is one term of the ``uhc`` loss: its distribution against the student's restricted and renormalised to that
teacher's classes (:func:`~hf_kd.losses.functional.subset_kl`). Rows need no label; labels, where given (ids of the
student's classes), add the student's own label loss as in any run.

    from hf_kd.schemes.amalgamation import amalgamation, union_label_config

    labels = union_label_config([digits_0_to_4, digits_5_to_9])   # num_labels, id2label, label2id of the union
    student = ViTForImageClassification(ViTConfig(..., **labels))
    trainer = amalgamation([digits_0_to_4, digits_5_to_9], student, args, train_dataset=unlabeled_rows)
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checks import compares_logits_entrywise
from ..config import DistillationConfig, LossSpec
from ..features import ModelFeatures
from ..losses import get_loss
from ..losses.registry import with_default_temperature
from ..model_kinds import base_model, is_classifier
from ..teachers import LiveTeacher, TeacherSource, build_teachers, prepare_teacher, use_eager_attention
from .registry import SchemeConfig, SchemeInputs, SchemeResult, register_scheme
from .stages import MODEL_FOLDER, pushed_by_the_caller, restore_push, train_measure_save

LOSSES = ("uhc", "kl")  # each teacher's term: the UHC objective, or the naive zero-padded KL it is compared with
_DEFAULT_NAME = re.compile(r"LABEL_\d+")  # transformers' placeholder names, which name no class


def class_names(model: nn.Module, role: str) -> list[str]:
    """A classifier's class names in id order, from its ``config.id2label``.

    Args:
        model: A classifier (possibly wrapped by PEFT or DDP).
        role: What the model is in messages (``"the student"``, ``"teacher 'a'"``).

    Returns:
        ``[id2label[0], id2label[1], ...]`` as strings.

    Raises:
        ValueError: the model is not a classifier, or its id2label names a class twice.
    """
    if not is_classifier(model):
        raise ValueError(
            f"amalgamation matches classes by name (config.id2label) across classifiers; {role} is a "
            f"{type(base_model(model)).__name__}, which is not a classifier (…ForSequenceClassification, "
            "…ForImageClassification, …ForTokenClassification, ...)."
        )
    config = base_model(model).config
    by_id = {int(index): str(name) for index, name in config.id2label.items()}
    names = [by_id[index] for index in sorted(by_id)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"{role}'s config.id2label names {repeated} more than once: amalgamation matches classes across models "
            "by name, so each class needs a name of its own."
        )
    return names


def own_class_rows(dataset, teacher: nn.Module, names: list[str], label_column: str = "labels"):
    """The rows of ``dataset`` whose class ``teacher`` knows, their labels as the teacher's class ids: where a teacher
    of some of the classes is measured (it cannot name the others).

    Args:
        dataset: A ``datasets.Dataset`` whose ``label_column`` holds class ids of ``names``.
        teacher: A classifier over some of the classes, named in its ``config.id2label``.
        names: The dataset's class names, in id order.
        label_column: The label column.

    Returns:
        The selected rows, relabelled (same format as ``dataset``).

    Raises:
        ValueError: the teacher knows none of the dataset's classes.
    """
    known = class_names(teacher, "the teacher")
    to_teacher = {index: known.index(name) for index, name in enumerate(names) if name in known}
    if not to_teacher:
        raise ValueError(f"the teacher's classes {known} are none of the dataset's {names}.")
    labels = [int(label) for label in dataset.with_format(None)[label_column]]
    rows = dataset.select([row for row, label in enumerate(labels) if label in to_teacher])
    relabelled = [to_teacher[label] for label in labels if label in to_teacher]
    form = rows.format
    rows = rows.with_format(None).remove_columns(label_column).add_column(label_column, relabelled)
    return rows.with_format(form["type"], columns=form["columns"], output_all_columns=form["output_all_columns"])


def union_labels(teachers) -> list[str]:
    """The union of the teachers' classes, in the order amalgamation defines: the first teacher's classes in its id
    order, then each later teacher's classes not named before, in its id order.

    Args:
        teachers: Classifiers (a list, or a dict by name), each with its classes named in ``config.id2label``.

    Returns:
        The class names of the union.

    Raises:
        ValueError: a teacher is not a classifier or names a class twice (:func:`class_names`).
    """
    named = teachers.items() if isinstance(teachers, dict) else enumerate(teachers)
    union: dict[str, None] = {}
    for name, teacher in named:
        union.update(dict.fromkeys(class_names(teacher, f"teacher {name!r}")))
    return list(union)


def union_label_config(teachers) -> dict:
    """The label settings of a student over the union of the teachers' classes (:func:`union_labels`' order).

    Args:
        teachers: Classifiers (a list, or a dict by name).

    Returns:
        ``{"num_labels": ..., "id2label": ..., "label2id": ...}``, for a model config or ``from_pretrained``.

    Raises:
        ValueError: what :func:`union_labels` refuses.
    """
    names = union_labels(teachers)
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: index for index, name in enumerate(names)},
    }


def class_maps(student_names: list[str], teacher_names: dict[str, list[str]]) -> dict[str, list[int]]:
    """Each teacher's classes as the student's class ids, refusing what amalgamation cannot teach.

    Args:
        student_names: The student's class names in id order.
        teacher_names: Each teacher's class names in its id order, by teacher name.

    Returns:
        For each teacher, the student id of its class 0, 1, ... .

    Raises:
        ValueError: a teacher's class the student does not have (by name), or a student class no teacher knows.
    """
    student_ids = {name: index for index, name in enumerate(student_names)}
    for teacher, names in teacher_names.items():
        missing = [name for name in names if name not in student_ids]
        if missing:
            placeholder = ""
            if all(_DEFAULT_NAME.fullmatch(name) for name in missing):
                placeholder = (
                    " (LABEL_0, LABEL_1, ... are transformers' placeholder names, which name no class: set the "
                    "teacher's config.id2label to the names of its classes)"
                )
            raise ValueError(
                f"teacher {teacher!r} knows the classes {missing}, which the student does not have (its classes: "
                f"{student_names}){placeholder}: build the student over the union of the teachers' classes, e.g. "
                "with hf_kd.schemes.amalgamation.union_label_config(teachers)."
            )
    known = {name for names in teacher_names.values() for name in names}
    untaught = [name for name in student_names if name not in known]
    if untaught:
        raise ValueError(
            f"the student's classes {untaught} are known by no teacher (the teachers' classes: {teacher_names}), so "
            "nothing would teach them: drop them from the student's id2label, or add a teacher that knows them."
        )
    return {teacher: [student_ids[name] for name in names] for teacher, names in teacher_names.items()}


class LabelSubsetTeacher(LiveTeacher):
    """A frozen classifier that knows some of the student's classes, run live: its logits placed at the student's
    ids of its classes, ``-inf`` at the others (which :func:`~hf_kd.losses.functional.subset_kl` leaves out and the
    finite-outputs check allows). Hidden states and other features pass through as they are.

    Args:
        model: The teacher classifier (frozen here; placed for the trainer's engine when attached).
        class_ids: The student's class id of the teacher's class 0, 1, ... (:func:`class_maps`).
        num_classes: The number of the student's classes.
        names: The teacher's class names, recorded in the run's summary.

    Raises:
        ValueError: ``class_ids`` does not hold one distinct id in ``[0, num_classes)`` per teacher class.
    """

    def __init__(self, model: nn.Module, class_ids: list[int], num_classes: int, names: list[str] | None = None):
        width = getattr(base_model(model).config, "num_labels", len(class_ids))
        if (
            not class_ids
            or len(class_ids) != width
            or len(set(class_ids)) != len(class_ids)
            or not (0 <= min(class_ids) and max(class_ids) < num_classes)
        ):
            raise ValueError(
                f"class_ids must give each of the teacher's {width} classes its own id among the student's "
                f"{num_classes}; got {class_ids}."
            )
        super().__init__(model)
        self.model.requires_grad_(False)
        self.class_ids = torch.tensor(class_ids, dtype=torch.long)
        self.num_classes = num_classes
        self.names = list(names) if names is not None else None

    def attach(self, trainer) -> None:
        # What the trainer does for a teacher model it is given: placement for its engine, eager attention if read.
        if "attentions" in trainer.distillation_objective.needs("teacher"):
            use_eager_attention(self.model)
        self.model = prepare_teacher(self.model, trainer.accelerator)

    def to_student_classes(self, logits: torch.Tensor) -> torch.Tensor:
        """The teacher's logits ``…×K`` placed at the student's class ids: ``…×C``, ``-inf`` where it knows nothing.

        Args:
            logits: The teacher's logits over its own classes.

        Returns:
            Logits over the student's classes.
        """
        placed = logits.new_full((*logits.shape[:-1], self.num_classes), float("-inf"))
        return placed.index_copy(-1, self.class_ids.to(logits.device), logits)

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        features = super().__call__(inputs, needs, sample_index)
        if features.logits is not None:
            features.logits = self.to_student_classes(features.logits)
        return features

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        raise ValueError("a LabelSubsetTeacher classifies; chunk_size (causal LMs' chunked logits) does not apply.")

    def describe(self) -> dict:
        return {**super().describe(), **({"classes": self.names} if self.names is not None else {})}


@dataclass
class AmalgamationConfig(SchemeConfig):
    """Settings of knowledge amalgamation (Vongkulbhisal et al. 2019; Shen et al. 2019): teachers over different label
    sets teach one student over their union. ``uhc`` compares each teacher's distribution with the student's
    restricted and renormalised to that teacher's classes (the UHC objective); ``kl`` compares it, zero-padded to the
    student's classes, with the student's whole distribution (the naive extension of distillation the UHC paper
    compares with: it pulls mass towards every teacher's own classes).

    Args:
        loss: amalgamation: each teacher's term: uhc (its distribution vs the student's restricted and renormalised
            to its classes) or kl (vs the student's whole distribution, the teacher's zero-padded).

    Raises:
        ValueError: ``loss`` is neither ``uhc`` nor ``kl``.
    """

    loss: str = field(
        default="uhc",
        metadata={
            "help": "amalgamation: each teacher's term: uhc (its distribution vs the student's restricted and "
            "renormalised to its classes) or kl (vs the student's whole distribution, the teacher's zero-padded).",
            "choices": list(LOSSES),
        },
    )

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"amalgamation's loss is one of {list(LOSSES)}, got {self.loss!r}.")


def amalgamation_losses(args: DistillationConfig, teachers: list[str], loss: str = "uhc") -> list[dict]:
    """``args.losses`` with the amalgamation's terms: ``kl`` (the default ``losses``) becomes one ``loss`` term per
    teacher, with its weight and options; losses on other features (hidden states, embeddings, ...) stay, one term per
    teacher as in any run; with no ``kl`` the terms are added with weight 1.

    Args:
        args: The run's arguments.
        teachers: The teachers' names.
        loss: Each teacher's term (:data:`LOSSES`).

    Returns:
        The losses, as ``DistillationConfig.losses`` takes them.

    Raises:
        ValueError: another logit loss (or ``kl`` naming a teacher), which would compare the student's whole
            distribution with teachers that know only some of its classes.
    """
    specs, slot = [], None
    for spec in args.loss_specs:
        if spec.name == "kl" and spec.teacher is None and slot is None:
            slot = spec
            continue
        probe = get_loss(spec.name, **with_default_temperature(spec, args.temperature))
        if compares_logits_entrywise(probe):
            raise ValueError(
                f"amalgamation gives each teacher its own {loss!r} term on its own classes; losses also lists "
                f"{spec.name!r}{f' (teacher={spec.teacher})' if spec.teacher else ''}, which would compare the "
                "student's logits class by class with teachers that know only some of its classes. Keep kl (it "
                "stands for the amalgamation's terms, with its weight) and losses on other features."
            )
        specs.append(spec)
    slot = slot or LossSpec("kl", 1.0)
    terms = [LossSpec(loss, slot.weight, dict(slot.options), teacher) for teacher in teachers]
    return [spec.to_dict() for spec in terms + specs]


def check_amalgamation_args(args: DistillationConfig) -> None:
    """Refuse the settings that cannot take effect in an amalgamation run.

    Args:
        args: The run's arguments.

    Raises:
        ValueError: ``chunk_size`` or ``on_policy_fraction`` (causal-LM options; amalgamation combines classifiers),
            or ``teacher_aggregation`` / ``teacher_weights`` (each teacher is its own term: nothing is combined).
    """
    if args.chunk_size is not None or args.on_policy_fraction > 0:
        option = "chunk_size" if args.chunk_size is not None else "on_policy_fraction"
        raise ValueError(
            f"amalgamation combines classifiers over the union of their label sets; {option} is a causal-LM option "
            "and does not apply: leave it unset."
        )
    if args.teacher_aggregation != "mean_probs" or args.teacher_weights is not None:
        raise ValueError(
            f"amalgamation gives each teacher its own term on its own classes and combines no distributions: "
            f"teacher_aggregation={args.teacher_aggregation!r} / teacher_weights={args.teacher_weights} would do "
            "nothing. Leave both unset (weigh a teacher's term through losses instead)."
        )


def amalgamation(
    teachers,
    student: nn.Module,
    args: DistillationConfig,
    *,
    loss: str = "uhc",
    scheme: AmalgamationConfig | None = None,
    **trainer_kwargs,
):
    """Train ``student`` over the union of the teachers' classes on ``train_dataset`` in ``args.output_dir``
    (resuming from its last checkpoint there), measure it on ``eval_dataset`` when given, and save it to
    ``OUTPUT_DIR/model``.

    Each teacher's classes are matched with the student's by name (``config.id2label``); each teacher is one
    ``loss`` term (``uhc``: against the student's distribution restricted and renormalised to that teacher's
    classes). Rows may be unlabeled (labels -100); given labels are ids of the student's classes and add its label
    loss. ``distillation_config.json`` records the student's classes and each teacher's (``stage``).

    Args:
        teachers: The teacher classifiers (models or folders): a list (``teacher0``, ``teacher1``, ...), a dict by
            name, or one.
        student: The student classifier, its ``id2label`` the union of the teachers' classes in any order
            (:func:`union_label_config` makes one).
        args: The run's :class:`~hf_kd.DistillationConfig`; ``kl`` in its ``losses`` stands for the teachers' terms
            (:func:`amalgamation_losses`).
        loss: Each teacher's term: ``uhc`` or ``kl`` (see :class:`AmalgamationConfig`).
        scheme: The config recorded in the summary (default: one from ``loss``).
        **trainer_kwargs: The trainer's other arguments (``train_dataset``, ``eval_dataset``, ``compute_metrics``,
            ``student_noise``, ...).

    Returns:
        The trained :class:`~hf_kd.DistillationTrainer` (its ``stage_metrics``: the student's evaluation).

    Raises:
        ValueError: what :func:`check_amalgamation_args`, :func:`amalgamation_losses`, :func:`class_names` and
            :func:`class_maps` refuse; a teacher given as a source (a cache), whose classes are not known.
    """
    scheme = scheme if scheme is not None else AmalgamationConfig(loss)
    check_amalgamation_args(args)
    student_names = class_names(student, "the student")
    models = build_teachers(teachers, student, args.teacher_dtype)
    for name, model in models.items():
        if isinstance(model, TeacherSource):
            raise ValueError(
                f"amalgamation reads each teacher's classes from its model's config.id2label; teacher {name!r} is a "
                f"{type(model).__name__}, which has none: give the teacher model (or its folder)."
            )
    teacher_names = {name: class_names(model, f"teacher {name!r}") for name, model in models.items()}
    maps = class_maps(student_names, teacher_names)
    sources = {
        name: LabelSubsetTeacher(model, maps[name], len(student_names), teacher_names[name])
        for name, model in models.items()
    }
    run_args = dataclasses.replace(args, losses=amalgamation_losses(args, list(sources), scheme.loss))
    from ..trainer import DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher_model=sources, args=run_args, **trainer_kwargs)
    trainer.scheme_config = scheme
    details = {"scheme": "amalgamation", "classes": student_names, "teacher_classes": teacher_names}

    def measure(trainer):
        trainer.stage_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
        trainer.stage_details = details

    trainer.stage_details = details
    train_measure_save(trainer, os.path.join(args.output_dir, MODEL_FOLDER), measure)
    return trainer


@register_scheme("amalgamation", config=AmalgamationConfig, teachers="many")
def run_amalgamation(config: AmalgamationConfig, args: DistillationConfig, given: SchemeInputs) -> SchemeResult:
    """Amalgamation: teachers over different, possibly overlapping label sets (config.id2label) teach one student
    over their union, each on its own classes (UHC, Vongkulbhisal et al. 2019).

    Args:
        config: The scheme's settings.
        args: The run's arguments (the student is saved to ``OUTPUT_DIR/model``).
        given: The teachers (a list or dict of classifiers), ``make_student`` (its id2label the union) and the
            trainer's other arguments.

    Returns:
        The student's trainer; no other stage.

    Raises:
        ValueError: what :func:`amalgamation` refuses.
    """
    check_amalgamation_args(args)  # before a student is built
    trainer = amalgamation(
        given.teacher,
        given.make_student(1),
        pushed_by_the_caller(args),
        loss=config.loss,
        scheme=config,
        **given.trainer_kwargs,
    )
    return SchemeResult(restore_push(trainer, args), [])
