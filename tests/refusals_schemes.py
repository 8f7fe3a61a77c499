"""Scheme options refused at construction (issue 25): what an online scheme cannot honour, teacher weights with
nothing to combine, noise given twice, token windows without a length or a tokenizer."""

from __future__ import annotations

from conftest import classification_data, config, lm_data, tiny_bert, tiny_gpt2
from refusal_cases import Case

from hf_kd import DistillationTrainer
from hf_kd.noise import TokenMasking
from hf_kd.schemes import run_scheme
from hf_kd.schemes.mutual_learning import MutualLearningTrainer
from hf_kd.schemes.noisy_student import NoisyStudentConfig


def _peers(tmp_path, **overrides):
    peers = [tiny_bert(hidden=16, seed=1), tiny_bert(hidden=16, seed=2)]
    return MutualLearningTrainer(peers, config(tmp_path / "out", **overrides), train_dataset=classification_data())


def _scheme(tmp_path, name, teacher=True, **kwargs):
    return run_scheme(
        name,
        config(tmp_path / "out", max_steps=1, **kwargs.pop("overrides", {})),
        teacher=tiny_bert(seed=1) if teacher else None,
        make_student=lambda k: tiny_bert(hidden=16, seed=10 + k),
        train_dataset=classification_data(n=8),
        **kwargs,
    )


CASES = [
    Case(
        "online-chunk-size",
        "`MutualLearningTrainer(peers, DistillationConfig(chunk_size=4))`",
        lambda p: _peers(p, chunk_size=4),
        ValueError,
        "mutual learning cannot take chunk_size=4",
    ),
    Case(
        "online-label-smoothing",
        "`MutualLearningTrainer(peers, DistillationConfig(label_smoothing_factor=0.1))`",
        lambda p: _peers(p, label_smoothing_factor=0.1),
        ValueError,
        "mutual learning cannot take label_smoothing_factor=0.1",
    ),
    Case(
        "online-weighted-peers",
        '`MutualLearningTrainer(peers, DistillationConfig(teacher_aggregation="weighted", teacher_weights=[1, 2]))`',
        lambda p: _peers(p, teacher_aggregation="weighted", teacher_weights=[1.0, 2.0]),
        ValueError,
        "the peers that teach are combined by the scheme itself",
    ),
    Case(
        "weighted-one-teacher",
        '`DistillationTrainer(student, one_teacher, DistillationConfig(teacher_aggregation="weighted", '
        "teacher_weights=[2]))`",
        lambda p: DistillationTrainer(
            tiny_bert(hidden=16, seed=2),
            tiny_bert(seed=1),
            config(p / "out", teacher_aggregation="weighted", teacher_weights=[2.0]),
            train_dataset=classification_data(),
        ),
        ValueError,
        "combines several teachers; this trainer has one ('teacher')",
    ),
    Case(
        "chain-weights-one-teacher-each",
        '`run_scheme("teacher_assistant", ...)` with `teacher_weights=[1]` (every stage has one teacher)',
        lambda p: _scheme(
            p,
            "teacher_assistant",
            make_assistant=lambda hidden_size, layers: tiny_bert(hidden=24, seed=5),
            overrides={"teacher_aggregation": "weighted", "teacher_weights": [1.0]},
        ),
        ValueError,
        "every stage of this chain (assistant1, student) has one",
    ),
    Case(
        "noisy-student-windows-without-crop",
        "`NoisyStudentConfig(label_windows=4)` without `crop_length`",
        lambda p: NoisyStudentConfig(label_windows=4),
        ValueError,
        "label_windows=4 spreads windows of crop_length tokens over each row: set crop_length too",
    ),
    Case(
        "noisy-student-crop-without-tokenizer",
        "`run_scheme(NoisyStudentConfig(crop_length=6), ...)` without a tokenizer as `processing_class`",
        lambda p: _scheme(p, NoisyStudentConfig(crop_length=6)),
        ValueError,
        "crop_length=6 cuts token rows and keeps the tokenizer's special tokens at each window's ends: give the "
        "trainers a tokenizer as processing_class (got NoneType)",
    ),
    Case(
        "noisy-student-crop-token-level",
        "`run_scheme(NoisyStudentConfig(crop_length=6), ...)` with a causal-LM teacher",
        lambda p: run_scheme(
            NoisyStudentConfig(crop_length=6),
            config(p / "out", max_steps=1),
            teacher=tiny_gpt2(seed=1),
            make_student=lambda k: tiny_gpt2(seed=10 + k),
            train_dataset=lm_data(n=4),
        ),
        ValueError,
        "crop_length=6 moves tokens, which per-token labels cannot follow: it is for models with one output per row; "
        "the teacher GPT2LMHeadModel predicts per token",
    ),
    Case(
        "scheme-noise-twice",
        '`run_scheme("noisy_student", ..., student_noise=TokenMasking(...))`',
        lambda p: _scheme(p, "noisy_student", student_noise=TokenMasking(0.1, 1)),
        ValueError,
        "scheme 'noisy_student' noises the inputs itself",
    ),
]
