"""Schemes made of several distillation runs in a row (teacher → assistant → student; generations): each stage a
:class:`~hf_kd.DistillationTrainer` run in its own folder, resumed from its last checkpoint when the chain is run
again, skipped once its model is saved, and its lineage (every teacher before it) recorded in its
``distillation_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from torch import nn

from ..checkpoints import last_complete_checkpoint
from ..checks import check_teacher_count
from ..config import DistillationConfig
from ..objective import Objective
from ..teachers import SINGLE_TEACHER, TeacherAggregator, name_models

MODEL_FOLDER = "model"  # a stage's saved student, inside the stage folder
LINEAGE_KEY = "lineage"


@dataclass
class Stage:
    """One finished stage: its name, folder, the student it trained (in memory) and the metrics of ``evaluate``."""

    name: str
    folder: str
    model: nn.Module
    metrics: dict
    details: dict = dataclasses.field(default_factory=dict)  # what the scheme records about the stage
    trainer: object | None = dataclasses.field(default=None, repr=False)  # None when read back from an earlier run

    @property
    def model_folder(self) -> str:
        return os.path.join(self.folder, MODEL_FOLDER)


def run_stage(
    name: str,
    student: nn.Module,
    teacher,
    args: DistillationConfig,
    lineage: list[dict],
    load_student=None,
    details: dict | None = None,
    **trainer_kwargs,
) -> Stage:
    """Distil ``student`` from ``teacher`` into ``args.output_dir/name`` (or load it when that stage finished
    before: ``load_student(folder)`` reads a saved student back). ``details`` (e.g. a round's pseudo-labels) go
    into the stage's ``distillation_config.json`` under ``"stage"``."""
    from ..trainer import DistillationTrainer

    folder = os.path.join(args.output_dir, name)
    model_folder = os.path.join(folder, MODEL_FOLDER)
    if finished_stage(args, name):
        if load_student is None:
            raise ValueError(
                f"stage {name!r} finished in an earlier run ({model_folder}); pass load_student (e.g. "
                "AutoModelForSequenceClassification.from_pretrained) to read it back, or remove the folder to redo it."
            )
        with open(os.path.join(model_folder, "distillation_config.json")) as handle:
            saved = json.load(handle)
        return Stage(name, folder, load_student(model_folder), saved.get("metrics", {}), saved.get("stage", {}))
    stage_args = dataclasses.replace(args, output_dir=folder)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=stage_args, **trainer_kwargs)
    trainer.lineage = lineage
    trainer.stage_details = details or {}
    checkpoint = last_complete_checkpoint(folder)
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    trainer.stage_metrics = metrics
    trainer.save_model(model_folder)  # last: a stage counts as finished only once its model is there
    return Stage(name, folder, trainer.accelerator.unwrap_model(trainer.model), metrics, details or {}, trainer)


def check_stages(args: DistillationConfig, stages: dict[str, list[str]]) -> None:
    """Refuse, before the first stage trains, what a later stage's trainer would refuse once the stages before it
    had trained. ``stages``: each stage's name → the names of its teachers (:func:`chain_teachers`), which change
    along a chain (several teachers, then one; one, then born-again's ensemble), and with them what ``args`` must
    fit: a weight per teacher, ``chunk_size`` with one teacher only, the teachers the losses name. Stages finished
    in an earlier run are read back, not trained, and not checked."""
    for name, teachers in stages.items():
        if finished_stage(args, name):
            continue
        try:
            aggregator = TeacherAggregator.from_config(teachers, args) if len(teachers) > 1 else None
            Objective(args.loss_specs, teachers, args, aggregator)  # what the stage's DistillationTrainer builds
            check_teacher_count(args, teachers)
        except ValueError as error:
            raise ValueError(
                f"stage {name!r}, taught by {teachers}, would refuse its settings (checked before any stage "
                f"trains; the same args serve every stage, so they must fit each stage's teachers): {error}"
            ) from error


def chain_teachers(names: list[str], teacher) -> dict[str, list[str]]:
    """Each stage's teachers by name, for :func:`check_stages`, along a chain whose stages ``names`` each learn
    from the one before: the first from ``teacher`` (one model, source or path: ``"teacher"``; a list or dict: its
    members, named as its trainer names them), every later one from one model."""
    first = list(name_models(teacher, SINGLE_TEACHER, reserved=("student",)))
    return {name: first if index == 0 else [SINGLE_TEACHER] for index, name in enumerate(names)}


def finished_stage(args: DistillationConfig, name: str) -> bool:
    """Whether stage ``name`` saved its model in an earlier run (and so is read back, not trained)."""
    return os.path.exists(os.path.join(args.output_dir, name, MODEL_FOLDER, "distillation_config.json"))


def describe(name: str, model: nn.Module, metrics: dict | None = None) -> dict:
    """A lineage entry: a stage (or the first teacher) by name, class, size and its evaluation metrics."""
    from ..evaluation import count_parameters

    return {
        "stage": name,
        "class": type(model).__name__,
        "parameters": count_parameters(model),
        **({"metrics": metrics} if metrics else {}),
    }
