"""hf_kd: knowledge distillation for Hugging Face Transformers."""

from .config import DistillationConfig, LossSpec
from .features import ModelFeatures
from .losses import DistillationLoss, available_losses, get_loss, register_loss
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "DistillationConfig",
    "DistillationLoss",
    "DistillationTrainer",
    "LossSpec",
    "ModelFeatures",
    "available_losses",
    "get_loss",
    "register_loss",
]
