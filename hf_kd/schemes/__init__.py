"""Teacher-student schemes, each a module found by its name: a :class:`SchemeConfig` dataclass of its settings and a
run function registered with :func:`register_scheme`; :func:`run_scheme` runs any of them. Importing this package
imports every scheme module, so the registry is complete."""

from . import (  # noqa: F401  (each module registers its scheme)
    amalgamation,
    born_again,
    cross_modal,
    graph,
    mean_teacher,
    mutual_learning,
    noisy_student,
    offline,
    self_distillation,
    teacher_assistant,
)
from .amalgamation import AmalgamationConfig
from .born_again import BornAgainConfig
from .cross_modal import CrossModalConfig
from .graph import DistillationGraph, GraphConfig, GraphEdge, GraphTrainer
from .mean_teacher import MeanTeacherConfig
from .mutual_learning import MutualLearningConfig, MutualLearningTrainer
from .noisy_student import NoisyStudentConfig
from .offline import OfflineConfig
from .registry import (
    SchemeConfig,
    SchemeEntry,
    SchemeInputs,
    SchemeResult,
    available_schemes,
    get_scheme,
    register_scheme,
    run_scheme,
)
from .self_distillation import SelfDistillationConfig, SelfDistillationTrainer
from .stages import Stage
from .teacher_assistant import TeacherAssistantConfig

__all__ = [
    "AmalgamationConfig",
    "BornAgainConfig",
    "CrossModalConfig",
    "DistillationGraph",
    "GraphConfig",
    "GraphEdge",
    "GraphTrainer",
    "MeanTeacherConfig",
    "MutualLearningConfig",
    "MutualLearningTrainer",
    "NoisyStudentConfig",
    "OfflineConfig",
    "SchemeConfig",
    "SchemeEntry",
    "SchemeInputs",
    "SchemeResult",
    "SelfDistillationConfig",
    "SelfDistillationTrainer",
    "Stage",
    "TeacherAssistantConfig",
    "available_schemes",
    "get_scheme",
    "register_scheme",
    "run_scheme",
]
