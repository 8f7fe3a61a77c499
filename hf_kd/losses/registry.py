"""Loss registry: ids to classes, and building a loss from an id or a dotted path to a class of an imported module."""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import sys
from typing import TYPE_CHECKING

from torch import nn

from .base import DistillationLoss

if TYPE_CHECKING:
    from ..config import LossSpec

_REGISTRY: dict[str, type[DistillationLoss]] = {}


def register_loss(name: str, paper: str = ""):
    """Class decorator that registers a :class:`DistillationLoss` under ``name``, citing ``paper`` (model cards).

    Args:
        name: The loss's id in ``losses`` (``"kl"``, ``"hidden_mse"``, ...).
        paper: The method's paper, cited on model cards.

    Returns:
        The decorator; it sets the class's ``name`` and ``paper`` and returns the class.

    Raises:
        TypeError: the decorated object is not a :class:`DistillationLoss` subclass.
        ValueError: ``name`` is already registered to another class.
    """

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
    """The registered loss ids, sorted.

    Returns:
        The ids, e.g. ``["at", "attention_kl", ...]``.
    """
    return sorted(_REGISTRY)


def resolve_loss_class(name: str, *, trust_imports: bool = False) -> type[DistillationLoss]:
    """The class for a registered id or for a dotted path ``package.module.ClassName`` to a user's own loss.

    A dotted path is looked up in a module the user's code has already imported (``sys.modules``): naming a
    module does not import it, since importing runs its top-level code and would pick up any ``.py`` of that name
    in the working directory. ``trust_imports=True`` (``DistillationConfig(trust_loss_imports=True)``) imports it.

    Args:
        name: A registered id or a dotted class path.
        trust_imports: Import the module a dotted path names when it is not imported yet.

    Returns:
        The loss class.

    Raises:
        ValueError: an unknown id (the message lists the valid ones), a path to a module that is not imported (and
            ``trust_imports`` is off) or cannot be imported, a missing attribute, or a class that is not a
            :class:`DistillationLoss`.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        module = sys.modules.get(module_name)
        if module is None and not trust_imports:
            raise ValueError(
                f"loss {name!r} names the module {module_name!r}, which is not imported: hf_kd imports no module a "
                "loss path names unless asked, since importing runs the module's code (and would take any "
                f"{module_name.split('.')[0]}.py in the working directory). Import it in your own code first "
                f"(import {module_name}), or set DistillationConfig(trust_loss_imports=True) (or pass "
                "--trust_loss_imports on the command line, trust_loss_imports: true in a YAML config) to let hf_kd "
                "import it."
            )
        try:
            module = module if module is not None else importlib.import_module(module_name)
            cls = getattr(module, attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import loss class {name!r}: {error}.") from error
        if not (inspect.isclass(cls) and issubclass(cls, DistillationLoss)):
            raise ValueError(f"{name!r} is not a subclass of hf_kd.losses.DistillationLoss.")
        return cls
    raise ValueError(
        f"unknown loss {name!r}. Valid ids: {', '.join(available_losses())}; "
        "or give a dotted path to your own DistillationLoss subclass (module.ClassName, its module imported)."
    )


def accepted_options(cls: type[DistillationLoss]) -> list[str] | None:
    """The option names a loss class takes (``None`` when its ``__init__`` takes any keyword).

    Args:
        cls: A :class:`DistillationLoss` subclass.

    Returns:
        Its ``__init__``'s parameter names, or ``None`` when it takes ``**kwargs``.
    """
    if cls.__init__ is nn.Module.__init__:  # no __init__ of its own: nn.Module's refuses every keyword
        return []
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return [key for key in parameters if key != "self"]


def takes_option(name: str, option: str) -> bool:
    """Whether the loss ``name`` takes the option ``option``.

    Args:
        name: A registered id or a dotted class path.
        option: An option name, e.g. ``"temperature"``.

    Returns:
        True when its ``__init__`` has that parameter (or takes any keyword).
    """
    accepted = accepted_options(resolve_loss_class(name))
    return accepted is None or option in accepted


def with_default_temperature(spec: LossSpec, temperature: float) -> dict:
    """A loss's options with the trainer-wide temperature added where the loss takes one and sets none.

    Args:
        spec: The configured loss.
        temperature: ``DistillationConfig.temperature``.

    Returns:
        The options to build the loss with.
    """
    if "temperature" in spec.options or not takes_option(spec.name, "temperature"):
        return dict(spec.options)
    return {"temperature": temperature, **spec.options}


def check_loss_options(name: str, options: dict) -> None:
    """Raise for an option the loss does not take (naming the closest valid one) or a non-finite number.

    Args:
        name: A registered id or a dotted class path.
        options: The options given for it.

    Raises:
        ValueError: an option the loss does not take (``confidence_threshold`` on a loss that reads no teacher
            probabilities: said so), or a float option that is NaN or infinite.
    """
    accepted = accepted_options(resolve_loss_class(name))
    if accepted is not None:
        for key in options:
            if key == "confidence_threshold" and key not in accepted:
                raise ValueError(
                    f"loss {name!r} does not take confidence_threshold: it leaves out the positions where the "
                    "teacher's top-class probability is below it, so it applies to the losses on the teacher's class "
                    "probabilities (the response losses: kl, prob_mse, logit_mse, dkd, ...), and not to this one."
                )
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"loss {name!r} got unknown option {key!r}; it accepts {accepted}.{hint}")
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"option {key}={value} of loss {name!r} is not a finite number.")


def get_loss(name: str, **kwargs) -> DistillationLoss:
    """Build the loss ``name`` (a registered id or a dotted class path) with the options ``kwargs``.

    Args:
        name: A registered id or a dotted class path.
        **kwargs: The loss's options; each must be one it takes.

    Returns:
        The loss module.

    Raises:
        ValueError: an unknown loss or option, or an option that is not a finite number.
    """
    check_loss_options(name, kwargs)
    return resolve_loss_class(name)(**kwargs)
