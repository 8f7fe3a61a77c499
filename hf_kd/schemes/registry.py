"""Schemes found by name. A scheme module declares its settings as a :class:`SchemeConfig` dataclass and registers
the function that runs it::

    @register_scheme("born_again", config=BornAgainConfig, teachers="many", stages=True)
    def run_born_again(config: BornAgainConfig, args, given: SchemeInputs) -> SchemeResult: ...

:func:`run_scheme` runs any of them by name (or by its config) and returns one :class:`SchemeResult`; the recipes'
``--scheme NAME`` parses the chosen scheme's config with ``HfArgumentParser``. Every saved student records the
scheme and its settings in ``distillation_config.json`` (``"scheme"``) and on its model card.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .stages import Stage

TEACHERS = ("none", "one", "many")  # what a scheme takes as teacher_model


@dataclass
class SchemeConfig:
    """The settings of one scheme: a subclass per scheme, each field documented (``metadata={"help": ...}``) and
    checked in ``__post_init__``. ``name`` is the scheme's registry name (set by :func:`register_scheme`).
    ``stage_count_field`` names the setting that only says how many stages follow one another (rounds,
    generations): a rerun that asks for more of them reuses the finished ones."""

    name: ClassVar[str] = ""
    stage_count_field: ClassVar[str | None] = None

    def to_dict(self) -> dict:
        """What ``distillation_config.json`` records under ``"scheme"``.

        Returns:
            ``{"name": ..., **settings}``.
        """
        return {"name": self.name, **dataclasses.asdict(self)}

    def setup(self) -> dict:
        """The settings that decide a stage's or a run's result, recorded with it and compared on a rerun: all but
        ``stage_count_field`` (a chain asked for more stages reuses the finished ones).

        Returns:
            :meth:`to_dict` without the stage count.
        """
        settings = self.to_dict()
        settings.pop(self.stage_count_field, None)
        return settings


@dataclass
class SchemeResult:
    """What any scheme returns.

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer` of the final student (evaluate, ``save_model``,
            ``push_to_hub``); for a multi-stage scheme whose last stage finished in an earlier run, a trainer built
            around the student read back.
        stages: the models trained before or beside the final student, in order (assistants, generations, rounds,
            the other peers, the EMA teacher, the exits), each with its folder and metrics.
    """

    trainer: object
    stages: list[Stage]

    @property
    def student(self) -> nn.Module:
        """The final student, unwrapped."""
        return self.trainer.student


@dataclass
class SchemeInputs:
    """What a scheme's run function is given besides its config and ``args`` (see :func:`run_scheme`).

    Args:
        make_student: ``make_student(k)`` builds a fresh student (k: the generation, round or peer, from 1).
        train_dataset: the training rows.
        teacher: the teacher(s), or ``None`` for schemes that train their own.
        load_student: reads a finished stage's saved student back.
        make_assistant: ``make_assistant(hidden_size, layers)`` builds a teacher assistant.
        make_noise: ``make_noise(strength)`` builds this modality's input noise.
        extra: the other keyword arguments of every trainer (``eval_dataset``, ``data_collator``, ...).
    """

    make_student: Callable[[int], nn.Module]
    train_dataset: object
    teacher: object = None
    load_student: Callable[[str], nn.Module] | None = None
    make_assistant: Callable[[int | None, int | None], nn.Module] | None = None
    make_noise: Callable[[float], object] | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def trainer_kwargs(self) -> dict:
        """What a trainer of the scheme is given: the training rows and :attr:`extra`."""
        return {"train_dataset": self.train_dataset, **self.extra}

    def noise(self, strength: float | None):
        """This modality's input noise at ``strength``.

        Args:
            strength: the noise's strength (0 or None: no noise).

        Returns:
            ``make_noise(strength)``, or None without ``make_noise`` or at strength 0/None.
        """
        return self.make_noise(strength) if self.make_noise is not None and strength else None


@dataclass(frozen=True)
class SchemeEntry:
    """A registered scheme (made by :func:`register_scheme`).

    Args:
        name: the registry name.
        config: the scheme's :class:`SchemeConfig` dataclass.
        run: the function that runs it, ``run(config, args, given)``.
        teachers: what it takes as teacher: ``"none"`` (its teachers train with the student), ``"one"`` or
            ``"many"``.
        stages: whether it runs several trainers in one process (then not under DeepSpeed or FSDP).
    """

    name: str
    config: type[SchemeConfig]
    run: Callable[..., SchemeResult]
    teachers: str
    stages: bool

    @property
    def description(self) -> str:
        """The first paragraph of the run function's docstring (the recipes' ``--scheme`` help)."""
        return " ".join((self.run.__doc__ or "").strip().split("\n\n")[0].split())


_SCHEMES: dict[str, SchemeEntry] = {}


def register_scheme(name: str, *, config: type[SchemeConfig], teachers: str = "many", stages: bool = False):
    """Function decorator registering a scheme's run function under ``name`` with its ``config`` dataclass.

    The run function is called as ``run(config, args, given)`` (``given``: a :class:`SchemeInputs`) and returns a
    :class:`SchemeResult` (see :func:`run_scheme`).

    Args:
        name: the registry name (the recipes' ``--scheme NAME``).
        config: the scheme's :class:`SchemeConfig` dataclass (its ``name`` is set to ``name``).
        teachers: what the scheme takes as teacher: ``"none"``, ``"one"`` or ``"many"``.
        stages: whether it runs several trainers in one process (refused under DeepSpeed or FSDP).

    Returns:
        The decorator, which registers the run function and returns it unchanged.

    Raises:
        ValueError: ``teachers`` is not one of ``none``, ``one``, ``many``.
        TypeError: ``config`` is not a :class:`SchemeConfig` dataclass.
    """
    if teachers not in TEACHERS:
        raise ValueError(f"register_scheme({name!r}): teachers is one of {TEACHERS}, got {teachers!r}.")
    if not (isinstance(config, type) and issubclass(config, SchemeConfig) and dataclasses.is_dataclass(config)):
        raise TypeError(f"register_scheme({name!r}): config must be a SchemeConfig dataclass, got {config!r}.")

    def decorate(run: Callable[..., SchemeResult]) -> Callable[..., SchemeResult]:
        if name in _SCHEMES and _SCHEMES[name].run is not run:
            raise ValueError(f"scheme {name!r} is already registered to {_SCHEMES[name].run.__qualname__}.")
        config.name = name
        _SCHEMES[name] = SchemeEntry(name, config, run, teachers, stages)
        return run

    return decorate


def available_schemes() -> list[str]:
    """The registered scheme names, sorted.

    Returns:
        The names.
    """
    return sorted(_SCHEMES)


def get_scheme(name: str) -> SchemeEntry:
    """The registered scheme ``name``.

    Args:
        name: a registered name.

    Returns:
        The scheme's :class:`SchemeEntry` (config class, run function, teachers, stages).

    Raises:
        ValueError: an unknown name (the message suggests the closest one and lists the registered).
    """
    if name not in _SCHEMES:
        close = difflib.get_close_matches(name, _SCHEMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown scheme {name!r}.{hint} Registered schemes: {', '.join(available_schemes())}.")
    return _SCHEMES[name]


def run_scheme(
    scheme: str | SchemeConfig,
    args,
    *,
    make_student: Callable[[int], nn.Module],
    train_dataset,
    teacher=None,
    load_student: Callable[[str], nn.Module] | None = None,
    make_assistant: Callable[[int | None, int | None], nn.Module] | None = None,
    make_noise: Callable[[float], object] | None = None,
    **trainer_kwargs,
) -> SchemeResult:
    """Run a scheme, given by name (its default settings) or by its config, and return its :class:`SchemeResult`.

    Args:
        scheme: a registered name (:func:`available_schemes`) or a scheme's config (e.g. ``BornAgainConfig(3)``).
        args: the :class:`~hf_kd.DistillationConfig` every trainer of the scheme uses (stages in sub-folders).
        make_student: ``make_student(k)`` builds a fresh student (k: the generation, round or peer, from 1).
        train_dataset: the training rows (labeled and unlabeled, as the scheme expects).
        teacher: the teacher(s) — a model, a path, a cache, or a list/dict for schemes that take several; none for
            schemes whose teachers train with the student (mean teacher, mutual learning, self-distillation).
        load_student: reads a finished stage's saved student back on a rerun (e.g. ``AutoModel….from_pretrained``).
        make_assistant: ``make_assistant(hidden_size, layers)`` builds a teacher assistant (``None``: the recipe's
            choice between teacher and student).
        make_noise: ``make_noise(strength)`` builds this modality's input noise (:mod:`hf_kd.noise`), for the schemes
            that noise inputs (noisy student, mean teacher).
        trainer_kwargs: passed to every :class:`~hf_kd.DistillationTrainer` (``eval_dataset``, ``data_collator``,
            ``processing_class``, ``compute_metrics``, ...).

    Returns:
        The final student's trainer and the models trained before or beside it.

    Raises:
        ValueError: an unknown scheme; a teacher the scheme does not take (several for a one-teacher chain, any for
            a scheme that trains its own); a multi-trainer scheme under DeepSpeed or FSDP.
    """
    config = scheme if isinstance(scheme, SchemeConfig) else get_scheme(scheme).config()
    entry = get_scheme(config.name)
    several = isinstance(teacher, (list, tuple, dict))
    if entry.teachers == "none" and teacher is not None:
        raise ValueError(
            f"scheme {entry.name!r} trains its own teachers with the student: give no teacher (got "
            f"{type(teacher).__name__})."
        )
    if entry.teachers != "none" and teacher is None:
        raise ValueError(f"scheme {entry.name!r} distils from a teacher: give teacher=.")
    if entry.teachers == "one" and several:
        raise ValueError(f"scheme {entry.name!r} starts from one teacher; got {len(teacher)} teachers.")
    noised = {field.name for field in dataclasses.fields(entry.config)} & {"input_noise"}
    if noised and trainer_kwargs.get("student_noise") is not None:
        raise ValueError(
            f"scheme {entry.name!r} noises the inputs itself, at its input_noise ({config.input_noise}): give "
            "make_noise=lambda strength: ... (this modality's noise at a strength) instead of student_noise."
        )
    if entry.stages:
        from ..checks import sharding_engine

        engine = sharding_engine(args)
        if engine is not None:
            raise ValueError(
                f"scheme {entry.name!r} runs more than one Trainer in one process (its stages, or the best peer "
                f"after mutual learning), which {engine} does not support: run it on one device or with DDP."
            )
    given = SchemeInputs(
        make_student, train_dataset, teacher, load_student, make_assistant, make_noise, dict(trainer_kwargs)
    )
    return entry.run(config, args, given)
