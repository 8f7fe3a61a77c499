"""Teacher assistant (Mirzadeh et al. 2020, *Improved Knowledge Distillation via Teacher Assistant*,
arXiv:1902.03393): across a large size gap, distil teacher → assistant(s) → student, each assistant the next one's
teacher, so that no stage has to bridge the whole gap."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..config import DistillationConfig
from ..teachers import SINGLE_TEACHER
from .registry import SchemeConfig, SchemeInputs, SchemeResult, register_scheme
from .stages import Stage, chain_teachers, check_stages, describe, final_trainer, run_stage


@dataclass
class TeacherAssistantConfig(SchemeConfig):
    """Settings of the teacher-assistant chain (teacher → assistant → student). Both are handed to
    ``make_assistant(hidden_size, layers)``; left unset, it chooses (the recipes: between teacher and student).

    Args:
        assistant_hidden_size: teacher_assistant: the assistant's width (default: between the two).
        assistant_layers: teacher_assistant: the assistant's depth (default: between the two).

    Raises:
        ValueError: a setting that is neither None nor a whole number >= 1.
    """

    assistant_hidden_size: int | None = field(
        default=None, metadata={"help": "teacher_assistant: the assistant's width (default: between the two)."}
    )
    assistant_layers: int | None = field(
        default=None, metadata={"help": "teacher_assistant: the assistant's depth (default: between the two)."}
    )

    def __post_init__(self):
        for name in ("assistant_hidden_size", "assistant_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 (or None: the default), got {value!r}.")


def teacher_assistant(
    teacher,
    assistants: list[nn.Module],
    student: nn.Module,
    args: DistillationConfig,
    *,
    load_student=None,
    scheme: TeacherAssistantConfig | None = None,
    **trainer_kwargs,
) -> list[Stage]:
    """Run the chain ``teacher → assistants[0] → … → student``: one :class:`~hf_kd.DistillationTrainer` run per
    stage with ``args`` (the stage's folder is ``args.output_dir/assistant1``, …, ``/student``; its saved model in
    ``model/``) and ``trainer_kwargs`` (datasets, collator, ``compute_metrics``…). Returns the stages in order.

    Running the chain again resumes the unfinished stage from its last checkpoint and reads the finished ones back
    with ``load_student(folder)`` (e.g. ``AutoModelForSequenceClassification.from_pretrained``), so a failed stage
    leaves the earlier stages' outputs intact. Each stage's ``distillation_config.json`` lists its lineage: the
    teacher and every stage before it, with their metrics. Every stage's settings are checked before the first one
    trains (:func:`~hf_kd.schemes.stages.check_stages`). ``scheme`` (the settings the assistants were built with)
    is recorded in each stage's summary.

    Args:
        teacher: the first stage's teacher(s), as ``DistillationTrainer``'s ``teacher_model``.
        assistants: the assistants, largest first, each trained before the next.
        student: the last stage's model.
        args: the :class:`~hf_kd.DistillationConfig` of every stage (its ``output_dir`` holds the stages).
        load_student: reads a finished stage's saved student back on a rerun.
        scheme: the scheme's settings, recorded in each stage's summary (default: ``TeacherAssistantConfig()``).
        **trainer_kwargs: passed to every stage's trainer (``train_dataset``, ``data_collator``, ...).

    Returns:
        The stages in order, the student's last.

    Raises:
        ValueError: no assistant, or what :func:`~hf_kd.schemes.stages.check_stages` and
            :func:`~hf_kd.schemes.stages.run_stage` refuse.
    """
    scheme = scheme if scheme is not None else TeacherAssistantConfig()
    if not assistants:
        raise ValueError("teacher_assistant needs at least one assistant between the teacher and the student.")
    names = [f"assistant{index + 1}" for index in range(len(assistants))] + ["student"]
    check_stages(args, chain_teachers(names, teacher))
    lineage = [_describe_teacher(teacher)]
    stages: list[Stage] = []
    current = teacher
    for name, model in zip(names, [*assistants, student]):
        stage = run_stage(name, model, current, args, lineage, load_student, scheme=scheme, **trainer_kwargs)
        stages.append(stage)
        lineage = [*lineage, describe(name, stage.model, stage.metrics)]
        current = stage.model
    return stages


def _describe_teacher(teacher) -> dict:
    if isinstance(teacher, (list, tuple, dict)):  # several teachers: each described under its trainer name
        named = teacher if isinstance(teacher, dict) else {f"{SINGLE_TEACHER}{i}": t for i, t in enumerate(teacher)}
        described = {name: _describe_teacher(source) for name, source in named.items()}
        return {"stage": "teacher", "teachers": {name: {**entry, "stage": name} for name, entry in described.items()}}
    if isinstance(teacher, nn.Module):
        return describe("teacher", teacher)
    return {"stage": "teacher", "source": str(getattr(teacher, "path", teacher))}


@register_scheme("teacher_assistant", config=TeacherAssistantConfig, teachers="one", stages=True)
def run_teacher_assistant(
    config: TeacherAssistantConfig, args: DistillationConfig, given: SchemeInputs
) -> SchemeResult:
    """teacher → assistant → student: an assistant between the two sizes learns from the teacher, then teaches the
    student (Mirzadeh et al. 2020).

    Args:
        config: the assistant's size.
        args: the :class:`~hf_kd.DistillationConfig` of every stage.
        given: the student and assistant builders, data, teacher and trainer arguments.

    Returns:
        The student's trainer, and the assistant's stage.

    Raises:
        ValueError: no ``make_assistant`` given.
    """
    if given.make_assistant is None:
        raise ValueError("scheme 'teacher_assistant' needs make_assistant(hidden_size, layers) to build the assistant.")
    assistant = given.make_assistant(config.assistant_hidden_size, config.assistant_layers)
    stages = teacher_assistant(
        given.teacher,
        [assistant],
        given.make_student(1),
        args,
        load_student=given.load_student,
        scheme=config,
        **given.trainer_kwargs,
    )
    return SchemeResult(final_trainer(stages, args, config, given), stages[:-1])
