"""Pictures (hf_kd.plots): written, valid, deterministic, and drawn from the same numbers as the table."""

from __future__ import annotations

import json
import warnings

import pytest
from PIL import Image

from hf_kd.plots import (
    curve_series,
    main,
    plot_bars,
    plot_curves,
    plot_quality_latency,
    plot_series,
    quality_latency_points,
    redraw,
)
from hf_kd.recipe_support.tables import report_results

RESULTS = {
    "teacher (MiniLM)": {"accuracy": 0.95, "ms_per_example": 4.0, "parameters": 22_700_000},
    "student from scratch": {"accuracy": 0.61, "ms_per_example": 0.5, "parameters": 4_400_000},
    "student distilled": {"accuracy": 0.83, "ms_per_example": 0.5, "parameters": 4_400_000},
    "no latency measured": {"accuracy": 0.5},
}
HISTORY = [
    {
        "loss": 2.0,
        "ce": 1.2,
        "kl": 0.8,
        "kl/wide": 0.9,
        "learning_rate": 1e-3,
        "grad_norm": 3.0,
        "epoch": 0.5,
        "step": 10,
    },
    {
        "loss": 1.5,
        "ce": 0.9,
        "kl": 0.6,
        "kl/wide": 0.7,
        "learning_rate": 5e-4,
        "grad_norm": 2.0,
        "epoch": 1.0,
        "step": 20,
    },
    {"eval_loss": 1.4, "eval_kl": 0.55, "eval_accuracy": 0.7, "eval_runtime": 1.0, "epoch": 1.0, "step": 20},
    {"train_runtime": 9.0, "train_loss": 1.75, "total_flos": 1.0, "epoch": 1.0, "step": 20},
]


def test_the_quality_latency_picture_draws_the_tables_numbers(tmp_path):
    points = plot_quality_latency(RESULTS, "accuracy", str(tmp_path / "results"), title="a run")
    assert [(p["name"], p["quality"], p["latency"], p["parameters"]) for p in points] == [
        (name, row["accuracy"], row["ms_per_example"], row["parameters"])
        for name, row in RESULTS.items()
        if "ms_per_example" in row
    ]
    with Image.open(tmp_path / "results.png") as image:
        assert image.format == "PNG" and image.size == (750, 450)
    assert (tmp_path / "results.svg").read_text().lstrip().startswith("<?xml")
    first = (tmp_path / "results.png").read_bytes(), (tmp_path / "results.svg").read_bytes()
    plot_quality_latency(RESULTS, "accuracy", str(tmp_path / "results"), title="a run")
    assert ((tmp_path / "results.png").read_bytes(), (tmp_path / "results.svg").read_bytes()) == first  # same bytes
    assert plot_quality_latency({"a": {"mse": 0.3}}, "mse", str(tmp_path / "none")) == []
    assert not (tmp_path / "none.png").exists()


def test_the_curves_hold_every_logged_term_train_and_eval(tmp_path):
    series = plot_curves(HISTORY, str(tmp_path / "curves.png"))
    assert series == curve_series(HISTORY)
    assert series["train"] == {
        "loss": [(10, 2.0), (20, 1.5)],
        "ce": [(10, 1.2), (20, 0.9)],
        "kl": [(10, 0.8), (20, 0.6)],
        "kl/wide": [(10, 0.9), (20, 0.7)],
    }
    assert series["eval"] == {"loss": [(20, 1.4)], "kl": [(20, 0.55)], "accuracy": [(20, 0.7)]}
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1200, 520)  # 5 terms: 3 columns × 2 rows


def test_a_series_picture_draws_each_line_as_given(tmp_path):
    curves = {"0.1/fedavg": [0.5, 0.7, 0.8], "0.1/feddf": [0.4, 0.6], "empty": []}
    drawn = plot_series(curves, str(tmp_path / "results"), xlabel="round", ylabel="accuracy")
    assert drawn == {"0.1/fedavg": [0.5, 0.7, 0.8], "0.1/feddf": [0.4, 0.6]}
    with Image.open(tmp_path / "results.png") as image:
        assert image.format == "PNG" and image.size == (750, 450)


