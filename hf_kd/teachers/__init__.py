"""Where teacher outputs come from: loading, freezing and placing teacher models (:mod:`.loading`), the source
protocol (:mod:`.base`), live models (:mod:`.live`), the student's own base (:mod:`.adapter_base`), predictions that
travel with the rows (:mod:`.precomputed`), several teachers combined into one (:mod:`.ensemble`) and a teacher
served by an inference engine (:mod:`.served`)."""

from .adapter_base import AdapterBaseTeacher
from .base import TeacherSource
from .ensemble import AGGREGATIONS, ENSEMBLE, TeacherAggregator, mix_sparse
from .live import LiveTeacher
from .loading import (
    SINGLE_TEACHER,
    build_teachers,
    check_materialized,
    freeze,
    load_teacher,
    looks_like_local_path,
    name_models,
    place_teacher,
    prepare_teacher,
    unwrap,
    use_eager_attention,
)
from .precomputed import PrecomputedPredictions
from .served import ServedTeacher, TeacherServerError

__all__ = [
    "AGGREGATIONS",
    "ENSEMBLE",
    "SINGLE_TEACHER",
    "AdapterBaseTeacher",
    "LiveTeacher",
    "PrecomputedPredictions",
    "ServedTeacher",
    "TeacherAggregator",
    "TeacherServerError",
    "TeacherSource",
    "build_teachers",
    "check_materialized",
    "freeze",
    "load_teacher",
    "looks_like_local_path",
    "mix_sparse",
    "name_models",
    "place_teacher",
    "prepare_teacher",
    "unwrap",
    "use_eager_attention",
]
