"""Offline distillation, the default scheme: the student learns from frozen teachers — one, or several combined by
``DistillationConfig.teacher_aggregation`` (live models, caches, the student's own base)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DistillationConfig
from ..trainer import DistillationTrainer
from .registry import SchemeConfig, SchemeResult, register_scheme


@dataclass
class OfflineConfig(SchemeConfig):
    """Offline distillation has no settings of its own: the teachers and :class:`~hf_kd.DistillationConfig` say it
    all."""


@register_scheme("offline", config=OfflineConfig, teachers="many")
def run_offline(
    config: OfflineConfig,
    args: DistillationConfig,
    *,
    teacher,
    make_student,
    train_dataset,
    load_student=None,
    make_assistant=None,
    make_noise=None,
    **trainer_kwargs,
) -> SchemeResult:
    """Offline: one distillation run from frozen teachers (several are combined by --teacher_aggregation)."""
    trainer = DistillationTrainer(
        model=make_student(1), teacher_model=teacher, args=args, train_dataset=train_dataset, **trainer_kwargs
    )
    trainer.scheme_config = config
    trainer.train()
    return SchemeResult(trainer, [])
