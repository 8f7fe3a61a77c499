"""Every registered scheme × the options users combine with it: each cell trains (two steps) or is refused with a
``ValueError`` before the first training step — never a crash mid-training or an option silently ignored. The matrix
reads the registry, so a new scheme is in it by being registered."""

from __future__ import annotations

import pytest
from conftest import classification_data, config, lm_data, tiny_bert, tiny_gpt2

from hf_kd import DistillationTrainer
from hf_kd.noise import TokenMasking
from hf_kd.schemes import available_schemes, get_scheme, run_scheme
from hf_kd.schemes.cross_modal import paired_views

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
