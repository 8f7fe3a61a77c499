"""Schemes made of several distillation runs in a row (teacher → assistant → student; generations): each stage a
:class:`~hf_kd.DistillationTrainer` run in its own folder, resumed from its last checkpoint when the chain is run
again, skipped once its model is saved, and its lineage (every teacher before it) recorded in its
``distillation_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..checkpoints import changed_fields, last_complete_checkpoint, without_stage_count
from ..checks import check_teacher_count
from ..config import DistillationConfig
from ..objective import Objective
from ..teachers import SINGLE_TEACHER, TeacherAggregator, name_models
from ..trainer.reporting import DISTILLATION_CONFIG_NAME, SETUP_FIELDS

MODEL_FOLDER = "model"  # a stage's saved student, inside the stage folder
LINEAGE_KEY = "lineage"


@dataclass
class Stage:
    """One finished stage: its name, folder, the student it trained (in memory) and the metrics of ``evaluate``.

    Args:
        name: the stage's name (its folder under the run's ``output_dir``).
        folder: the stage's folder.
        model: the student it trained, in memory.
        metrics: its ``evaluate`` metrics (empty without an evaluation set).
        details: what the scheme records about the stage (e.g. a round's pseudo-labels).
        trainer: the stage's trainer; None when the stage was read back from an earlier run.
    """

    name: str
    folder: str
    model: nn.Module
    metrics: dict
    details: dict = dataclasses.field(default_factory=dict)  # what the scheme records about the stage
    trainer: object | None = dataclasses.field(default=None, repr=False)  # None when read back from an earlier run

    @property
    def model_folder(self) -> str:
        """Where the stage's student is saved (``FOLDER/model``)."""
        return os.path.join(self.folder, MODEL_FOLDER)


def run_stage(
    name: str,
    student: nn.Module,
    teacher,
    args: DistillationConfig,
    lineage: list[dict],
    load_student=None,
    details: dict | None = None,
    scheme=None,
    **trainer_kwargs,
) -> Stage:
    """Distil ``student`` from ``teacher`` into ``args.output_dir/name``, or read the stage back when it finished in
    an earlier run with the same set-up (``load_student(folder)`` reads the saved student).

    Args:
        name: the stage's folder under ``args.output_dir`` (its saved student in ``model/``).
        student: the model this stage trains.
        teacher: its teacher(s), as ``DistillationTrainer``'s ``teacher_model``.
        args: the run's :class:`~hf_kd.DistillationConfig` (the stage's ``output_dir`` is its folder).
        lineage: every teacher before this stage (:func:`describe` entries), recorded in its summary.
        load_student: reads a finished stage's saved student back.
        details: what the scheme records about the stage (e.g. a round's pseudo-labels), under ``"stage"``.
        scheme: the scheme's :class:`~hf_kd.schemes.registry.SchemeConfig`, recorded under ``"scheme"``.
        **trainer_kwargs: passed to the stage's :class:`~hf_kd.DistillationTrainer` (``train_dataset``, ...).

    Returns:
        The finished :class:`Stage` (its ``trainer`` None when read back).

    Raises:
        ValueError: the stage finished before under another set-up (teacher, losses, weights, scheme settings or
            lineage): reusing it would hand the next stage a model trained otherwise than asked. The message names
            the differences; remove the stage's folder (and those after it) or use another ``output_dir``. Also a
            finished stage without ``load_student`` to read it back.
    """
    from ..trainer import DistillationTrainer

    folder = os.path.join(args.output_dir, name)
    model_folder = os.path.join(folder, MODEL_FOLDER)
    requested = stage_setup(teacher, args, lineage, scheme)
    if finished_stage(args, name):
        with open(os.path.join(model_folder, DISTILLATION_CONFIG_NAME)) as handle:
            saved = json.load(handle)
        recorded = without_stage_count(saved.get("setup"), getattr(scheme, "stage_count_field", None))
        changed = changed_fields(recorded, requested)
        if changed:
            raise ValueError(
                f"stage {name!r} finished in an earlier run ({model_folder}) under another set-up: {changed}. "
                f"Reusing it would give the next stage a model trained otherwise than asked: remove {folder} (and "
                "the stages after it) to train it again, or give another output_dir."
            )
        if load_student is None:
            raise ValueError(
                f"stage {name!r} finished in an earlier run ({model_folder}); pass load_student (e.g. "
                "AutoModelForSequenceClassification.from_pretrained) to read it back, or remove the folder to redo it."
            )
        return Stage(name, folder, load_student(model_folder), saved.get("metrics", {}), saved.get("stage", {}))
    teachers = list(name_models(teacher, SINGLE_TEACHER, reserved=("student",)))
    # A stage never pushes (an assistant or an earlier generation must not reach the student's repo): the chain's
    # final trainer gets push_to_hub back (final_trainer), and its save_model / push_to_hub share the student.
    stage_args = dataclasses.replace(args_for_teachers(args, teachers), output_dir=folder, push_to_hub=False)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=stage_args, **trainer_kwargs)
    trainer.lineage = lineage
    trainer.stage_details = details or {}
    trainer.stage_setup = requested
    trainer.scheme_config = scheme

    def measure(trainer):
        trainer.stage_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}

    train_measure_save(trainer, model_folder, measure)
    metrics = trainer.stage_metrics
    return Stage(name, folder, trainer.accelerator.unwrap_model(trainer.model), metrics, details or {}, trainer)


