"""hf_kd: knowledge distillation for Hugging Face Transformers."""

from .cache import TeacherCache, write_teacher_cache
from .config import DistillationConfig, LossSpec
from .features import ModelFeatures
from .losses import DistillationLoss, available_losses, get_loss, register_loss
from .teachers import AdapterBaseTeacher, ServedTeacher
from .trainer import DistillationTrainer

__version__ = "0.1.0"

# The schemes are a layer above the trainer: exported here, loaded on first use (``import hf_kd`` stays the core).
_SCHEME_EXPORTS = (
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
    "SchemeResult",
    "SelfDistillationConfig",
    "SelfDistillationTrainer",
    "TeacherAssistantConfig",
    "available_schemes",
    "register_scheme",
    "run_scheme",
)


def __getattr__(name: str):
    if name in _SCHEME_EXPORTS:
        from importlib import import_module

        return getattr(import_module(".schemes", __name__), name)
    raise AttributeError(f"module 'hf_kd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SCHEME_EXPORTS])


__all__ = [
    "AdapterBaseTeacher",
    "DistillationConfig",
    "DistillationLoss",
    "DistillationTrainer",
    "LossSpec",
    "ModelFeatures",
    "ServedTeacher",
    "TeacherCache",
    "available_losses",
    "get_loss",
    "register_loss",
    "write_teacher_cache",
    *_SCHEME_EXPORTS,
]
