"""Experiment tracking through the Trainer's ``report_to``, for real and offline: TensorBoard event files and
trackio's local store hold the distillation terms (train and eval, per teacher) and the distillation config."""

from __future__ import annotations

import glob
import json
import os
import sys
import textwrap

import pytest
from conftest import classification_data, config, launch, tiny_bert

from hf_kd import DistillationTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = "kl,hidden_mse:1:projector=linear"


def two_teacher_trainer(tmp_path, report_to: str, **overrides) -> DistillationTrainer:
    return DistillationTrainer(
        model=tiny_bert(hidden=16, layers=2, seed=2),
        teacher_model={
            "wide": tiny_bert(hidden=32, layers=4, seed=1),
            "narrow": tiny_bert(hidden=24, layers=3, seed=3),
        },
        args=config(
            tmp_path,
            losses=LOSSES,
            report_to=[report_to],
            max_steps=3,
            eval_strategy="steps",
            eval_steps=3,
            **overrides,
        ),
        train_dataset=classification_data(),
        eval_dataset=classification_data(n=8, seed=1),
    )


def test_tensorboard_event_files_hold_every_term_and_the_distillation_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = two_teacher_trainer(tmp_path, "tensorboard")
    trainer.train()
    (events,) = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    accumulator = EventAccumulator(events, size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    for term in ("kl", "ce", "hidden_mse/wide", "hidden_mse/narrow", "teacher_weight/wide", "teacher_weight/narrow"):
        assert f"train/{term}" in scalars, sorted(scalars)
    assert {"eval/kl", "eval/hidden_mse/wide", "eval/loss"} <= scalars, sorted(scalars)
    logged = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry and "loss" in entry]
    assert [event.value for event in accumulator.Scalars("train/kl")] == pytest.approx(logged, rel=1e-6)
    (text,) = accumulator.Tensors("args/text_summary")
    arguments = json.loads(text.tensor_proto.string_val[0].decode())
    assert arguments["losses"][0]["name"] == "kl" and arguments["losses"][1]["name"] == "hidden_mse"
    assert arguments["teacher_aggregation"] == "mean_probs"


def test_trackio_stores_every_term_and_the_distillation_config_locally(tmp_path):
    # trackio reads TRACKIO_DIR when it is imported: a fresh process with the store under tmp_path.
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from test_tracking import two_teacher_trainer
        from pathlib import Path
        trainer = two_teacher_trainer(Path({str(tmp_path / "run")!r}), "trackio", project="hf_kd-tracking")
        trainer.train()
        from trackio.sqlite_storage import SQLiteStorage
        (run,) = SQLiteStorage.get_runs("hf_kd-tracking")
        logs = SQLiteStorage.get_logs("hf_kd-tracking", run)
        print(json.dumps({{"logs": logs, "config": SQLiteStorage.get_run_config("hf_kd-tracking", run)}}, default=str))
        """
    )
    env = {
        **os.environ,
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "TRACKIO_PROJECT": "hf_kd-tracking",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    completed = launch([sys.executable, "-c", script], timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    stored = json.loads(completed.stdout.strip().splitlines()[-1])
    keys = {key for entry in stored["logs"] for key in entry}
    for term in ("kl", "hidden_mse/wide", "hidden_mse/narrow", "teacher_weight/narrow"):
        assert f"train/{term}" in keys, sorted(keys)
    assert {"eval/kl", "eval/hidden_mse/narrow"} <= keys, sorted(keys)
    assert [loss["name"] for loss in stored["config"]["losses"]] == ["kl", "hidden_mse"]
    assert os.listdir(tmp_path / "trackio")  # the local store, no network