def train_measure_save(trainer, model_folder: str, measure: Callable[[object], None] | None = None) -> None:
    """The end of every scheme's run, in one place: train in ``trainer.args.output_dir``, resuming from its last
    complete checkpoint there (a half-saved one is skipped with a warning); then ``measure(trainer)`` (evaluate,
    compare, record what the saved summary reports); then save the model to ``model_folder`` — last, so that a folder
    with its model counts as finished.

    Args:
        trainer: the scheme's :class:`~hf_kd.DistillationTrainer` (any of its subclasses).
        model_folder: where ``save_model`` writes the trained model.
        measure: called between training and saving; None measures nothing.
    """
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(trainer.args.output_dir))
    if measure is not None:
        measure(trainer)
    trainer.save_model(model_folder)


def stage_setup(teacher, args: DistillationConfig, lineage: list[dict], scheme=None) -> dict:
    """What decides a stage's result besides its data and seed: its teacher(s) (class and size of a model, a path
    as given, a source's description), the distillation settings of ``args``, the scheme's settings and the lineage
    before it. Recorded in the stage's summary (``"setup"``) and compared on a rerun.

    Args:
        teacher: the stage's teacher(s), as ``DistillationTrainer``'s ``teacher_model``.
        args: the run's :class:`~hf_kd.DistillationConfig`.
        lineage: every teacher before the stage (:func:`describe` entries).
        scheme: the scheme's config, or None.

    Returns:
        The set-up, a JSON-serialisable dict.
    """
    return {
        "teacher": _teacher_setup(teacher),
        **{field: getattr(args, field) for field in SETUP_FIELDS},
        "scheme": scheme.setup() if scheme is not None else None,
        "lineage": lineage,
    }


def _teacher_setup(teacher):
    if isinstance(teacher, (list, tuple, dict)):
        return {name: _teacher_setup(member) for name, member in name_models(teacher, SINGLE_TEACHER).items()}
    if isinstance(teacher, nn.Module):
        from ..evaluation import count_parameters

        return {"class": type(teacher).__name__, "parameters": count_parameters(teacher)}
    if isinstance(teacher, str):
        return teacher
    return teacher.describe()  # a TeacherSource (a cache, ...)


def final_trainer(stages: list[Stage], args: DistillationConfig, scheme, given) -> object:
    """The trainer of a chain's final student: the one that trained it, or — when it finished in an earlier run and
    was read back — a trainer around it (its teacher the stage before), for evaluation, saving and pushing (with
    ``args.push_to_hub``, its ``save_model`` pushes the student, as a Trainer's does; no stage pushed before).

    Args:
        stages: the chain's stages, in order (the last is the final student).
        args: the run's :class:`~hf_kd.DistillationConfig`.
        scheme: the scheme's config, recorded in the student's summary.
        given: the scheme's :class:`~hf_kd.schemes.registry.SchemeInputs` (the first teacher, the trainer's
            other arguments).

    Returns:
        The final student's :class:`~hf_kd.DistillationTrainer`.
    """
    last = stages[-1]
    if last.trainer is not None:
        return restore_push(last.trainer, args)  # it trained as a stage, which never pushes
    from ..trainer import DistillationTrainer

    with open(os.path.join(last.model_folder, DISTILLATION_CONFIG_NAME)) as handle:
        saved = json.load(handle)
    previous = stages[-2].model if len(stages) > 1 else given.teacher
    trainer = DistillationTrainer(model=last.model, teacher_model=previous, args=args, **given.extra)
    trainer.lineage, trainer.stage_metrics = saved.get("lineage"), saved.get("metrics")
    trainer.stage_details, trainer.stage_setup = saved.get("stage"), saved.get("setup")
    trainer.scheme_config = scheme
    return trainer


def pushed_by_the_caller(args):
    """``args`` for a scheme function that saves its student itself (mean teacher, self-distillation) when run by
    :func:`~hf_kd.schemes.registry.run_scheme`: without ``push_to_hub``, so that the student is pushed once — by the
    caller's ``result.trainer.save_model()`` / ``push_to_hub()``, with the card the caller completes (see
    :func:`restore_push`).

    Args:
        args: the run's :class:`~hf_kd.DistillationConfig`.

    Returns:
        ``args`` with ``push_to_hub=False`` (``args`` itself when it does not push).
    """
    return dataclasses.replace(args, push_to_hub=False) if args.push_to_hub else args


