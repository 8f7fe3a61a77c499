"""Side-by-side evaluation of teacher and students, and the markdown table recipes print and cards show."""

from __future__ import annotations

import math
import tempfile

from torch import nn
from transformers import Trainer, TrainingArguments


def count_parameters(model: nn.Module) -> int:
    """Parameter count, also of ZeRO-3-sharded models (whose local tensors are empty).

    Args:
        model: A model.

    Returns:
        The number of parameters.
    """
    return sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in model.parameters())


def evaluate_model(
    model: nn.Module, dataset, *, compute_metrics, data_collator=None, batch_size: int = 64, use_cpu: bool = False
) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset`` plus its parameter count and milliseconds per example.

    Runs a ``transformers.Trainer`` evaluation (after one untimed warm-up batch when the data set can be sliced).

    Args:
        model: The model to evaluate.
        dataset: The evaluation set.
        compute_metrics: The Trainer's ``compute_metrics``.
        data_collator: The Trainer's data collator (its default when ``None``).
        batch_size: Examples per evaluation batch.
        use_cpu: Evaluate on the CPU even when an accelerator is present.

    Returns:
        The metrics without their ``eval_`` prefix (timings and loss left out), ``parameters`` and
            ``ms_per_example``.
    """
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, per_device_eval_batch_size=batch_size, report_to=[], use_cpu=use_cpu
        )
        trainer = Trainer(model=model, args=args, data_collator=data_collator, compute_metrics=compute_metrics)
        if hasattr(dataset, "select"):  # one warm-up batch, so the latency is not the first call's
            # timed, not scored: a compute_metrics may be built for the whole set (entity_metrics over windows)
            trainer.compute_metrics = None
            trainer.evaluate(dataset.select(range(min(batch_size, len(dataset)))))
            trainer.compute_metrics = compute_metrics
        metrics = trainer.evaluate(dataset)
    row = {
        key.removeprefix("eval_"): value
        for key, value in metrics.items()
        if key
        not in (
            "eval_runtime",
            "eval_samples_per_second",
            "eval_steps_per_second",
            "eval_model_preparation_time",
            "epoch",
        )
    }
    row.pop("loss", None)
    row["parameters"] = count_parameters(model)
    row["ms_per_example"] = 1000 * metrics["eval_runtime"] / len(dataset)
    return row


def language_model_row(model: nn.Module, dataset, *, data_collator, batch_size: int = 32) -> dict[str, float]:
    """A results row of a language model on ``dataset``.

    ``perplexity`` is ``exp`` of the mean label cross-entropy per supervised token (labels -100 ignored; causal LMs
    shift their labels by one, as their own loss does), the same quantity as ``exp(eval_ce)`` of a
    :class:`~hf_kd.DistillationTrainer` evaluation; ``ms_per_example`` times the forward pass of a batch per example
    (a block, a source–target pair), after one untimed warm-up batch.

    Args:
        model: A causal or seq2seq LM.
        dataset: Rows with ``labels``.
        data_collator: Makes a batch of tensors from a list of rows.
        batch_size: Rows per forward pass.

    Returns:
        ``{"perplexity", "parameters", "ms_per_example"}``.
    """
    import time

    import torch

    from .model_kinds import is_causal_lm

    shift = is_causal_lm(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, seconds = 0.0, 0, 0.0
    starts = list(range(0, len(dataset), batch_size))
    with torch.no_grad():
        for index, start in enumerate(starts[:1] + starts):  # the first batch twice: once untimed, to warm up
            batch = data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {key: value.to(device) for key, value in batch.items()}
            labels = batch.pop("labels")
            if "decoder_input_ids" not in batch and getattr(model.config, "is_encoder_decoder", False):
                batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
            began = time.perf_counter()
            logits = model(**batch).logits
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index == 0:
                continue
            seconds += time.perf_counter() - began
            if shift:
                logits, labels = logits[:, :-1], labels[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            tokens += int(labels.ne(-100).sum())
    model.train(was_training)
    return {
        "perplexity": math.exp(total / max(tokens, 1)),
        "parameters": count_parameters(model),
        "ms_per_example": 1000 * seconds / max(len(dataset), 1),
    }


CLASSIFICATION_COLUMNS = ("accuracy", "macro_f1")
REGRESSION_COLUMNS = ("mse", "mae")


def markdown_table(rows: dict[str, dict[str, float]], columns: list[str] | None = None) -> str:
    """A markdown table with one row per model; accuracy, F1, precision and recall are shown as percentages.

    Args:
        rows: Model name → its metrics.
        columns: The columns, in order; by default every metric of any row, sorted.

    Returns:
        The table's markdown (a missing value shows as –).
    """
    columns = columns or sorted({key for row in rows.values() for key in row})
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_format(column, row.get(column)) for column in columns) + " |")
    return "\n".join(lines)


def _format(column: str, value) -> str:
    if value is None:
        return "–"
    if column == "parameters":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    if isinstance(value, float) and (
        column in ("accuracy", "macro_f1", "f1", "precision", "recall") or column.startswith("accuracy_")
    ):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def draw(plot, *args, **kwargs):
    """Run one of :mod:`hf_kd.plots`' pictures; without matplotlib, say so and go on (the tables are written).

    Args:
        plot: A picture function of :mod:`hf_kd.plots`.
        *args: Its positional arguments.
        **kwargs: Its keyword arguments.

    Returns:
        What ``plot`` returns, or ``None`` when matplotlib is missing.
    """
    try:
        return plot(*args, **kwargs)
    except ImportError as error:
        print(f"(no picture: {error})")
        return None
