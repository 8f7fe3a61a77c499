"""Two real processes (gloo DDP on CPU) give the same training as one process with the same global batch."""

import json
import os
import subprocess
import sys

import psutil
import pytest
import torch
from conftest import launch, launch_on_a_free_port, run_two_processes, torchrun
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed", "train_worker.py")


def run(output_dir, batch_size, accumulation, processes=1, engine="ddp"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if processes == 1:
        command = [sys.executable, WORKER]
    else:
        command = [*torchrun(processes), WORKER]
    launch([*command, output_dir, batch_size, accumulation, engine], timeout=600, env=env, check=True)
    history = json.loads((output_dir / "logs.json").read_text())
    placement = history[-1]  # how the teacher was placed, and the parameter counts the card will show
    return (
        load_file(str(output_dir / "weights.safetensors")),
        [entry for entry in history if "loss" in entry],
        placement,
    )


def run_on_two_processes(output_dir, engine):
    """2 processes × 2 micro-batches of 2 rows (the global batch of one process with 8) under ``engine``."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    return run(output_dir, batch_size=2, accumulation=2, processes=2, engine=engine)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["", "cache"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, variant):
    # cache: the teacher replayed from disk (sample_index rows), each process reading its own rows.
    single, single_logs, _ = run(tmp_path / "single", batch_size=8, accumulation=1, engine=f"ddp-{variant}")
    ddp, ddp_logs, _ = run_on_two_processes(tmp_path / "ddp", f"ddp-{variant}")
    assert set(single) == set(ddp) and any(key.startswith("losses.") for key in single) == (variant == "")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    for one, two in zip(single_logs, ddp_logs, strict=True):
        for key in ("loss", "ce", "kl") + (("tvd", "hidden_mse") if variant == "" else ()):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=2e-6), key  # logs keep 6 decimals


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine",
    [
        "zero2",
        "zero3",
        "zero3-chunked",
        "zero3-lora",
        "zero3-adapterbase",
        "fsdp2",
        "fsdp2-chunked",
        "fsdp2-lora",
        "fsdp2-adapterbase",
    ],
)
def test_sharded_engines_on_two_processes_match_one_process(tmp_path, engine):
    # DeepSpeed on its CPU accelerator; FSDP2 over gloo (Accelerate keeps FSDP for GPUs only: see cpu_fsdp.py).
    # Plain runs include the hidden-state loss's learned projector, which DeepSpeed's optimizer does not hold (hf_kd
    # gives it its own) and which FSDP2's optimizer preparation would not find among the model's parameters.
    # *-chunked: chunk_size=5 with sharded LM heads; under ZeRO-3 the processes hold different numbers of supervised
    # tokens, so hf_kd pads their chunk loops to the same length (each head call is a collective gather); under FSDP2
    # the heads' units are gathered once per micro-batch instead. *-lora: a LoRA student (with the projector);
    # *-adapterbase: the same student taught by its own base, adapters off (AdapterBaseTeacher, no second network).
    chunked = engine.endswith("chunked")
    variant = engine.partition("-")[2]  # chunked, lora (a LoRA student: its adapter weights compared) or none
    single, single_logs, _ = run(tmp_path / "single", batch_size=8, accumulation=1, engine=f"ddp-{variant}")
    sharded, sharded_logs, placement = run_on_two_processes(tmp_path / engine, engine)
    assert any(key.startswith("losses.") for key in single) != chunked
    # Every engine saves the same files: the LM head tied to the embeddings left out (ZeRO-2 and FSDP2 gather it as
    # a separate copy, which hf_kd drops).
    assert single and set(single) == set(sharded) and "student.lm_head.weight" not in sharded
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    for one, two in zip(single_logs, sharded_logs, strict=True):
        for key in ("loss", "ce", "kl", "tvd") + (() if chunked else ("hidden_mse",)):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=2e-6), key  # logs keep 6 decimals
    engine_name = {"zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}[engine.split("-")[0]]
    assert placement["summary"]["engine"] == f"{engine_name}, 2 processes"
    if variant == "adapterbase":  # no teacher network to place: the student's own (sharded) base
        assert placement["teacher_type"] == "NoneType"
        assert placement["summary"]["teacher_class"].endswith("(the student's base, adapters off)")
        return
    # DeepSpeed: an inference-only engine, sharded like the student under ZeRO-3, replicated (stage 0) under ZeRO-2.
    # FSDP2: fully_shard per layer with the student's plugin.
    assert placement["teacher_type"] == ("DeepSpeedEngine" if engine.startswith("zero") else "FSDPGPT2LMHeadModel")
    assert placement["teacher_sharded"] == (not engine.startswith("zero2"))
    assert placement["summary"]["teacher_parameters"] > placement["summary"]["student_parameters"] > 0


@pytest.mark.slow
def test_fsdp2_teacher_is_sharded_frozen_and_exact(tmp_path):
    output = tmp_path / "fsdp.json"
    worker = os.path.join(os.path.dirname(WORKER), "fsdp_teacher_worker.py")
    run_two_processes(
        worker,
        str(output),
    )
    result = json.loads(output.read_text())
    assert result["max_abs_difference"] < 1e-5  # the same logits as the whole teacher
    assert result["sharded_after_forward"] and result["local_fraction"] < 0.6  # each process holds about half
    assert not result["training"] and not result["requires_grad"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3-resume", "fsdp2-resume"])
def test_resuming_under_sharded_engines_continues_the_learned_loss_parts_exactly(tmp_path, engine):
    # The engines checkpoint the student's optimizer; hf_kd checkpoints the projector and its own AdamW state beside
    # it. A run resumed after step 1 ends where the uninterrupted run did (a fresh AdamW state would not).
    resumed, _, _ = run_on_two_processes(tmp_path, engine)
    uninterrupted = load_file(str(tmp_path / "uninterrupted.safetensors"))
    assert set(resumed) == set(uninterrupted) and any(key.startswith("losses.") for key in resumed)
    assert (tmp_path / "checkpoint-1" / "hf_kd_loss_optimizer.pt").exists()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_crd_memory_banks_stay_identical_across_processes(tmp_path):
    # Each process sees its own rows; every bank update gathers all processes' rows, so both processes end with the
    # same banks, written at every training row (2 steps × 2 processes × 2 micro-batches × 2 rows = all 16).
    run_on_two_processes(tmp_path, "ddp-crd")
    before, after = (
        [load_file(str(tmp_path / f"banks_{when}_{rank}.safetensors")) for rank in (0, 1)]
        for when in ("before", "after")
    )
    for name in ("student", "teacher"):
        torch.testing.assert_close(before[0][name], before[1][name], rtol=0, atol=0)  # rank 0's initialisation
        torch.testing.assert_close(after[0][name], after[1][name], rtol=0, atol=0)
        assert (after[0][name] != before[0][name]).any(1).all()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3-onpolicy", "fsdp2-onpolicy"])
def test_on_policy_rollouts_under_sharded_engines_decode_in_lock_step(tmp_path, engine):
    # The student stops on many tokens, so the processes' samples end after different numbers of decoding steps;
    # every step gathers the sharded weights collectively, so all processes must keep stepping (synced_gpus). Without
    # it the FSDP2 run breaks off (a gloo peer hangs up).
    _, logs, placement = run_on_two_processes(tmp_path, engine)
    assert len(logs) == 2 and all(entry["jsd"] >= 0 and "ce" not in entry for entry in logs)  # own samples only
    assert placement["summary"]["steps"] == 2


def test_teacher_deepspeed_buckets_are_sized_from_the_teachers_width():
    # The shipped ZeRO configs leave bucket sizes to "auto"; transformers fills them for the student at train(),
    # hf_kd for the teacher's inference engine (left "auto", DeepSpeed would not take them; absent, it would
    # allocate 500M-element buckets — 2 GiB per process, found by benchmarks/engine_memory.py).
    from conftest import tiny_bert

    from hf_kd.teachers.loading import _size_zero_buckets

    zero = {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto", "overlap_comm": True}
    _size_zero_buckets(zero, tiny_bert(hidden=32, seed=0))
    assert zero == {"stage": 3, "reduce_bucket_size": 1024, "stage3_prefetch_bucket_size": 921, "overlap_comm": True}
    with pytest.raises(ValueError, match="give them numbers"):
        _size_zero_buckets({"stage3_param_persistence_threshold": "auto"}, torch.nn.Linear(2, 2))


def test_a_launch_killed_at_its_timeout_takes_every_process_it_started_along(tmp_path):
    # torchrun starts each worker in a session of its own, out of reach of the launch's process group: killing the
    # launch alone would leave them running (and loading the machine for the tests after).
    script = (
        "import subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        f"open({str(tmp_path / 'worker.pid')!r}, 'w').write(str(worker.pid))\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        launch([sys.executable, "-c", script], timeout=10)
    worker = psutil.Process(int((tmp_path / "worker.pid").read_text()))
    gone, _ = psutil.wait_procs([worker], timeout=10)  # SIGKILLed; its new parent (init) reaps it
    assert gone or worker.status() == psutil.STATUS_ZOMBIE


def test_a_launch_given_a_port_another_launch_took_runs_again_on_a_fresh_one():
    ports = []

    def command_for_port(port):  # the first launch meets a port clash at its rendezvous, the second runs
        ports.append(port)
        clash = "import sys; sys.exit('DistNetworkError: ... name: EADDRINUSE, message: address already in use')"
        return [sys.executable, "-c", clash if len(ports) == 1 else "print('ran')"]

    completed = launch_on_a_free_port(command_for_port, timeout=60, check=True)
    assert completed.stdout == "ran\n" and len(ports) == 2
    assert torchrun(2)[3:5] == ["--standalone", "--nproc_per_node"]  # torchrun picks its own port: nothing to race
