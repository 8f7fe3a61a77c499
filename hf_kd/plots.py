"""Pictures of a run: the quality–latency plane of a results table (``results.png`` / ``.svg``) and every logged term
over the training steps (``curves.png``, from the Trainer's ``log_history``).

matplotlib (``pip install "hf_kd[plots]"``, pulled in by the recipes extra) draws with the headless Agg backend; the
files carry no timestamp, so the same numbers give the same bytes. Each function returns the data it drew — the
numbers the tests compare with the table.
"""

from __future__ import annotations

import math
import os
import warnings

#: Keys of ``log_history`` entries that are bookkeeping, not a quality or a loss term.
BOOKKEEPING = {
    "epoch",
    "step",
    "learning_rate",
    "grad_norm",
    "total_flos",
    "train_loss",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
}
#: The speed columns of a results table, in the order a redrawn picture looks for them (texts_per_s: a throughput).
LATENCY_COLUMNS = ("ms_per_example", "ms_per_query", "texts_per_s")
#: Quality columns where a smaller number is the better model.
LOWER_IS_BETTER = {"perplexity", "mse", "mae", "loss", "ce", "wer"}
_EVAL_BOOKKEEPING = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError('pictures need matplotlib: pip install "hf_kd[plots]"') from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "hf_kd"  # fixed ids in the SVG: same input, same file
    return plt


def _save(figure, stem: str, formats: tuple[str, ...]) -> list[str]:
    paths = []
    for extension in formats:
        path = f"{stem}.{extension}"
        metadata = {"Software": None} if extension == "png" else {"Date": None, "Creator": None}
        figure.savefig(path, dpi=100, metadata=metadata)
        paths.append(path)
    return paths


def quality_latency_points(results: dict[str, dict], metric: str, latency: str = "ms_per_example") -> list[dict]:
    """One point per row of ``results`` that has both ``metric`` and ``latency``.

    A row whose value is NaN or ±inf (a diverged run's perplexity, a failed timing) has no place in the plane: it
    is left out with a warning that names it (the table keeps it).

    Args:
        results: Row name → its metrics (a results table).
        metric: The quality column.
        latency: The speed column.

    Returns:
        Points with ``name``, ``quality``, ``latency`` and ``parameters`` (or None).
    """
    points, left_out = [], {}
    for name, row in results.items():
        quality, speed = row.get(metric), row.get(latency)
        if not (_is_number(quality) and _is_number(speed)):
            continue  # a row without the number (e.g. no latency measured), or a note in its place
        if math.isfinite(quality) and math.isfinite(speed):
            points.append({"name": name, "quality": quality, "latency": speed, "parameters": row.get("parameters")})
        else:
            left_out[name] = f"{metric} = {quality}, {latency} = {speed}"
    _warn_left_out(left_out, f"the {metric}–{latency} picture")
    return points


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _warn_left_out(left_out: dict[str, str], picture: str) -> None:
    """Say which rows a picture cannot draw (values that are not finite), so that none vanishes silently."""
    if left_out:
        rows = "; ".join(f"{name!r} ({values})" for name, values in left_out.items())
        warnings.warn(
            f"{picture} leaves out {len(left_out)} row(s) whose values are not finite numbers: {rows}. The returned "
            "points and the picture hold the other rows only.",
            stacklevel=3,
        )


def plot_quality_latency(
    results: dict[str, dict],
    metric: str,
    stem: str,
    *,
    title: str | None = None,
    latency: str = "ms_per_example",
    formats: tuple[str, ...] = ("png", "svg"),
) -> list[dict]:
    """Draw ``metric`` against ``latency`` for every row of ``results`` to ``STEM.png`` and ``STEM.svg``.

    Teacher, scratch and distilled students, one point per scheme or loss, labelled with the row's name and
    parameter count. Nothing is written when no row has both numbers.

    Args:
        results: Row name → its metrics (a results table).
        metric: The quality column (the y axis).
        stem: The files' path without extension.
        title: The picture's title.
        latency: The speed column (the x axis).
        formats: The file formats to write.

    Returns:
        The points drawn (see :func:`quality_latency_points`).

    Raises:
        ImportError: matplotlib is not installed.
    """
    points = quality_latency_points(results, metric, latency)
    if not points:
        return []
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    try:
        for index, point in enumerate(points):
            size = point["parameters"]
            label = _shorten(point["name"]) + ("" if size is None else f" ({_parameters(size)})")
            axes.scatter(point["latency"], point["quality"], s=60, color=f"C{index % 10}", zorder=3, label=label)
        faster = "higher" if "per_s" in latency else "lower"  # a throughput or a latency
        xlabel = f"{latency.replace('_', ' ')} ({faster} is faster)"
        ylabel = metric.replace("_", " ") + (" (lower is better)" if metric in LOWER_IS_BETTER else "")
        _finish(figure, axes, stem, xlabel, ylabel, title, formats)
    finally:
        plt.close(figure)
    return points


