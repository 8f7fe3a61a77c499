"""hf_kd: knowledge distillation for Hugging Face Transformers."""

from .cache import TeacherCache, write_teacher_cache
from .config import DistillationConfig, LossSpec
from .features import ModelFeatures
from .losses import DistillationLoss, available_losses, get_loss, register_loss
from .teachers import AdapterBaseTeacher
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "AdapterBaseTeacher",
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
