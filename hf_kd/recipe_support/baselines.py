"""What a distilled student is compared against: models trained plainly, with the student's steps and seed.

The recipes train a teacher (when none is given) and a scratch student with the same optimizer steps, batch
size and seed as the distilled student, so the only difference left is the teacher's knowledge.
"""

from __future__ import annotations

import dataclasses
import math
import os

from torch import nn
from transformers import Trainer, TrainingArguments


def optimizer_steps(args: TrainingArguments, num_examples: int) -> int:
    """The optimizer steps ``args`` make over ``num_examples`` (``max_steps`` when set, else the epochs').

    Args:
        args: Training arguments.
        num_examples: The training set's size.

    Returns:
        The number of steps.
    """
    if args.max_steps > 0:
        return args.max_steps
    per_step = args.train_batch_size * args.gradient_accumulation_steps
    return math.ceil(args.num_train_epochs * num_examples / per_step)


def plain_args(args: TrainingArguments, steps: int, **overrides) -> TrainingArguments:
    """``args`` for a plain (non-distillation) run of ``steps`` steps: no checkpoints, no Hub push.

    Args:
        args: The recipe's training arguments.
        steps: Optimizer steps.
        **overrides: Other fields to replace.

    Returns:
        A copy of ``args``.
    """
    return dataclasses.replace(args, max_steps=steps, save_strategy="no", push_to_hub=False, **overrides)


def train_plainly(
    model: nn.Module, args: TrainingArguments, train_dataset, *, output_dir: str, data_collator=None, **overrides
) -> nn.Module:
    """Train ``model`` with the plain ``Trainer`` on ``train_dataset`` (its own label loss only) into ``output_dir``.

    Args:
        model: The model, trained in place.
        args: The recipe's training arguments.
        train_dataset: The training set.
        output_dir: The run's folder.
        data_collator: The Trainer's data collator (its default when ``None``).
        **overrides: Fields of ``args`` to replace (e.g. ``max_steps`` for a teacher).

    Returns:
        ``model``.
    """
    run_args = dataclasses.replace(args, output_dir=output_dir, **overrides)
    Trainer(model=model, args=run_args, train_dataset=train_dataset, data_collator=data_collator).train()
    return model


def train_teacher(
    model: nn.Module,
    args: TrainingArguments,
    train_dataset,
    *,
    steps: int,
    processor=None,
    data_collator=None,
    **overrides,
) -> nn.Module:
    """Train a teacher plainly for ``steps`` and save it (with ``processor``) to ``OUTPUT_DIR/teacher``.

    Args:
        model: The teacher, trained in place.
        args: The recipe's training arguments (its ``output_dir``).
        train_dataset: The training set.
        steps: Optimizer steps.
        processor: The tokenizer or processor saved beside it.
        data_collator: The Trainer's data collator.
        **overrides: Other fields of ``args`` to replace.

    Returns:
        ``model``.
    """
    folder = os.path.join(args.output_dir, "teacher")
    train_plainly(
        model, args, train_dataset, output_dir=folder, data_collator=data_collator, max_steps=steps, **overrides
    )
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return model
