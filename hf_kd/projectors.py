"""Learned maps from student feature widths to teacher widths (FitNets regressors, TinyBERT's W_h)."""

from __future__ import annotations

import torch
from torch import nn

PROJECTORS = ("linear", "mlp", "conv", "auto")


def check_projector_kind(kind: str | None) -> None:
    """Raise unless ``kind`` is ``None`` or one of :data:`PROJECTORS` (checked when a loss is built).

    Args:
        kind: A projector kind.

    Raises:
        ValueError: an unknown kind.
    """
    if kind is not None and kind not in PROJECTORS:
        raise ValueError(f"projector must be one of {PROJECTORS} or None, got {kind!r}.")


class Projector(nn.Module):
    """Maps the channel dimension of a student feature to the teacher's width.

    Channels are the last dimension of tokens ``B×T×H`` and vectors ``B×H``, and dimension 1 of feature maps
    ``B×C×H×W``.

    Args:
        kind: ``linear`` is one Linear (a 1×1 convolution on maps), ``mlp`` adds a hidden layer with GELU, ``conv`` is
            a 1×1 convolution (maps only), ``auto`` is ``conv`` for maps and ``linear`` otherwise.
        in_width: The student's width.
        out_width: The teacher's width.
        feature_dims: The features' number of dimensions (4 for feature maps).

    Raises:
        ValueError: an unknown ``kind``, or ``conv`` for features that are not maps.
    """

    def __init__(self, kind: str, in_width: int, out_width: int, feature_dims: int):
        super().__init__()
        check_projector_kind(kind)
        self.maps = feature_dims == 4
        if kind == "conv" and not self.maps:
            raise ValueError("projector 'conv' applies to feature maps B×C×H×W; use 'linear' for tokens/vectors.")
        if self.maps:
            layer = lambda i, o: nn.Conv2d(i, o, kernel_size=1)  # noqa: E731
        else:
            layer = nn.Linear
        if kind == "mlp":
            hidden = max(in_width, out_width)
            self.net = nn.Sequential(layer(in_width, hidden), nn.GELU(), layer(hidden, out_width))
        else:
            self.net = layer(in_width, out_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.to(next(self.parameters()).dtype))


def channel_width(tensor: torch.Tensor) -> int:
    """The channel width of a feature: dimension 1 of maps ``B×C×H×W``, else the last.

    Args:
        tensor: Tokens, vectors or feature maps.

    Returns:
        The width.
    """
    return tensor.shape[1] if tensor.dim() == 4 else tensor.shape[-1]


def make_projector(kind: str | None, student: torch.Tensor, teacher: torch.Tensor, loss_name: str, what: str):
    """A projector from the student's width to the teacher's, ``None`` when widths agree and none is asked.

    Args:
        kind: A :class:`Projector` kind, or ``None`` for none.
        student: A student feature (its width and kind).
        teacher: The teacher feature it is compared with.
        loss_name: The loss's id, for the message.
        what: What the features are (``"features"``, ``"embeddings"``), for the message.

    Returns:
        A new :class:`Projector`, or ``None``.

    Raises:
        ValueError: the widths differ and ``kind`` is ``None`` (the message names both widths and the option to set).
    """
    in_width, out_width = channel_width(student), channel_width(teacher)
    if kind is None:
        if in_width != out_width:
            raise ValueError(
                f"{loss_name}: the student's {what} are {in_width} wide and the teacher's {out_width}; set the "
                f"loss option projector='linear' (or 'mlp', or 'conv' for feature maps) to learn a map between them."
            )
        return None
    return Projector(kind, in_width, out_width, student.dim())
