"""Pushing a distilled student for real over HTTP, to a Hub-compatible endpoint served on 127.0.0.1."""

import json
import os
import sys

import pytest
from conftest import classification_data, config, launch, tiny_bert, torchrun
from hub_server import LocalHub
from safetensors.torch import load

from hf_kd import DistillationTrainer
from hf_kd.hub import hub_url

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed", "push_worker.py")


def push(tmp_path, endpoint, *extra, processes=1):
    launcher = [] if processes == 1 else torchrun(2)[1:]
    env = dict(
        os.environ,
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_TOKEN="hf_test_token",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        OMP_NUM_THREADS="1",
    )
    return launch(
        [sys.executable, *launcher, WORKER, tmp_path / "out", "alice/tiny-student", *extra], timeout=300, env=env
    )


@pytest.mark.slow
def test_push_uploads_the_student_its_card_and_config_only(tmp_path):
    with LocalHub() as hub:
        completed = push(tmp_path, hub.endpoint)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert hub.state.repos == {"alice/tiny-student": {"private": True}}  # hub_private_repo passed through
    (commit,) = hub.state.commits
    assert commit["repo"] == "alice/tiny-student" and commit["revision"] == "main"
    files = commit["files"]
    # Exactly the student: no teacher copy, no checkpoint, no pickled training_args.bin.
    assert set(files) == {
        "model.safetensors",
        "config.json",
        "distillation_config.json",
        "README.md",
        "quality_latency.png",  # the card's picture of the teacher-vs-student table
    }
    assert files["quality_latency.png"][:8] == b"\x89PNG\r\n\x1a\n"
    weights = load(files["model.safetensors"])
    student = tiny_bert(hidden=16).state_dict()
    assert weights.keys() == student.keys()  # no projector, no other loss part
    assert all(weights[key].shape == student[key].shape for key in weights)  # the 16-wide student, not the teacher
    summary = json.loads(files["distillation_config.json"])
    assert summary["losses"][1] == {"name": "hidden_mse", "weight": 0.5, "projector": "linear"}
    card = files["README.md"].decode()
    for expected in (
        "knowledge-distillation",
        "hf_kd",
        "synthetic-tokens",
        "| `kl` | 1 |",
        "| `hidden_mse` | 0.5 |",
        "TinyBERT",
        "arXiv:1503.02531",
        "| teacher |",
        "| student |",
        "accuracy",
        "BertForSequenceClassification",
        "(1 process (cpu))",  # how it was trained, after the steps
        "![Quality against latency: teacher and student](quality_latency.png)",
    ):
        assert expected in card, expected


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero3", "fsdp2"])
def test_push_from_two_processes_measures_both_models_on_every_process(tmp_path, engine):
    # The card's teacher-vs-student table is measured by the trainer's own evaluation loop on every process (under
    # ZeRO-3 and FSDP2 each forward gathers shards collectively); only the main process uploads.
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    with LocalHub() as hub:
        completed = push(tmp_path, hub.endpoint, *([engine] if engine != "ddp" else []), processes=2)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (commit,) = hub.state.commits
    files = commit["files"]
    assert {"model.safetensors", "config.json", "distillation_config.json", "README.md"} <= set(files)
    assert not any("projector" in key for key in load(files["model.safetensors"]))
    card = files["README.md"].decode()
    name = {"ddp": "DDP", "zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}[engine]
    assert f"- Steps: 2 ({name}, 2 processes)" in card
    rows = [line for line in card.splitlines() if line.startswith(("| teacher |", "| student |"))]
    assert len(rows) == 2 and all("%" in row for row in rows)  # accuracy and macro-F1 of both models


@pytest.mark.slow
def test_push_as_pull_request(tmp_path):
    with LocalHub() as hub:
        completed = push(tmp_path, hub.endpoint, "create_pr")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert hub.state.commits[0]["create_pr"]


@pytest.mark.slow
def test_push_a_lora_student_as_an_adapter_with_its_card(tmp_path):
    with LocalHub() as hub:
        completed = push(tmp_path, hub.endpoint, "lora")
    assert completed.returncode == 0, completed.stderr[-3000:]
    files = hub.state.commits[0]["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "distillation_config.json", "README.md"} <= set(files)
    assert "model.safetensors" not in files
    card = files["README.md"].decode()
    for expected in ("LORA adapter", "PeftModel.from_pretrained", "library_name: peft", "| teacher |", "adapters off"):
        assert expected in card, expected


def test_failed_push_keeps_local_files_and_says_where(tmp_path):
    # CI runs with HF_HUB_OFFLINE=1: the upload is refused before any network call.
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2),
        teacher_model=tiny_bert(seed=1),
        args=config(tmp_path, hub_model_id="alice/x"),
        train_dataset=classification_data(),
    )
    with pytest.raises(RuntimeError, match="pushing the student to the Hub failed.*Nothing local was lost"):
        trainer.push_to_hub()
    folder = tmp_path / "_hub_upload"
    assert {"model.safetensors", "README.md", "distillation_config.json"} <= set(os.listdir(folder))


def test_server_down_is_a_clear_error(tmp_path):
    with LocalHub() as hub:
        endpoint = hub.endpoint
    completed = push(tmp_path, endpoint)  # nothing listens there any more
    assert completed.returncode != 0
    assert "pushing the student to the Hub failed" in completed.stderr
    assert os.path.exists(tmp_path / "out" / "_hub_upload" / "model.safetensors")


def test_hub_url_only_for_repo_ids(tmp_path):
    assert (
        hub_url("sentence-transformers/all-MiniLM-L6-v2")
        == "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2"
    )
    assert hub_url(str(tmp_path)) is None and hub_url("./model") is None and hub_url(None) is None