def test_a_bar_picture_draws_each_value_in_order(tmp_path):
    ratios = {"plain fine-tuning": 1.0, "distillation (CE + KL)": 1.42, "a note, not a number": "–"}
    drawn = plot_bars(ratios, str(tmp_path / "cost.png"), xlabel="ratio to plain", reference=1.0)
    assert drawn == {"plain fine-tuning": 1.0, "distillation (CE + KL)": 1.42}  # in the table's order
    with Image.open(tmp_path / "cost.png") as image:
        assert image.format == "PNG" and image.size == (800, 200)  # 1.2 + 0.4 inch per bar, at 100 dpi
    first = (tmp_path / "cost.png").read_bytes()
    accuracies, spreads = {"scratch": 0.56, "kl": 0.85, "hint": 0.6}, {"scratch": 0.01, "kl": 0.02, "hint": 0.03}
    plot_bars(accuracies, str(tmp_path / "accuracy.png"), xlabel="accuracy", errors=spreads, reference=0.56)
    with Image.open(tmp_path / "accuracy.png") as image:
        assert image.size == (800, 240)
    plot_bars(ratios, str(tmp_path / "cost.png"), xlabel="ratio to plain", reference=1.0)
    assert (tmp_path / "cost.png").read_bytes() == first  # same numbers, same bytes
    assert plot_bars({"only text": "–"}, str(tmp_path / "none.png"), xlabel="x") == {}
    assert not (tmp_path / "none.png").exists()


def test_values_that_are_not_finite_are_left_out_of_the_pictures_with_a_warning_naming_them(tmp_path):
    results = {
        **RESULTS,
        "student diverged": {"accuracy": float("nan"), "ms_per_example": 0.5, "parameters": 4_400_000},
        "timing failed": {"accuracy": 0.7, "ms_per_example": float("inf"), "parameters": 4_400_000},
    }
    with pytest.warns(UserWarning, match="leaves out 2 row") as caught:
        points = plot_quality_latency(results, "accuracy", str(tmp_path / "results"))
    assert points == quality_latency_points(RESULTS, "accuracy")  # the drawn rows, as without the broken ones
    message = str(caught[0].message)
    assert "'student diverged' (accuracy = nan, ms_per_example = 0.5)" in message
    assert "'timing failed' (accuracy = 0.7, ms_per_example = inf)" in message
    assert "no latency measured" not in message  # a row without the number is not a broken one
    with pytest.warns(UserWarning, match=r"'kd' \(nan\); 'hint' \(-inf\)"):
        drawn = plot_bars(
            {"plain": 1.0, "kd": float("nan"), "hint": -float("inf")}, str(tmp_path / "b.png"), xlabel="x"
        )
    assert drawn == {"plain": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finite numbers and notes: no warning
        plot_bars({"plain": 1.0, "a note": "–"}, str(tmp_path / "c.png"), xlabel="x")


def test_redraw_finds_the_metric_and_latency_in_any_row(tmp_path):
    results = {"teacher (cache)": {"accuracy": 0.9, "parameters": 22_700_000}, **RESULTS}
    (tmp_path / "run").mkdir()
    report_results(results, ["accuracy", "parameters", "ms_per_example"], "a run", str(tmp_path / "run"))
    assert redraw(str(tmp_path / "run"), str(tmp_path / "again")) == quality_latency_points(RESULTS, "accuracy")
    (tmp_path / "throughput").mkdir()
    rows = {"teacher": {"ndcg@10": 0.8}, "student": {"ndcg@10": 0.7, "texts_per_s": 900.0, "parameters": 10}}
    (tmp_path / "throughput" / "results.json").write_text(json.dumps(rows))
    drawn = redraw(str(tmp_path / "throughput"), str(tmp_path / "t"))
    assert drawn == [{"name": "student", "quality": 0.7, "latency": 900.0, "parameters": 10}]


def test_long_row_names_are_cut_in_the_middle_where_rows_agree():
    from hf_kd.plots import _shorten

    name = "student MiniLM 2×384 cross-encoder (teacher init), distilled from the cross-encoder (margin_mse)"
    assert _shorten(name) == "student MiniLM 2×384 cross-enco…m the cross-encoder (margin_mse)"
    assert len(_shorten(name)) == 64 and _shorten("teacher") == "teacher"


def test_make_pictures_redraws_finished_runs_and_lists_the_others(tmp_path, capsys):
    configs, finished = tmp_path / "configs", tmp_path / "finished"
    configs.mkdir()
    (configs / "done.yaml").write_text(f"output_dir: {finished}\n")
    (configs / "pending.yaml").write_text(f"output_dir: {tmp_path / 'never'}\n")
    finished.mkdir()
    report_results(RESULTS, ["accuracy", "parameters", "ms_per_example"], "a run", str(finished))
    main(["--configs", str(configs), "--docs", str(tmp_path / "docs")])
    printed = capsys.readouterr().out
    assert "skipped pending.yaml" in printed and f"{tmp_path / 'docs' / 'done'}.png" in printed
    with Image.open(tmp_path / "docs" / "done.png") as image:
        assert image.format == "PNG" and image.size == (750, 450)
    # the same points as the table (the README picture carries no title)
    assert redraw(str(finished), str(tmp_path / "again")) == quality_latency_points(RESULTS, "accuracy")
    (tmp_path / "again.png").unlink()
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["done.png"]