def curve_series(log_history: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every numeric term of a Trainer's ``log_history``, per step, for training and evaluation.

    The training logs' terms (``loss``, ``ce``, ``kl``, ``kl/NAME``, …) and the evaluation logs' (``eval_kl`` →
    ``kl``), bookkeeping left out.

    Args:
        log_history: ``trainer.state.log_history``.

    Returns:
        ``{"train": {term: [(step, value), …]}, "eval": {term: …}}``.
    """
    series: dict[str, dict[str, list[tuple[int, float]]]] = {"train": {}, "eval": {}}
    for entry in log_history:
        step = int(entry.get("step", 0))
        evaluation = any(key.startswith("eval_") for key in entry)
        for key, value in entry.items():
            if key in BOOKKEEPING or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if evaluation:
                if not key.startswith("eval_") or key.endswith(_EVAL_BOOKKEEPING):
                    continue
                series["eval"].setdefault(key.removeprefix("eval_"), []).append((step, float(value)))
            else:
                series["train"].setdefault(key, []).append((step, float(value)))
    return series


def plot_curves(log_history: list[dict], path: str, *, title: str | None = None) -> dict:
    """Every logged term over the steps, one panel per term, to ``path`` (a PNG).

    Training is drawn solid, evaluation dashed with points. Nothing is written without any term.

    Args:
        log_history: ``trainer.state.log_history``.
        path: The PNG to write.
        title: The picture's title.

    Returns:
        The series drawn (see :func:`curve_series`).

    Raises:
        ImportError: matplotlib is not installed.
    """
    series = curve_series(log_history)
    terms = sorted(set(series["train"]) | set(series["eval"]))
    if not terms:
        return series
    plt = _pyplot()
    columns = min(3, len(terms))
    rows = math.ceil(len(terms) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
    try:
        for axes, term in zip(grid.flat, terms):
            for mode, style in (("train", "-"), ("eval", "--o")):
                points = series[mode].get(term)
                if points:
                    steps, values = zip(*points)
                    axes.plot(steps, values, style, label=mode, markersize=3)
            axes.set_title(term, fontsize=9)
            axes.set_xlabel("step", fontsize=8)
            axes.tick_params(labelsize=7)
            axes.legend(fontsize=7)
            axes.grid(True, alpha=0.3)
        for axes in list(grid.flat)[len(terms) :]:
            axes.axis("off")
        if title:
            figure.suptitle(_title(title), fontsize=8)
        _write(figure, path.removesuffix(".png"), ("png",))
    finally:
        plt.close(figure)
    return series


def plot_series(
    series: dict[str, list[float]],
    stem: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    formats: tuple[str, ...] = ("png", "svg"),
) -> dict[str, list[float]]:
    """One line per entry of ``series``, x from 1, to ``STEM.png`` and ``STEM.svg``.

    E.g. a federated run's server accuracy per round, for each mode.

    Args:
        series: Line name → its values.
        stem: The files' path without extension.
        xlabel: The x axis's label.
        ylabel: The y axis's label.
        title: The picture's title.
        formats: The file formats to write.

    Returns:
        The series drawn (empty ones left out; nothing is written when all are).

    Raises:
        ImportError: matplotlib is not installed.
    """
    drawn = {name: [float(value) for value in values] for name, values in series.items() if values}
    if not drawn:
        return {}
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    try:
        for index, (name, values) in enumerate(drawn.items()):
            axes.plot(range(1, len(values) + 1), values, "-o", markersize=3, color=f"C{index % 10}", label=name)
        _finish(figure, axes, stem, xlabel, ylabel, title, formats)
    finally:
        plt.close(figure)
    return drawn


def plot_bars(
    values: dict[str, float],
    path: str,
    *,
    xlabel: str,
    errors: dict[str, float] | None = None,
    reference: float | None = None,
    reference_label: str | None = None,
    title: str | None = None,
) -> dict[str, float]:
    """One horizontal bar per entry of ``values`` (a benchmark's ratios or accuracies), top to bottom in order.

    Each bar is labelled with its value. Entries that are not numbers (a note such as "–") are skipped, NaN and
    ±inf left out with a warning naming them.

    Args:
        values: Bar name → its value.
        path: The PNG to write.
        xlabel: The x axis's label.
        errors: Bar name → its error bar (e.g. the std over seeds).
        reference: A dashed vertical line (1 for ratios, the scratch student's accuracy, …).
        reference_label: The reference line's legend entry.
        title: The picture's title.

    Returns:
        The values drawn.

    Raises:
        ImportError: matplotlib is not installed.
    """
    numbers = {name: float(value) for name, value in values.items() if _is_number(value)}
    drawn = {name: value for name, value in numbers.items() if math.isfinite(value)}
    _warn_left_out({name: f"{value}" for name, value in numbers.items() if name not in drawn}, path)
    if not drawn:
        return {}
    plt = _pyplot()
    names = list(drawn)
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.4 * len(names)))
    try:
        positions = range(len(names) - 1, -1, -1)  # the first entry on top, as in the printed table
        spreads = [(errors or {}).get(name, 0.0) for name in names]
        colours = [f"C{index % 10}" for index in range(len(names))]
        axes.barh(list(positions), [drawn[name] for name in names], xerr=spreads if errors else None, color=colours)
        for position, name in zip(positions, names):
            axes.annotate(
                f"{drawn[name]:.3g}", (drawn[name], position), xytext=(4, 0), textcoords="offset points", va="center"
            )
        axes.set_yticks(list(positions), [_shorten(name) for name in names], fontsize=8)
        if reference is not None:
            axes.axvline(reference, color="0.3", linestyle="--", linewidth=1, label=reference_label)
            if reference_label:
                axes.legend(fontsize=7, loc="lower right")
        axes.margins(x=0.15)
        axes.set_xlabel(xlabel)
        axes.grid(True, axis="x", alpha=0.3)
        if title:
            axes.set_title(_title(title), fontsize=8)
        _write(figure, path.removesuffix(".png"), ("png",))
    finally:
        plt.close(figure)
    return drawn


def _finish(figure, axes, stem: str, xlabel: str, ylabel: str, title: str | None, formats: tuple[str, ...]) -> None:
    """Labels, legend, grid and title of a one-panel picture, saved in ``formats``."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    if title:
        axes.set_title(_title(title), fontsize=8)
    _write(figure, stem, formats)


def _write(figure, stem: str, formats: tuple[str, ...]) -> None:
    """Lay ``figure`` out and save it as ``STEM.EXTENSION`` for each of ``formats``, creating the folder."""
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    _save(figure, stem, formats)


def _shorten(name: str, width: int = 64) -> str:
    """``name`` cut in the middle to ``width`` characters: rows of one table often differ only at the end."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return f"{name[:head]}…{name[len(name) - (width - 1 - head) :]}"


def _title(text: str) -> str:
    """A title wrapped to the picture's width (three lines at most)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, 80)[:3])


def _parameters(count: float) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"


def redraw(output_dir: str, stem: str) -> dict | list | None:
    """Redraw a finished recipe run's picture from what it saved in ``output_dir`` to ``STEM.png``.

    ``results.json`` gives the quality–latency plane of its table, ``curves.json`` per-round curves (the federated
    recipe). The metric and the speed column are looked up over every row (the teacher's row may have no speed
    measured).

    Args:
        output_dir: The run's output folder.
        stem: The picture's path without extension.

    Returns:
        What was drawn, or None when the run left neither file or its table measures no speed.
    """
    import json

    curves_path, results_path = os.path.join(output_dir, "curves.json"), os.path.join(output_dir, "results.json")
    if os.path.exists(curves_path):
        with open(curves_path) as handle:
            curves = json.load(handle)
        return plot_series(curves, stem, xlabel="round", ylabel="server accuracy", formats=("png",)) or None
    if not os.path.exists(results_path):
        return None
    with open(results_path) as handle:
        results = json.load(handle)
    keys = list(dict.fromkeys(key for row in results.values() for key in row))  # every row's, in table order
    latency = next((key for key in LATENCY_COLUMNS if key in keys), None)
    metric = next((key for key in keys if key not in ("parameters", latency)), None)
    if latency is None or metric is None:
        return None
    return plot_quality_latency(results, metric, stem, latency=latency, formats=("png",)) or None


def main(argv: list[str] | None = None) -> None:
    """Draw the docs' pictures from the recipe runs that have finished (``python -m hf_kd.plots``).

    Writes ``DOCS/NAME.png`` for every recipe config NAME whose run (its ``output_dir``) has finished; the others
    are listed with the command that makes them.

    Args:
        argv: The command-line arguments (``--configs`` folder, ``--docs`` folder); ``None``: ``sys.argv``.
    """
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--configs", default="recipes/configs")
    parser.add_argument("--docs", default="docs")
    options = parser.parse_args(argv)
    for name in sorted(os.listdir(options.configs)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(options.configs, name)) as handle:
            output_dir = (yaml.safe_load(handle) or {}).get("output_dir")
        stem = os.path.join(options.docs, name.removesuffix(".yaml"))
        drawn = redraw(output_dir, stem) if output_dir else None
        if drawn:
            print(f"{stem}.png ({os.path.getsize(stem + '.png') / 1e3:.0f} kB) from {output_dir}")
        else:
            print(f"skipped {name}: no finished run in {output_dir} (run the recipe with --config {name})")


if __name__ == "__main__":
    main()
