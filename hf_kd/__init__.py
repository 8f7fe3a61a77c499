"""hf_kd: knowledge distillation for Hugging Face Transformers."""

from .cache import TeacherCache, write_teacher_cache
from .config import DistillationConfig, LossSpec
from .features import ModelFeatures
from .losses import DistillationLoss, available_losses, get_loss, register_loss

# The schemes (a layer above the trainer) last: the package root re-exports every layer; no module imports it back.
from .schemes import (  # noqa: E402
    BornAgainConfig,
    CrossModalConfig,
    MeanTeacherConfig,
    MutualLearningConfig,
    MutualLearningTrainer,
    NoisyStudentConfig,
    OfflineConfig,
    SchemeConfig,
    SchemeResult,
    SelfDistillationConfig,
    SelfDistillationTrainer,
    TeacherAssistantConfig,
    available_schemes,
    register_scheme,
    run_scheme,
)
from .teachers import AdapterBaseTeacher
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "AdapterBaseTeacher",
    "BornAgainConfig",
    "CrossModalConfig",
    "MeanTeacherConfig",
    "MutualLearningConfig",
    "MutualLearningTrainer",
    "NoisyStudentConfig",
    "OfflineConfig",
    "SchemeConfig",
    "SchemeResult",
    "SelfDistillationConfig",
    "SelfDistillationTrainer",
    "TeacherAssistantConfig",
    "available_schemes",
    "register_scheme",
    "run_scheme",
    "DistillationConfig",
    "DistillationLoss",
    "DistillationTrainer",
    "LossSpec",
    "ModelFeatures",
    "TeacherCache",
    "available_losses",
    "get_loss",
    "register_loss",
    "write_teacher_cache",
]
