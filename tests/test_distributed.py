"""Two real processes (gloo DDP on CPU) give the same training as one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_two_processes
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed", "train_worker.py")


def run(output_dir, batch_size, accumulation, processes=1, engine="ddp"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if processes == 1:
        command = [sys.executable, WORKER]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            "29533",
            WORKER,
        ]
    completed = subprocess.run(
        [*command, str(output_dir), str(batch_size), str(accumulation), engine],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    history = json.loads((output_dir / "logs.json").read_text())
    logs = [entry for entry in history if "loss" in entry]
    if engine.startswith("zero"):  # how the teacher was placed, and the parameter counts the card will show
        logs.append(history[-1])
    return load_file(str(output_dir / "weights.safetensors")), logs


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single, single_logs = run(tmp_path / "single", batch_size=8, accumulation=1)
    ddp, ddp_logs = run(tmp_path / "ddp", batch_size=2, accumulation=2, processes=2)
    assert set(single) == set(ddp) and any(key.startswith("losses.") for key in single)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    for one, two in zip(single_logs, ddp_logs):
        for key in ("loss", "ce", "kl", "tvd", "hidden_mse"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3", "zero3-chunked"])
def test_deepspeed_zero_on_two_processes_matches_one_process(tmp_path, engine):
    # zero3-chunked: chunk_size=5 with sharded LM heads; the processes hold different numbers of supervised tokens,
    # so hf_kd pads their chunk loops to the same length (each head call is a collective gather).
    pytest.importorskip("deepspeed")
    single_engine = "none-chunked" if engine.endswith("chunked") else "none"
    single, single_logs = run(tmp_path / "single", batch_size=8, accumulation=1, engine=single_engine)
    sharded, sharded_logs = run(tmp_path / engine, batch_size=2, accumulation=2, processes=2, engine=engine)
    student_keys = [key for key in single if key.startswith("student.")]
    assert student_keys and set(student_keys) <= set(sharded)
    for key in student_keys:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    for one, two in zip(single_logs, sharded_logs[:-1]):
        for key in ("loss", "ce", "kl", "tvd"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), key
    placement = sharded_logs[-1]
    # An inference-only DeepSpeed engine: sharded like the student under ZeRO-3, replicated (stage 0) under ZeRO-2.
    assert placement["teacher_type"] == "DeepSpeedEngine"
    assert placement["teacher_sharded"] == engine.startswith("zero3")
    assert placement["summary"]["teacher_parameters"] > placement["summary"]["student_parameters"] > 0


@pytest.mark.slow
def test_fsdp2_teacher_is_sharded_frozen_and_exact(tmp_path):
    output = tmp_path / "fsdp.json"
    worker = os.path.join(os.path.dirname(WORKER), "fsdp_teacher_worker.py")
    run_two_processes(
        worker,
        str(output),
        port=29534,
    )
    result = json.loads(output.read_text())
    assert result["max_abs_difference"] < 1e-5  # the same logits as the whole teacher
    assert result["sharded_after_forward"] and result["local_fraction"] < 0.6  # each process holds about half
    assert not result["training"] and not result["requires_grad"]
