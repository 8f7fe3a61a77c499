"""Loss registry: ids to classes, and building a loss from an id or a dotted import path."""

from __future__ import annotations

import importlib
import inspect

from .base import DistillationLoss

_REGISTRY: dict[str, type[DistillationLoss]] = {}


def register_loss(name: str, paper: str = ""):
    """Class decorator that registers a :class:`DistillationLoss` under ``name``, citing ``paper`` (model cards)."""

    def decorate(cls: type[DistillationLoss]) -> type[DistillationLoss]:
        if not (inspect.isclass(cls) and issubclass(cls, DistillationLoss)):
            raise TypeError(f"@register_loss({name!r}) must decorate a DistillationLoss subclass, got {cls!r}.")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"loss id {name!r} is already registered to {_REGISTRY[name].__qualname__}.")
        cls.name = name
        cls.paper = paper
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_losses() -> list[str]:
    """The registered loss ids, sorted."""
    return sorted(_REGISTRY)


def resolve_loss_class(name: str) -> type[DistillationLoss]:
    """The class for a registered id or for a dotted path ``package.module.ClassName`` to a user's own loss."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import loss class {name!r}: {error}.") from error
        if not (inspect.isclass(cls) and issubclass(cls, DistillationLoss)):
            raise ValueError(f"{name!r} is not a subclass of hf_kd.losses.DistillationLoss.")
        return cls
    raise ValueError(
        f"unknown loss {name!r}. Valid ids: {', '.join(available_losses())}; "
        "or give a dotted import path to your own DistillationLoss subclass."
    )


def get_loss(name: str, **kwargs) -> DistillationLoss:
    """Build the loss ``name`` (a registered id or a dotted class path) with ``kwargs``.

    ``temperature`` is dropped for losses that take none, so a trainer-wide temperature can be passed to all.
    """
    cls = resolve_loss_class(name)
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "temperature" in kwargs and "temperature" not in parameters and not takes_any:
        kwargs.pop("temperature")
    unknown = [key for key in kwargs if key not in parameters] if not takes_any else []
    if unknown:
        valid = [key for key in parameters if key != "self"]
        raise ValueError(f"loss {name!r} got unknown option(s) {unknown}; it accepts {valid}.")
    return cls(**kwargs)
