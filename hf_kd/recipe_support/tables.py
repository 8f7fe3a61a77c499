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
) -> dict[str, dict]:
    """Evaluate ``models`` side by side on ``dataset``, print the table (``metrics`` columns, then parameters and
    latency) under ``title``, and (when ``write``) save it to ``output_dir/results.md`` and the rows to
    ``output_dir/results.json``. Returns the rows."""
    results = {
        name: evaluate_model(
            model, dataset, compute_metrics=compute_metrics, data_collator=data_collator, use_cpu=use_cpu
        )
        for name, model in models.items()
    }
    report_results(results, [*metrics, "parameters", "ms_per_example"], title, output_dir, write)
    return results


def report_results(
    results: dict[str, dict], columns: list[str], title: str, output_dir: str | None, write: bool = True
) -> str:
    """Print ``results`` as a markdown table under ``title`` and, when ``write``, save it to
    ``output_dir/results.md`` and the rows to ``output_dir/results.json``. Returns the text."""
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
    """``OUTPUT_DIR/curves.png`` (default the trainer's output_dir): every term ``trainer`` logged over its steps,
    train and eval (:func:`hf_kd.plots.plot_curves`); drawn by the main process only. Returns the series drawn."""
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
) -> tuple[dict[str, dict], dict[str, dict]]:
    """The recipes' test-split table (in ``output_dir``, default the trainer's) and the card's teacher-vs-student
    rows. ``models`` lists the teacher first and the distilled student last; with the student alone (distil-only
    runs) the distillation trainer evaluates it itself, since DeepSpeed allows no second Trainer in the process."""
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
        )
        rows = list(results.values())
        return results, {"teacher": rows[0], "student": rows[-1]}
    ((name, model),) = models.items()
    scores = trainer.evaluate(dataset)
    row = {metric: scores[f"eval_{metric}"] for metric in metrics if f"eval_{metric}" in scores}
    results = {name: {**row, "parameters": count_parameters(model)}}
    report_results(results, [*row, "parameters"], title, output_dir, write)
    return results, {"student": results[name]}
