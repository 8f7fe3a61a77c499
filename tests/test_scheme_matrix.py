"""Every registered scheme × the options users combine with it: each cell trains (two steps) or is refused with a
``ValueError`` before the first training step — never a crash mid-training or an option silently ignored. The matrix
reads the registry, so a new scheme is in it by being registered."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from conftest import classification_data, config, lm_data, push_to_local_hub, tiny_bert, tiny_gpt2

from hf_kd import DistillationTrainer
from hf_kd.noise import TokenMasking
from hf_kd.schemes import available_schemes, get_scheme, run_scheme
from hf_kd.schemes.cross_modal import paired_views
from hf_kd.schemes.noisy_student import NoisyStudentConfig

# option → (DistillationConfig overrides, what the option is called in a refusal)
OPTIONS = {
    "chunk_size": ({"chunk_size": 4}, "chunk_size"),
    "on_policy_fraction": ({"on_policy_fraction": 1.0, "generation_max_new_tokens": 4}, "on_policy_fraction"),
    "label_smoothing_factor": ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    "gradient_accumulation_steps": ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    "eval_strategy_steps": ({"eval_strategy": "steps", "eval_steps": 1}, "eval"),
    "teacher_aggregation_weighted": ({"teacher_aggregation": "weighted", "teacher_weights": [1.0]}, "teacher_"),
    "student_noise": ({}, "noise"),
    "lora_student": ({}, "PEFT"),
}
LM_OPTIONS = ("chunk_size", "on_policy_fraction")  # options for models that generate: the cells run a causal LM
CLASSIFIERS_ONLY = {"self_distillation"}  # its exits classify pooled features: the LM options meet a classifier


def _lora(model, target_modules):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=target_modules, init_lora_weights=False)
    return peft.get_peft_model(model, lora)


class _CountSteps:
    """Counts DistillationTrainer.training_step calls (every scheme's trainers are DistillationTrainers)."""

    def __init__(self, monkeypatch):
        self.steps = 0
        original = DistillationTrainer.training_step

        def counted(trainer, *args, **kwargs):
            self.steps += 1
            return original(trainer, *args, **kwargs)

        monkeypatch.setattr(DistillationTrainer, "training_step", counted)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("scheme", available_schemes())
def test_every_option_trains_or_is_refused_before_the_first_step(scheme, option, tmp_path, monkeypatch):
    overrides, named = OPTIONS[option]
    entry = get_scheme(scheme)
    language_model = option in LM_OPTIONS and scheme not in CLASSIFIERS_ONLY
    if language_model and scheme == "cross_modal":
        pytest.skip("cross-modal LM pairs need token views aligned across tokenizers (tests/test_cross_tokenizer.py)")
    if language_model:
        data, build, target = lm_data(n=8), tiny_gpt2, ["c_attn"]
    else:
        data, build, target = classification_data(n=16), tiny_bert, ["query", "value"]
    if scheme == "cross_modal":  # the teacher reads its own view of each row
        data = paired_views(data, data.remove_columns("labels"))

    def make_student(k):
        student = build(hidden=16, seed=10 + k)
        return _lora(student, target) if option == "lora_student" else student

    kwargs = {"eval_dataset": data} if option == "eval_strategy_steps" else {}
    if option == "student_noise":
        kwargs["student_noise"] = TokenMasking(0.1, 1)
    counter = _CountSteps(monkeypatch)
    try:
        result = run_scheme(
            scheme,
            config(tmp_path / "out", max_steps=2, **overrides),
            teacher=None if entry.teachers == "none" else build(seed=1),
            make_student=make_student,
            train_dataset=data,
            make_assistant=lambda hidden_size, layers: build(hidden=24, seed=5),
            **kwargs,
        )
    except ValueError as refusal:
        assert counter.steps == 0, f"{scheme} × {option} was refused after {counter.steps} training steps: {refusal}"
        assert named in str(refusal), f"the refusal does not name {named!r}: {refusal}"
        return
    assert counter.steps >= 2 and result.trainer.state.global_step == 2


# ---- cells checked against a plain computation ---------------------------------------------------------------------


class _Killed(Exception):
    """Stands for a kill of the process (a pre-emption) in the middle of a run."""


def _run(scheme, tmp_path, folder, option=None, kill_at_step=None, monkeypatch=None, **overrides):
    """Run ``scheme`` (a name or a config) on the classification set-up (or the LM one for ``chunk_size``) and
    return its result."""
    entry = get_scheme(scheme if isinstance(scheme, str) else scheme.name)
    language_model = option == "chunk_size"
    data, build = (lm_data(n=8), tiny_gpt2) if language_model else (classification_data(n=16), tiny_bert)
    if entry.name == "cross_modal":
        data = paired_views(data, data.remove_columns("labels"))
    kwargs = {"eval_dataset": data} if overrides.get("eval_strategy") == "steps" else {}
    if kill_at_step is not None:
        original, seen = DistillationTrainer.training_step, []

        def killed(trainer, *args, **kw):
            seen.append(1)
            if len(seen) == kill_at_step:
                raise _Killed()
            return original(trainer, *args, **kw)

        monkeypatch.setattr(DistillationTrainer, "training_step", killed)
    try:
        return run_scheme(
            scheme,
            config(tmp_path / folder, **{"max_steps": 2, **overrides}),
            teacher=None if entry.teachers == "none" else build(seed=1),
            make_student=lambda k: build(hidden=16, seed=10 + k),
            train_dataset=data,
            make_assistant=lambda hidden_size, layers: build(hidden=24, seed=5),
            load_student=lambda folder: type(build(hidden=16)).from_pretrained(folder),
            **kwargs,
        )
    finally:
        if kill_at_step is not None:
            monkeypatch.setattr(DistillationTrainer, "training_step", original)


def assert_same_weights(model, reference, atol=1e-6):
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=atol, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


# option → (the cell's overrides, the plain computation's overrides): both must train the same weights
EQUIVALENT = {
    "gradient_accumulation_steps": (
        {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4},
        {"per_device_train_batch_size": 8},
    ),
    "eval_strategy_steps": ({"eval_strategy": "steps", "eval_steps": 1}, {}),  # evaluating does not change training
    "chunk_size": ({"chunk_size": 4}, {}),  # the chunked path gives the plain path's values and gradients
}


@pytest.mark.parametrize("option", list(EQUIVALENT))
@pytest.mark.parametrize("scheme", available_schemes())
def test_working_cells_train_what_the_plain_computation_trains(scheme, option, tmp_path):
    if option == "chunk_size" and scheme in CLASSIFIERS_ONLY | {"cross_modal"}:
        pytest.skip("no causal-LM cell for this scheme (see the matrix above)")
    cell, plain = EQUIVALENT[option]
    if scheme == "noisy_student":  # its noise draws from the global RNG, which every DataLoader iterator draws from
        scheme = NoisyStudentConfig(input_noise=0.0, student_dropout=0.0)
    try:
        result = _run(scheme, tmp_path, "cell", option, **cell)
    except ValueError as refusal:  # an early refusal (the matrix above checks it comes before the first step)
        named = OPTIONS[option][1]
        assert named in str(refusal), f"{scheme} × {option} raised an error not naming {named!r}: {refusal}"
        return
    reference = _run(scheme, tmp_path, "plain", option, **plain)
    assert_same_weights(result.student, reference.student, atol=1e-5)


@pytest.mark.parametrize("scheme", available_schemes())
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(scheme, tmp_path, monkeypatch):
    """Killed at its second training step (after checkpoint-1, in its first trainer), rerun in the same folder: it
    resumes from the checkpoint (finished stages reused) and ends with the uninterrupted run's weights."""
    saving = {"save_strategy": "steps", "save_steps": 1}
    with pytest.raises(_Killed):
        _run(scheme, tmp_path, "killed", kill_at_step=2, monkeypatch=monkeypatch, **saving)
    resumed = _run(scheme, tmp_path, "killed", **saving)
    reference = _run(scheme, tmp_path, "whole", **saving)
    assert_same_weights(resumed.student, reference.student)


def test_every_scheme_pushes_its_final_student_or_refuses_before_training(tmp_path):
    """``push_to_hub=True``: each scheme's repo gets its final student (the weights it returns), its
    ``distillation_config.json`` naming the scheme and a card, once, when the caller saves it (Trainer semantics) — and
    nothing of its other stages (an assistant, a generation, the other peers); or the scheme refuses before training."""
    hub = push_to_local_hub(tmp_path, "scheme_push_worker.py")
    with open(tmp_path / "out" / "report.json") as handle:
        report = json.load(handle)
    assert set(report) == set(available_schemes())
    for scheme, outcome in report.items():
        commits = [commit for commit in hub.commits if commit["repo"] == f"alice/{scheme}"]
        if outcome != "pushed":
            assert "push_to_hub" in outcome and not commits, (scheme, outcome)
            continue
        assert len(commits) == 1, f"{scheme} pushed {len(commits)} times"  # the final student, once
        files = commits[0]["files"]
        local = tmp_path / "out" / "local" / scheme
        pushed = safetensors.torch.load(files["model.safetensors"])
        for name, value in safetensors.torch.load_file(local / "model.safetensors").items():
            torch.testing.assert_close(pushed[name], value, msg=lambda m, where=f"{scheme}, {name}": f"{where}: {m}")
        assert json.loads(files["distillation_config.json"])["scheme"]["name"] == scheme
        assert "README.md" in files and not any(path.startswith(("stage", "peer", "round")) for path in files)
