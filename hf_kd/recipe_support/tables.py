"""The recipes' results tables: models evaluated side by side, printed and saved (``results.md``, ``results.json``)
with their quality-latency picture, and the training curves beside them. Recipe support: library code never imports
this module."""

from __future__ import annotations

import json
import os

from torch import nn

from ..evaluation import CLASSIFICATION_COLUMNS, count_parameters, draw, evaluate_model, markdown_table
from ..plots import LATENCY_COLUMNS, plot_curves, plot_quality_latency


def compare_models(
    models: dict[str, nn.Module],
    dataset,
    *,
    title: str,
    output_dir: str | None,
    compute_metrics,
    data_collator=None,
    use_cpu: bool = False,
    write: bool = True,
    metrics: tuple[str, ...] = CLASSIFICATION_COLUMNS,
    row_datasets: dict | None = None,
) -> dict[str, dict]:
    """Evaluate ``models`` side by side on ``dataset`` and print (and save) the table.

    The table has the ``metrics`` columns, then parameters and latency, under ``title``; with ``write`` it is saved
    to ``output_dir/results.md``, the rows to ``output_dir/results.json`` and the quality–latency picture beside them.

    Args:
        models: Row name → model.
        dataset: The evaluation set.
        title: The table's title.
        output_dir: Where to save; ``None``: nowhere.
        compute_metrics: The Trainer's ``compute_metrics``.
        data_collator: The Trainer's data collator.
        use_cpu: Evaluate on the CPU.
        write: Save the files (the main process only, in a distributed run).
        metrics: The quality columns.
        row_datasets: Rows measured on another set, by row name (a teacher of some of the classes: the rows of its
            classes).

    Returns:
        The rows (see :func:`~hf_kd.evaluation.evaluate_model`).
    """
    row_datasets = row_datasets or {}
    results = {
        name: evaluate_model(
            model,
            row_datasets.get(name, dataset),
            compute_metrics=compute_metrics,
            data_collator=data_collator,
            use_cpu=use_cpu,
        )
        for name, model in models.items()
    }
    report_results(results, [*metrics, "parameters", "ms_per_example"], title, output_dir, write)
    return results


def report_results(
    results: dict[str, dict], columns: list[str], title: str, output_dir: str | None, write: bool = True
) -> str:
    """Print ``results`` as a markdown table under ``title`` and, when ``write``, save it.

    Saves ``output_dir/results.md``, the rows to ``output_dir/results.json`` and, when a column is a speed, the
    quality–latency picture of the first column.

    Args:
        results: Row name → its metrics.
        columns: The table's columns, in order.
        title: The table's title.
        output_dir: Where to save; ``None``: nowhere.
        write: Save the files.

    Returns:
        The printed text.
    """
    summary = f"{title}\n\n{markdown_table(results, columns)}\n"
    print("\n" + summary)
    if write and output_dir:
        with open(os.path.join(output_dir, "results.md"), "w") as handle:
            handle.write(summary)
        with open(os.path.join(output_dir, "results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
        latency = next((column for column in columns if column in LATENCY_COLUMNS), None)
        if latency is not None:  # the quality–latency plane of the rows (tables without latency have none)
            stem = os.path.join(output_dir, "results")
            draw(plot_quality_latency, results, columns[0], stem, title=title, latency=latency)
    return summary


def draw_curves(trainer, output_dir: str | None = None) -> dict | None:
    """``OUTPUT_DIR/curves.png``: every term ``trainer`` logged over its steps, train and eval.

    See :func:`hf_kd.plots.plot_curves`; drawn by the main process only.

    Args:
        trainer: A trainer that has trained.
        output_dir: Where to write; default the trainer's ``output_dir``.

    Returns:
        The series drawn, or ``None`` (another process, or no matplotlib).
    """
    if not trainer.is_world_process_zero():
        return None
    output_dir = output_dir or trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    return draw(plot_curves, trainer.state.log_history, os.path.join(output_dir, "curves.png"))


def compare_recipe_models(
    trainer,
    dataset,
    models: dict[str, nn.Module],
    *,
    title: str,
    data_collator=None,
    output_dir: str | None = None,
    metrics: tuple[str, ...] = CLASSIFICATION_COLUMNS,
    row_datasets: dict | None = None,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """The recipes' test-split table and the card's teacher-vs-student rows.

    ``models`` lists the teacher first and the distilled student last; with the student alone (distil-only runs)
    the distillation trainer evaluates it itself, since DeepSpeed allows no second Trainer in the process. The
    training curves are drawn beside the table.

    Args:
        trainer: The distillation trainer, after training.
        dataset: The test split.
        models: Row name → model, the teacher first and the student last.
        title: The table's title.
        data_collator: The evaluation's data collator.
        output_dir: Where to save; default the trainer's ``output_dir``.
        metrics: The quality columns.
        row_datasets: Rows measured on another set than ``dataset``, by row name (see :func:`compare_models`).

    Returns:
        ``(results, card_rows)``: every row, and ``{"teacher": ..., "student": ...}`` (the student alone when it is
            the only model).
    """
    write = trainer.is_world_process_zero()
    output_dir = output_dir or trainer.args.output_dir
    draw_curves(trainer, output_dir)  # every logged term over the steps, next to the table's picture
    if len(models) > 1:
        results = compare_models(
            models,
            dataset,
            title=title,
            output_dir=output_dir,
            compute_metrics=trainer.compute_metrics,
            data_collator=data_collator,
            use_cpu=trainer.args.use_cpu,
            write=write,
            metrics=metrics,
            row_datasets=row_datasets,
        )
        rows = list(results.values())
        return results, {"teacher": rows[0], "student": rows[-1]}
    ((name, model),) = models.items()
    scores = trainer.evaluate(dataset)
    row = {metric: scores[f"eval_{metric}"] for metric in metrics if f"eval_{metric}" in scores}
    results = {name: {**row, "parameters": count_parameters(model)}}
    report_results(results, [*row, "parameters"], title, output_dir, write)
    return results, {"student": results[name]}
