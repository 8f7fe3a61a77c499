"""Refusals of the task modules: cross-modal rows and students, ranking rows, regression targets, pictures."""

from __future__ import annotations

import json
import warnings

import torch
from conftest import classification_data, config, tiny_bert
from datasets import Dataset
from refusal_cases import Case

from hf_kd import DistillationTrainer
from hf_kd.plots import plot_bars, plot_quality_latency, quality_latency_points, redraw
from hf_kd.ranking import CrossEncoderRanker, RankingCollator
from hf_kd.schemes.cross_modal import cross_modal

# ---- cross-modal ----


def _audio_rows(short_row: int, samples: int) -> Dataset:
    from test_cross_modal import paired_rows

    rows = paired_rows(8, seed=0)
    audio = list(rows["input_values"])
    audio[short_row] = [0.1] * samples
    return rows.remove_columns("input_values").add_column("input_values", audio)


def _cross_modal_run(tmp_path, rows, student=None, steps=1):
    from test_cross_modal import config as cross_modal_config
    from test_cross_modal import speech_student, text_teacher

    student = student if student is not None else speech_student(seed=1)
    args = cross_modal_config(tmp_path / "out", steps=steps, per_device_train_batch_size=8)
    return cross_modal(student, text_teacher(), args, train_dataset=rows)


def _lora_speech_student():
    import peft
    from test_cross_modal import speech_student

    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["projector", "classifier"])
    return peft.get_peft_model(speech_student(seed=1), lora)


def _train_lora_student(tmp_path):
    from test_cross_modal import paired_rows

    student = _lora_speech_student()
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    trainer = _cross_modal_run(tmp_path, paired_rows(16, seed=0), student, steps=2)
    trainer.train()
    return trainer, before


