"""Command-line parsing for recipes: ``HfArgumentParser`` over dataclasses, plus ``--config recipe.yaml``."""

from __future__ import annotations

import os
import sys

import yaml
from transformers import HfArgumentParser

from ..checks import sharding_engine


def parse_args(dataclass_types, args: list[str] | None = None):
    """Parse ``dataclass_types`` from the command line, optionally starting from a YAML file.

    ``--config FILE.yaml`` loads every field from the file; other flags on the command line override it.

    Args:
        dataclass_types: The argument dataclasses, as ``HfArgumentParser`` takes them.
        args: The command line; ``None``: ``sys.argv[1:]``.

    Returns:
        One instance per dataclass, in order.

    Raises:
        SystemExit: ``--config`` without a path, or a file with fields no dataclass has.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = HfArgumentParser(dataclass_types)
    defaults: dict = {}
    if "--config" in args:
        index = args.index("--config")
        if index + 1 >= len(args):
            raise SystemExit("--config needs a YAML file path.")
        path = args[index + 1]
        del args[index : index + 2]
        with open(path) as handle:
            defaults = yaml.safe_load(handle) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise SystemExit(f"{path}: unknown field(s) {unknown}.")
        # Lists and dicts (e.g. losses) go in as values; the dataclasses validate them in __post_init__.
        parser.set_defaults(**defaults)
        for action in parser._actions:
            if action.dest in defaults:
                action.required = False
    return parser.parse_args_into_dataclasses(args=args)


def refuse_engines_for_multi_model_recipes(args) -> None:
    """Refuse DeepSpeed and FSDP for a recipe that trains several models in one process.

    The recipes train a teacher and a scratch baseline beside the distilled student in one process and evaluate
    them with plain Trainers. Accelerate allows one DeepSpeed set-up per process, and FSDP2 prepares a model only
    with its optimizer, so with baselines they run on one device or with DDP (docs: Scaling out).

    Args:
        args: The training arguments (or anything :func:`~hf_kd.checks.sharding_engine` reads).

    Raises:
        SystemExit: the run uses DeepSpeed or FSDP.
    """
    engine = sharding_engine(args)
    if engine is not None:
        raise SystemExit(
            "this recipe trains and evaluates three models (teacher, scratch baseline, distilled student) with "
            f"separate Trainers in one process, which {engine} does not support; distil only with --baselines false "
            "--teacher PATH, launch it on one device or with DDP (recipes/accelerate/ddp.yaml), or use "
            f"DistillationTrainer under {engine} in a script that trains only the student."
        )


def check_recipe_engine(args, *, baselines: bool, teacher: str | None) -> None:
    """Recipes with baselines train several models per process: no DeepSpeed or FSDP.

    Distilling only (``--baselines false``) needs a trained ``--teacher`` and, under DeepSpeed, its process group
    before any ``from_pretrained`` (ZeRO-3 loads through ``zero.Init``, which reads the world size): started here.

    Args:
        args: The training arguments.
        baselines: Whether the recipe trains its baselines.
        teacher: The ``--teacher`` given, or ``None``.

    Raises:
        SystemExit: baselines under DeepSpeed or FSDP, or no teacher without baselines.
    """
    if baselines:
        refuse_engines_for_multi_model_recipes(args)
        return
    if not teacher:
        raise SystemExit("--baselines false distils only: give a trained teacher with --teacher.")
    if getattr(args, "deepspeed", None):
        import deepspeed

        deepspeed.init_distributed()


def leave_process_group() -> None:
    """End a recipe run (its last call): alone, return; run by several processes, wait for all, destroy the process
    group, flush and leave without interpreter teardown. Even after that, gloo's and DeepSpeed's threads now and then
    abort a finished process at teardown ("terminate called without an active exception", SIGABRT), most often on a
    loaded machine, failing a run that did everything right. Everything a recipe writes is written before this call
    (the Trainer closes its loggers at the end of training)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
