"""Multi-teacher distillation (the enhancement objective): ``teacher_model`` as a list or dict of teachers, combined by
``DistillationConfig.teacher_aggregation``. Several teachers are part of the core trainer; the aggregation itself
lives in :mod:`hf_kd.teachers.ensemble` (below the trainer), re-exported here under the scheme's name."""

from ..teachers.ensemble import AGGREGATIONS, ENSEMBLE, TeacherAggregator, mix_sparse

__all__ = ["AGGREGATIONS", "ENSEMBLE", "TeacherAggregator", "mix_sparse"]
