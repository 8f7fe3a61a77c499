"""Teacher-aggregation settings refused by their one validator (``hf_kd.teachers.ensemble.check_aggregation``),
from the config before any teacher is known and from ``TeacherAggregator`` once the teachers are named."""

from __future__ import annotations

import math

from conftest import classification_data, config, tiny_bert
from refusal_cases import Case

from hf_kd import DistillationTrainer
from hf_kd.teachers.ensemble import TeacherAggregator

CASES = [
    Case(
        "aggregation-unknown",
        '`DistillationConfig(teacher_aggregation="median")`',
        lambda p: config(p, teacher_aggregation="median"),
        ValueError,
        "teacher_aggregation must be one of ('mean_probs', 'mean_logits', 'weighted', 'adaptive', 'best')",
    ),
    Case(
        "aggregation-weights-not-weighted",
        "`DistillationConfig(teacher_weights=[1, 2])` (aggregation left at mean_probs)",
        lambda p: config(p, teacher_weights=[1.0, 2.0]),
        ValueError,
        "teacher_weights apply to teacher_aggregation='weighted', not 'mean_probs'",
    ),
    Case(
        "aggregation-weights-all-zero",
        '`DistillationConfig(teacher_aggregation="weighted", teacher_weights=[0, 0])`',
        lambda p: config(p, teacher_aggregation="weighted", teacher_weights=[0.0, 0.0]),
        ValueError,
        "teacher_weights must be finite, >= 0 and not all 0, got [0.0, 0.0]",
    ),
    Case(
        "aggregation-adaptive-temperature-zero",
        '`DistillationConfig(teacher_aggregation="adaptive", adaptive_temperature=0)`',
        lambda p: config(p, teacher_aggregation="adaptive", adaptive_temperature=0.0),
        ValueError,
        "adaptive_temperature must be a finite number > 0, got 0.0",
    ),
    Case(
        "aggregation-weights-per-teacher",
        '`DistillationTrainer(student, {"a": ..., "b": ..., "c": ...}, DistillationConfig(teacher_aggregation='
        '"weighted", teacher_weights=[1, 2]))`',
        lambda p: DistillationTrainer(
            tiny_bert(hidden=16, seed=2),
            {"a": tiny_bert(seed=1), "b": tiny_bert(seed=3), "c": tiny_bert(seed=4)},
            config(p / "out", teacher_aggregation="weighted", teacher_weights=[1.0, 2.0]),
            train_dataset=classification_data(),
        ),
        ValueError,
        "teacher_aggregation='weighted' needs teacher_weights with one weight per teacher ['a', 'b', 'c']",
    ),
    Case(
        "aggregator-nan-weight",
        '`TeacherAggregator(["a", "b"], "weighted", static_weights=[1, nan])`',
        lambda p: TeacherAggregator(["a", "b"], "weighted", static_weights=[1.0, math.nan]),
        ValueError,
        "teacher_weights must be finite, >= 0 and not all 0, got [1.0, nan]",
    ),
]
