"""Offline distillation, the default scheme: the student learns from frozen teachers — one, or several combined by
``DistillationConfig.teacher_aggregation`` (live models, caches, the student's own base)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DistillationConfig
from ..trainer import DistillationTrainer
from .registry import SchemeConfig, SchemeInputs, SchemeResult, register_scheme


@dataclass
class OfflineConfig(SchemeConfig):
    """Offline distillation has no settings of its own: the teachers and :class:`~hf_kd.DistillationConfig` say it
    all."""


@register_scheme("offline", config=OfflineConfig, teachers="many")
def run_offline(config: OfflineConfig, args: DistillationConfig, given: SchemeInputs) -> SchemeResult:
    """Offline: one distillation run from frozen teachers (several are combined by --teacher_aggregation).

    Args:
        config: the scheme's settings (none).
        args: the run's :class:`~hf_kd.DistillationConfig`.
        given: the student builder, data, teacher(s) and trainer arguments.

    Returns:
        The trained student's trainer, and no stages.
    """
    trainer = DistillationTrainer(
        model=given.make_student(1), teacher_model=given.teacher, args=args, **given.trainer_kwargs
    )
    trainer.scheme_config = config
    trainer.train()
    return SchemeResult(trainer, [])
