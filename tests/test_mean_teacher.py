"""Mean teacher: the EMA rule (1 and 2 processes), its checkpoint and exact resume, the consistency ramp, the two
stochastic views, saving both models, and the refusals."""

import json
import math
import os

import pytest
import torch
from conftest import ROOT, classification_data, config, run_two_processes, tiny_bert
from transformers import BertForSequenceClassification, TrainerCallback

from hf_kd import DistillationTrainer
from hf_kd.schemes.mean_teacher import EMATeacher, mean_teacher


class RecordStudent(TrainerCallback):
    """The student's parameters after every optimizer step."""

    def __init__(self, student):
        self.student, self.steps = student, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append([p.detach().clone() for p in self.student.parameters()])


def expected_ema(initial, steps, decay):
    """θ_T after each recorded student, by the rule written out in float64: d_t = min(1 − 1/(t + 1), decay)."""
    teacher = [p.double() for p in initial]
    for t, student in enumerate(steps, start=1):
        d = min(1 - 1 / (t + 1), decay)
        teacher = [d * a + (1 - d) * b.double() for a, b in zip(teacher, student)]
    return teacher


def assert_follows_rule(teacher_parameters, expected):
    # 1e-7 absolute, plus float32's rounding of the two update ops per step on values near 1 (≈ 2.5 ulp).
    for got, want in zip(teacher_parameters, expected):
        assert torch.allclose(got.double(), want, atol=1e-7, rtol=3e-7)


def test_the_teacher_follows_the_ema_rule_after_every_step(tmp_path):
    student = tiny_bert(hidden=16, seed=2)
    initial = [p.detach().clone() for p in student.parameters()]
    teacher = EMATeacher(student, decay=0.9)
    args = config(tmp_path, max_steps=12, losses="logit_mse", learning_rate=0.05)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data())
    recorder = RecordStudent(student)
    trainer.add_callback(recorder)
    trainer.train()
    assert len(recorder.steps) == 12
    assert [teacher.decay_at(t) for t in (1, 2, 9, 10, 50)] == pytest.approx([0.5, 2 / 3, 0.9, 0.9, 0.9])
    assert_follows_rule(teacher.model.parameters(), expected_ema(initial, recorder.steps, 0.9))
    assert not any(p.requires_grad for p in teacher.model.parameters())  # frozen: only the rule moves it
    assert any(not torch.equal(a, b) for a, b in zip(teacher.model.parameters(), student.parameters()))


def test_every_process_holds_the_same_teacher_by_the_ema_rule(tmp_path):
    worker = os.path.join(ROOT, "tests", "distributed", "mean_teacher_worker.py")
    run_two_processes(worker, tmp_path, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for a, b in zip(ranks[0]["teacher"], ranks[1]["teacher"]):
        assert torch.equal(a, b)
    record = ranks[0]
    assert len(record["steps"]) == 6
    assert_follows_rule(record["teacher"], expected_ema(record["initial"], record["steps"], 0.8))


def test_the_ema_teacher_checkpoints_and_resumes_exactly(tmp_path):
    def run(folder, resume=None, max_steps=8):
        student = tiny_bert(hidden=16, seed=2)
        teacher = EMATeacher(student, decay=0.7)
        args = config(folder, max_steps=max_steps, losses="logit_mse", save_strategy="steps", save_steps=4)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=classification_data()
        )
        trainer.train(resume_from_checkpoint=resume)
        return student, teacher

    student, teacher = run(tmp_path / "whole")
    _, half = run(tmp_path / "halves", max_steps=8)
    checkpoint = tmp_path / "halves" / "checkpoint-4"
    assert (checkpoint / "hf_kd_losses.safetensors").exists()
    resumed_student, resumed = run(tmp_path / "halves", resume=str(checkpoint))
    for a, b in zip(resumed.model.parameters(), teacher.model.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)
    for a, b in zip(resumed_student.parameters(), student.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)
    # A fresh copy would differ: the resumed teacher is the checkpoint's, not the initial student's.
    fresh = EMATeacher(tiny_bert(hidden=16, seed=2), decay=0.7)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.model.parameters(), teacher.model.parameters()))


