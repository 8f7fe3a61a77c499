"""Born-again networks (Furlanello et al. 2018, *Born Again Neural Networks*, arXiv:1805.04770): students of the
teacher's own architecture, generation after generation, the teacher of generation k being generation k − 1; the
last generation may learn from the ensemble of all before it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from ..config import DistillationConfig
from ..teachers import SINGLE_TEACHER, name_models
from .registry import SchemeConfig, SchemeInputs, SchemeResult, register_scheme
from .stages import Stage, chain_teachers, check_stages, describe, final_trainer, run_stage
from .teacher_assistant import _describe_teacher


@dataclass
class BornAgainConfig(SchemeConfig):
    """Settings of born-again networks: how many students are trained in a row, and whether the last learns from the
    teacher and every earlier generation.

    Args:
        generations: born_again: the number of generations.
        ensemble_last: born_again: the last generation learns from all earlier ones.

    Raises:
        ValueError: ``generations`` below 1, or ``ensemble_last`` with fewer than 2 generations.
    """

    stage_count_field: ClassVar[str] = "generations"

    generations: int = field(default=2, metadata={"help": "born_again: the number of generations."})
    ensemble_last: bool = field(
        default=False, metadata={"help": "born_again: the last generation learns from all earlier ones."}
    )

    def __post_init__(self):
        if not isinstance(self.generations, int) or self.generations < 1:
            raise ValueError(f"born_again needs generations >= 1, got {self.generations!r}.")
        if self.ensemble_last and self.generations < 2:
            raise ValueError("ensemble_last needs generations >= 2: the last generation's ensemble has earlier ones.")


def born_again(
    teacher,
    make_student: Callable[[int], nn.Module],
    args: DistillationConfig,
    *,
    generations: int = 3,
    ensemble_last: bool = False,
    load_student=None,
    scheme: BornAgainConfig | None = None,
    **trainer_kwargs,
) -> list[Stage]:
    """Train ``generations`` students, ``make_student(k)`` for generation k = 1…N (freshly initialised, the
    teacher's architecture), each distilled from generation k − 1 (the first from ``teacher``) in
    ``args.output_dir/generation{k}``. With ``ensemble_last`` the last generation's teachers are ``teacher`` and
    every earlier generation (a dict, combined by ``args.teacher_aggregation``; a list or dict of teachers joins it
    member by member). Every generation's settings are checked before generation 1 trains. Resuming and lineage as in
    :func:`~hf_kd.schemes.teacher_assistant.teacher_assistant`.

    Args:
        teacher: generation 1's teacher(s), as ``DistillationTrainer``'s ``teacher_model``.
        make_student: ``make_student(k)`` builds generation k's fresh student.
        args: the :class:`~hf_kd.DistillationConfig` of every generation (its ``output_dir`` holds them).
        generations: how many students are trained in a row.
        ensemble_last: the last generation learns from ``teacher`` and every earlier generation.
        load_student: reads a finished generation's saved student back on a rerun.
        scheme: the scheme's settings, recorded in each generation's summary (default: from the two above).
        **trainer_kwargs: passed to every generation's trainer (``train_dataset``, ``data_collator``, ...).

    Returns:
        The generations in order.

    Raises:
        ValueError: with ``ensemble_last``, a teacher named like an earlier generation; or what
            :func:`~hf_kd.schemes.stages.check_stages` and :func:`~hf_kd.schemes.stages.run_stage` refuse.
    """
    scheme = scheme if scheme is not None else BornAgainConfig(generations, ensemble_last)
    names = [f"generation{generation}" for generation in range(1, generations + 1)]
    plan = chain_teachers(names, teacher)
    if ensemble_last:  # the teacher's members and every earlier generation, side by side
        clash = sorted(set(plan[names[0]]) & set(names))
        if clash:
            raise ValueError(
                f"the last generation's ensemble names the earlier generations {names[:-1]}; the teachers {clash} "
                "have the same names: rename them."
            )
        plan[names[-1]] = [*plan[names[0]], *names[:-1]]
    check_stages(args, plan)  # the last generation's ensemble fits args, before generation 1 trains
    lineage = [_describe_teacher(teacher)]
    stages: list[Stage] = []
    current = teacher
    for generation in range(1, generations + 1):
        if ensemble_last and generation == generations:
            current = {**name_models(teacher, SINGLE_TEACHER), **{stage.name: stage.model for stage in stages}}
        name = names[generation - 1]
        stage = run_stage(
            name, make_student(generation), current, args, lineage, load_student, scheme=scheme, **trainer_kwargs
        )
        stages.append(stage)
        lineage = [*lineage, describe(name, stage.model, stage.metrics)]
        current = stage.model
    return stages


@register_scheme("born_again", config=BornAgainConfig, teachers="many", stages=True)
def run_born_again(config: BornAgainConfig, args: DistillationConfig, given: SchemeInputs) -> SchemeResult:
    """Born-again networks: generations of students of one architecture, each taught by the one before (the first by
    the teacher); with ensemble_last, the last by all of them (Furlanello et al. 2018).

    Args:
        config: the number of generations and ``ensemble_last``.
        args: the :class:`~hf_kd.DistillationConfig` of every generation.
        given: the student builder, data, teacher(s) and trainer arguments.

    Returns:
        The last generation's trainer, and the generations before it.
    """
    stages = born_again(
        given.teacher,
        given.make_student,
        args,
        generations=config.generations,
        ensemble_last=config.ensemble_last,
        load_student=given.load_student,
        scheme=config,
        **given.trainer_kwargs,
    )
    return SchemeResult(final_trainer(stages, args, config, given), stages[:-1])
