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
    """The optimizer steps ``args`` make over ``num_examples`` (``max_steps`` when set, else the epochs')."""
    if args.max_steps > 0:
        return args.max_steps
    per_step = args.train_batch_size * args.gradient_accumulation_steps
    return math.ceil(args.num_train_epochs * num_examples / per_step)


def plain_args(args: TrainingArguments, steps: int, **overrides) -> TrainingArguments:
    """``args`` for a plain (non-distillation) run of ``steps`` steps: no checkpoints, no Hub push."""
    return dataclasses.replace(args, max_steps=steps, save_strategy="no", push_to_hub=False, **overrides)


def train_plainly(
    model: nn.Module, args: TrainingArguments, train_dataset, *, output_dir: str, data_collator=None, **overrides
) -> nn.Module:
    """Train ``model`` with the plain ``Trainer`` on ``train_dataset`` (its own label loss only) into
    ``output_dir``; ``overrides`` replace fields of ``args`` (e.g. ``max_steps`` for a teacher)."""
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
    """Train a teacher plainly for ``steps`` and save it (with ``processor``) to ``OUTPUT_DIR/teacher``."""
    folder = os.path.join(args.output_dir, "teacher")
    train_plainly(
        model, args, train_dataset, output_dir=folder, data_collator=data_collator, max_steps=steps, **overrides
    )
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return model