def restore_push(trainer, args):
    """Give the scheme's final trainer ``args.push_to_hub`` back (set on its own arguments: replacing them would
    rebuild their process state), so its ``save_model`` pushes as a Trainer's does.

    Args:
        trainer: the scheme's final trainer.
        args: the run's :class:`~hf_kd.DistillationConfig`, as the caller gave it.

    Returns:
        ``trainer``.
    """
    if args.push_to_hub:
        trainer.args.push_to_hub = True
    return trainer


def check_stages(args: DistillationConfig, stages: dict[str, list[str]]) -> None:
    """Refuse, before the first stage trains, what a later stage's trainer would refuse once the stages before it
    had trained. ``stages``: each stage's name → the names of its teachers (:func:`chain_teachers`), which change
    along a chain (several teachers, then one; one, then born-again's ensemble), and with them what ``args`` must
    fit: a weight per teacher, ``chunk_size`` with one teacher only, the teachers the losses name. Stages finished
    in an earlier run are read back, not trained, and not checked.

    Args:
        args: the :class:`~hf_kd.DistillationConfig` every stage uses.
        stages: each stage's name → the names of its teachers (:func:`chain_teachers`).

    Raises:
        ValueError: ``teacher_aggregation`` / ``teacher_weights`` set while every stage has one teacher, or a
            stage's trainer would refuse ``args`` (the message names the stage and its teachers).
    """
    combined = args.teacher_aggregation != "mean_probs" or args.teacher_weights is not None
    if combined and all(len(teachers) == 1 for teachers in stages.values()):
        raise ValueError(
            f"teacher_aggregation={args.teacher_aggregation!r} / teacher_weights={args.teacher_weights} combine "
            f"several teachers, and every stage of this chain ({', '.join(stages)}) has one: they would do nothing. "
            "Leave both unset (born_again's ensemble_last gives its last generation several)."
        )
    for name, teachers in stages.items():
        if finished_stage(args, name):
            continue
        try:
            own = args_for_teachers(args, teachers)
            aggregator = TeacherAggregator.from_config(teachers, own) if len(teachers) > 1 else None
            Objective(own.loss_specs, teachers, own, aggregator)  # what the stage's DistillationTrainer builds
            check_teacher_count(own, teachers)
        except ValueError as error:
            raise ValueError(
                f"stage {name!r}, taught by {teachers}, would refuse its settings (checked before any stage "
                f"trains; the same args serve every stage, so they must fit each stage's teachers): {error}"
            ) from error


def args_for_teachers(args: DistillationConfig, teachers: list[str]) -> DistillationConfig:
    """A stage's ``args``: a chain's ``teacher_aggregation`` / ``teacher_weights`` are for its stages with several
    teachers (born-again's last generation, say); a stage with one teacher has nothing to combine, so it runs
    without them (a lone trainer refuses them).

    Args:
        args: the chain's :class:`~hf_kd.DistillationConfig`.
        teachers: the stage's teachers by name.

    Returns:
        ``args``, or a copy without ``teacher_aggregation`` / ``teacher_weights`` for a stage with one teacher.
    """
    if len(teachers) > 1 or (args.teacher_weights is None and args.teacher_aggregation == "mean_probs"):
        return args
    return dataclasses.replace(args, teacher_aggregation="mean_probs", teacher_weights=None)


def chain_teachers(names: list[str], teacher) -> dict[str, list[str]]:
    """Each stage's teachers by name, for :func:`check_stages`, along a chain whose stages ``names`` each learn
    from the one before: the first from ``teacher`` (one model, source or path: ``"teacher"``; a list or dict: its
    members, named as its trainer names them), every later one from one model.

    Args:
        names: the stages, in order.
        teacher: the first stage's teacher(s).

    Returns:
        Each stage's name → its teachers' names.
    """
    first = list(name_models(teacher, SINGLE_TEACHER, reserved=("student",)))
    return {name: first if index == 0 else [SINGLE_TEACHER] for index, name in enumerate(names)}


def finished_stage(args: DistillationConfig, name: str) -> bool:
    """Whether stage ``name`` saved its model in an earlier run (and so is read back, not trained).

    Args:
        args: the run's :class:`~hf_kd.DistillationConfig` (its ``output_dir`` holds the stages).
        name: the stage's name.

    Returns:
        Whether ``OUTPUT_DIR/NAME/model/distillation_config.json`` exists.
    """
    return os.path.exists(os.path.join(args.output_dir, name, MODEL_FOLDER, DISTILLATION_CONFIG_NAME))


def describe(name: str, model: nn.Module, metrics: dict | None = None) -> dict:
    """A lineage entry: a stage (or the first teacher) by name, class, size and its evaluation metrics.

    Args:
        name: the stage's (or teacher's) name.
        model: its model.
        metrics: its evaluation metrics, if any.

    Returns:
        ``{"stage", "class", "parameters"}`` and ``"metrics"`` when given.
    """
    from ..evaluation import count_parameters

    return {
        "stage": name,
        "class": type(model).__name__,
        "parameters": count_parameters(model),
        **({"metrics": metrics} if metrics else {}),
    }
