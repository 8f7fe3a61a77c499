"""The distillation trainer: ``trainer.py`` is the glue; ``compat.py`` holds every override of a private
``transformers.Trainer`` method; ``batch_loss.py`` one micro-batch's terms; ``loss_parts.py`` the losses' learned
parts; ``reporting.py`` the summary, card, comparison and push."""

from .loss_parts import LOSS_OPTIMIZER_NAME, LOSS_PARTS_NAME
from .reporting import DISTILLATION_CONFIG_NAME, HUB_UPLOAD_FOLDER
from .trainer import DistillationTrainer

__all__ = [
    "DISTILLATION_CONFIG_NAME",
    "HUB_UPLOAD_FOLDER",
    "LOSS_OPTIMIZER_NAME",
    "LOSS_PARTS_NAME",
    "DistillationTrainer",
]
