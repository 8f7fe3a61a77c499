"""Distillation losses: a registry of small modules over the pure functions in :mod:`.functional`."""

from . import functional
from .base import DistillationLoss, EmbeddingRelationLoss, LayerPairLoss
from .registry import available_losses, get_loss, register_loss, resolve_loss_class

# Importing a family module registers its losses.
from . import response, intermediate, relation, mutual_info, regression, embedding, ranking  # noqa: E402,F401  isort: skip

__all__ = [
    "DistillationLoss",
    "EmbeddingRelationLoss",
    "LayerPairLoss",
    "available_losses",
    "functional",
    "get_loss",
    "register_loss",
    "resolve_loss_class",
]