def _check_lora_student(result, tmp_path):
    trainer, before = result
    assert trainer.state.global_step == 2
    changed = {name for name, p in trainer.student.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all(("lora_" in name or "modules_to_save" in name) for name in changed)
    assert any("lora_B" in name for name in changed)  # the adapters learned (lora_B starts at 0)


# ---- ranking ----


def _dataset(rows: list[dict]) -> Dataset:
    """Rows as a data set with every row's columns (None where a row has none; from_list keeps row 0's only)."""
    columns = dict.fromkeys(column for row in rows for column in row)
    return Dataset.from_dict({column: [row.get(column) for row in rows] for column in columns})


def _ranking_trainer(tmp_path, rows, losses="margin_mse", **kwargs):
    def ranker(seed):
        return CrossEncoderRanker(tiny_bert(num_labels=1, seed=seed))

    return DistillationTrainer(
        model=ranker(1),
        teacher_model=ranker(0),
        args=config(tmp_path / "out", losses=losses, per_device_train_batch_size=2, max_steps=1),
        train_dataset=_dataset(rows),
        data_collator=RankingCollator(),
        **kwargs,
    )


PAIRS = {"input_ids": [[5, 6], [7, 8]], "labels": [1, 0]}
BI_ENCODER = {"query_input_ids": [5], "candidate_input_ids": [[6], [7]], "labels": [1, 0]}

# ---- regression ----


def _regression_rows(targets) -> Dataset:
    data = classification_data(n=len(targets)).remove_columns("labels")
    return data.add_column("labels", [float(target) for target in targets])


def _regression_trainer(tmp_path, data, **overrides):
    return DistillationTrainer(
        model=tiny_bert(num_labels=1, seed=1),
        teacher_model=tiny_bert(num_labels=1, seed=2),
        args=config(tmp_path / "out", losses="regression_mse", max_steps=1, **overrides),
        train_dataset=data,
    )


def _regression_rows_as_a_list(tmp_path):
    rows = [dict(row) for row in _regression_rows([0.5, float("inf"), 0.1, 0.2])]  # not a datasets.Dataset
    _regression_trainer(tmp_path, rows, per_device_train_batch_size=4, remove_unused_columns=False).train()


# ---- pictures ----


def _with_warnings(draw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drawn = draw()
    return drawn, [str(warning.message) for warning in caught]


def _nan_latency(tmp_path):
    results = {
        "teacher": {"accuracy": 0.9, "ms_per_example": float("nan"), "parameters": 1000},
        "student": {"accuracy": 0.8, "ms_per_example": 0.5, "parameters": 100},
    }
    return _with_warnings(lambda: plot_quality_latency(results, "accuracy", str(tmp_path / "results")))


def _check_nan_latency(result, tmp_path):
    points, messages = result
    assert [point["name"] for point in points] == ["student"]  # only what the picture holds
    assert len(messages) == 1 and "'teacher' (accuracy = 0.9, ms_per_example = nan)" in messages[0]


def _inf_bar(tmp_path):
    return _with_warnings(lambda: plot_bars({"plain": 1.0, "kd": float("inf")}, str(tmp_path / "b.png"), xlabel="x"))


def _check_inf_bar(result, tmp_path):
    drawn, messages = result
    assert drawn == {"plain": 1.0}
    assert len(messages) == 1 and "'kd' (inf)" in messages[0]


RESULTS_TEACHER_FIRST = {
    "teacher (no latency measured)": {"accuracy": 0.95, "parameters": 1000},
    "student": {"accuracy": 0.8, "ms_per_example": 0.5, "parameters": 100},
}


def _redraw_teacher_first(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(RESULTS_TEACHER_FIRST))
    return redraw(str(tmp_path / "run"), str(tmp_path / "redrawn"))


def _check_redraw_teacher_first(result, tmp_path):
    assert result == quality_latency_points(RESULTS_TEACHER_FIRST, "accuracy")
    assert [point["name"] for point in result] == ["student"] and (tmp_path / "redrawn.png").exists()


CASES = [
    Case(
        "cross-modal-short-audio",
        "`cross_modal(...)` with a 10-sample audio row",
        lambda p: _cross_modal_run(p, _audio_rows(3, 10)),
        ValueError,
        "row 3 of train_dataset has 10 samples in 'input_values'",
    ),
    Case(
        "cross-modal-empty-audio",
        "`cross_modal(...)` with an audio row of 0 samples",
        lambda p: _cross_modal_run(p, _audio_rows(5, 0)),
        ValueError,
        "needs at least 45 samples to make one frame",
    ),
    Case(
        "cross-modal-lora-student",
        "`cross_modal(a LoRA speech student, ...)`",
        _train_lora_student,
        check=_check_lora_student,
    ),
    Case(
        "ranking-mixed-layouts",
        "`DistillationTrainer(data_collator=RankingCollator())` on rows mixing the pair and bi-encoder layouts",
        lambda p: _ranking_trainer(p, [PAIRS, PAIRS, BI_ENCODER]),
        ValueError,
        "train_dataset: ranking row 2 sets ['candidate_input_ids', 'labels', 'query_input_ids'] but row 0 sets",
    ),
    Case(
        "ranking-mixed-layouts-batch",
        "`RankingCollator()` on a batch mixing the pair and bi-encoder layouts",
        lambda p: RankingCollator()([PAIRS, BI_ENCODER]),
        ValueError,
        "every row of a ranking data set needs the same columns",
    ),
    Case(
        "ranking-empty-group",
        "`DistillationTrainer(data_collator=RankingCollator())` with a query of no candidates",
        lambda p: _ranking_trainer(p, [PAIRS, {"input_ids": [], "labels": []}]),
        ValueError,
        "ranking row 1 has no candidates",
    ),
    Case(
        "ranking-group-of-one",
        '`losses="margin_mse"` with a query of one candidate',
        lambda p: _ranking_trainer(p, [PAIRS, PAIRS, {"input_ids": [[5, 6]], "labels": [1]}]),
        ValueError,
        "ranking row 2 has 1 candidate: ['margin_mse'] compare each query's candidates",
    ),
    Case(
        "ranking-group-of-one-eval",
        '`losses="listwise_kl"` with an eval_dataset of one candidate per query',
        lambda p: _ranking_trainer(
            p, [PAIRS], "listwise_kl", eval_dataset=_dataset([{"input_ids": [[5]], "labels": [1]}])
        ),
        ValueError,
        "eval_dataset: ranking row 0 has 1 candidate: ['listwise_kl']",
    ),
    Case(
        "regression-inf-target",
        "a regression student with a target of +inf",
        lambda p: _regression_trainer(p, _regression_rows([0.5, 0.2, 0.1, 0.3, 0.4, float("inf"), 0.6])),
        ValueError,
        "regression target 'labels' of row 5 of train_dataset is inf",
    ),
    Case(
        "regression-inf-target-batch",
        "a regression student with a target of +inf, rows given as a list",
        _regression_rows_as_a_list,
        ValueError,
        "regression target 'labels' of row 1 of this batch is inf",
    ),
    Case(
        "regression-target-overflow",
        "a regression student with a target of 1e30 (its square overflows float32)",
        lambda p: _regression_trainer(p, _regression_rows([0.5, 1e30, 0.1, 0.2])).train(),
        FloatingPointError,
        "the student's label loss (ce) overflowed on the batch's labels",
    ),
    Case("plots-nan-latency", "`plot_quality_latency` with a NaN latency", _nan_latency, check=_check_nan_latency),
    Case("plots-inf-bar", "`plot_bars` with an infinite value", _inf_bar, check=_check_inf_bar),
    Case(
        "plots-redraw-first-row-without-latency",
        "`redraw` of a table whose first row has no latency",
        _redraw_teacher_first,
        check=_check_redraw_teacher_first,
    ),
]