def test_the_consistency_weight_ramps_up_as_exp_of_minus_five_one_minus_t_squared(tmp_path):
    args = config(tmp_path, max_steps=6, losses="logit_mse", distillation_rampup_steps=4, hard_label_weight=1.0)
    student = tiny_bert(hidden=16, seed=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=EMATeacher(student, 0.9), args=args, train_dataset=classification_data()
    )
    ramp = [trainer.distillation_objective.ramp(step) for step in range(6)]
    assert ramp == pytest.approx([math.exp(-5), math.exp(-5 * 0.75**2), math.exp(-5 * 0.25), math.exp(-5 / 16), 1, 1])
    assert trainer.distillation_objective.ramp(None) == 1.0  # evaluation: no ramp
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for step, entry in enumerate(logs):  # the logged total is CE + ramp(step)·consistency, step by step
        assert entry["loss"] == pytest.approx(entry["ce"] + ramp[step] * entry["logit_mse"], rel=1e-3, abs=1e-6)
    with pytest.raises(ValueError, match="distillation_rampup_steps must be an integer >= 0"):
        config(tmp_path, distillation_rampup_steps=-1)


def test_student_and_teacher_see_their_own_stochastic_views(tmp_path):
    student = tiny_bert(hidden=16, seed=2)
    seen = []

    def teacher_noise(batch):
        seen.append(batch["input_ids"].clone())
        return {**batch, "input_ids": torch.zeros_like(batch["input_ids"])}

    teacher = EMATeacher(student, 0.9, noise=teacher_noise)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, max_steps=1), train_dataset=classification_data()
    )
    batch = {"input_ids": torch.randint(1, 60, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    student.train()
    noised = teacher(batch, frozenset({"logits"})).logits
    assert teacher.model.training  # its dropout on, in training
    assert torch.equal(seen[-1], batch["input_ids"])  # the noise got the clean batch
    clean = teacher.model(input_ids=torch.zeros_like(batch["input_ids"]), attention_mask=batch["attention_mask"])
    assert torch.allclose(noised, clean.logits)  # and the teacher read the noised one (no dropout in tiny_bert)
    student.eval()
    calls = len(seen)
    teacher(batch, frozenset({"logits"}))
    assert not teacher.model.training and len(seen) == calls  # evaluation: no noise, no dropout
    assert trainer.teacher is teacher


def test_mean_teacher_saves_and_measures_the_student_and_the_ema_teacher(tmp_path):
    data = classification_data(n=48)
    labels = [label if row < 16 else -100 for row, label in enumerate(data["labels"])]  # target rows unlabeled
    data = data.remove_columns("labels").add_column("labels", labels)
    student = tiny_bert(hidden=16, seed=2)
    args = config(tmp_path, max_steps=6, distillation_rampup_steps=3)
    stages = mean_teacher(
        student,
        args,
        ema_decay=0.9,
        train_dataset=data,
        eval_dataset=classification_data(n=16, seed=5),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    assert [stage.name for stage in stages] == ["student", "ema_teacher"]
    assert set(stages[0].metrics) >= {"accuracy"} and set(stages[1].metrics) >= {"accuracy"}
    summary = json.loads((tmp_path / "model" / "distillation_config.json").read_text())
    assert summary["losses"][0]["name"] == "logit_mse"  # the paper's consistency loss by default
    assert summary["stage"]["decay"] == 0.9 and summary["stage"]["ema_teacher"] == stages[1].metrics
    reloaded = BertForSequenceClassification.from_pretrained(stages[1].model_folder)
    for a, b in zip(reloaded.parameters(), stages[1].model.parameters()):
        assert torch.equal(a, b)
    assert stages[0].trainer.comparison.keys() == {"ema_teacher", "student"}  # the card's table has both
