"""Loss registry: ids to classes, and building a loss from an id or a dotted import path."""

from __future__ import annotations

import difflib
import importlib
import inspect
import math

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


def accepted_options(cls: type[DistillationLoss]) -> list[str] | None:
    """The option names a loss class takes (``None`` when its ``__init__`` takes any keyword)."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return [key for key in parameters if key != "self"]


def takes_option(name: str, option: str) -> bool:
    """Whether the loss ``name`` takes the option ``option``."""
    accepted = accepted_options(resolve_loss_class(name))
    return accepted is None or option in accepted


def check_loss_options(name: str, options: dict) -> None:
    """Raise for an option the loss does not take (naming the closest valid one) or a non-finite number."""
    accepted = accepted_options(resolve_loss_class(name))
    if accepted is not None:
        for key in options:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"loss {name!r} got unknown option {key!r}; it accepts {accepted}.{hint}")
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"option {key}={value} of loss {name!r} is not a finite number.")


def get_loss(name: str, **kwargs) -> DistillationLoss:
    """Build the loss ``name`` (a registered id or a dotted class path) with the options ``kwargs``, each of which
    it must take."""
    check_loss_options(name, kwargs)
    return resolve_loss_class(name)(**kwargs)
