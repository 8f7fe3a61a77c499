"""The recipes' scheme flags: ``--scheme NAME`` (any registered scheme, :func:`hf_kd.schemes.available_schemes`) with
that scheme's own settings as flags (its config dataclass, parsed by ``HfArgumentParser``), and ``--teachers A,B``
(several trained teachers, combined by ``--teacher_aggregation``). A recipe builds its data, teacher and a student
factory, then :func:`hf_kd.schemes.run_scheme` runs the chosen scheme."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import yaml
from torch import nn

from ..schemes import available_schemes, get_scheme
from ..schemes.stages import Stage
from .cli import parse_args


@dataclass
class SchemeChoice:
    """Which scheme a recipe runs, and its teachers when there are several.

    Args:
        scheme: The scheme (its settings are flags of their own, listed by --scheme NAME --help).
        teachers: Several trained teachers (comma-separated folders), combined by --teacher_aggregation; they replace
            --teacher (the first one's tokenizer/processor is used).

    Raises:
        ValueError: ``teachers`` with a scheme that trains its own teachers or starts from one.
    """

    scheme: str = field(
        default="offline",
        metadata={
            "help": "The scheme (its settings are flags of their own, listed by --scheme NAME --help). Registered: "
            + "; ".join(f"{name}: {get_scheme(name).description}" for name in available_schemes()),
        },  # no fixed choices: a scheme registered after this import is a choice too (checked in __post_init__)
    )
    teachers: str | None = field(
        default=None,
        metadata={
            "help": "Several trained teachers (comma-separated folders), combined by --teacher_aggregation; they "
            "replace --teacher (the first one's tokenizer/processor is used)."
        },
    )

    def __post_init__(self):
        entry = get_scheme(self.scheme)
        if self.teachers is not None and entry.teachers != "many":
            takes = "trains its own teachers with the student" if entry.teachers == "none" else "starts from one"
            raise ValueError(f"--teachers with --scheme {self.scheme}: it {takes}.")

    def teacher_paths(self, teacher: str | None) -> list[str]:
        """The trained teachers given on the command line: ``--teachers``, else ``--teacher`` (may be none).

        Args:
            teacher: The recipe's ``--teacher``, or ``None``.

        Returns:
            The teachers' folders.

        Raises:
            ValueError: both ``--teacher`` and ``--teachers``, or ``--teachers`` with fewer than two folders.
        """
        if self.teachers is None:
            return [teacher] if teacher else []
        if teacher:
            raise ValueError("give either --teacher or --teachers, not both.")
        paths = [path.strip() for path in self.teachers.split(",") if path.strip()]
        if len(paths) < 2:
            raise ValueError(f"--teachers needs at least two comma-separated folders, got {self.teachers!r}.")
        return paths

    @property
    def takes_teacher(self) -> bool:
        """Whether the scheme distils from the recipe's teacher (not: it trains its own; the teacher is then only a
        reference row of the results)."""
        return get_scheme(self.scheme).teachers != "none"


def parse_recipe_args(recipe_class, distillation_class, args: list[str] | None = None):
    """The recipe's, the scheme's and the distillation arguments from the command line (and ``--config FILE.yaml``).

    ``--scheme`` chooses which scheme's config dataclass is parsed beside the recipe's and the distillation ones, so
    ``--help`` and every flag are that scheme's.

    Args:
        recipe_class: The recipe's own arguments dataclass.
        distillation_class: The distillation arguments dataclass (:class:`~hf_kd.DistillationConfig` or a subclass).
        args: The command line; ``None``: ``sys.argv[1:]``.

    Returns:
        ``(recipe, choice, scheme_config, distillation_args)``.
    """
    args = list(sys.argv[1:] if args is None else args)
    name = _scheme_name(args)
    recipe, choice, scheme, distillation = parse_args(
        (recipe_class, SchemeChoice, get_scheme(name).config, distillation_class), args
    )
    return recipe, choice, scheme, distillation


def _scheme_name(args: list[str]) -> str:
    """The ``--scheme`` given on the command line (``--scheme X`` or ``--scheme=X``), else in the ``--config`` file,
    else ``offline``."""
    for index, arg in enumerate(args):
        if arg == "--scheme" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--scheme="):
            return arg.split("=", 1)[1]
    if "--config" in args and args.index("--config") + 1 < len(args):
        with open(args[args.index("--config") + 1]) as handle:
            return (yaml.safe_load(handle) or {}).get("scheme", "offline")
    return "offline"


def stage_rows(stages: list[Stage]) -> dict[str, nn.Module]:
    """Results-table rows for the stages before the final student.

    Args:
        stages: A scheme's finished stages.

    Returns:
        ``"NAME (N parameters)"`` → the stage's model.
    """
    from ..evaluation import count_parameters

    return {f"{stage.name} ({count_parameters(stage.model):,} parameters)": stage.model for stage in stages}
