"""Which knowledge helps? The same student trained from scratch and with each knowledge type, on real digits.

scikit-learn's digits (8×8, 10 classes), a fixed split: 360 test images, 100 labeled training images, the other
1,337 training images as unlabeled transfer data. Teacher: ViT 4 layers × 64 trained once on all 1,437 training
labels. Student: ViT 1 layer × 16. Every distilled run uses ``alpha = 0.5`` (0.5·CE on the labeled rows +
0.5·Σ wᵢ·Lᵢ on all rows) with the paper weights of each loss; "alone" is CE + that loss, "+ kl" adds
response KD (τ = 2). The scratch row trains the same student on the 100 labels only, with the same steps.
Each cell is the test accuracy, mean ± std over the seeds (student initialisation and data order).

    python benchmarks/knowledge_table.py                       # 3 seeds, 800 steps, 2 worker processes (~30 min)
    python benchmarks/knowledge_table.py --seeds 0 --steps 100 --methods kl hint   # a quick look
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from schemes_digits import write_table
from sklearn.datasets import load_digits
from transformers import EvalPrediction, Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.data import add_sample_index, split_labeled_transfer
from hf_kd.metrics import classification_metrics
from hf_kd.plots import plot_bars

# id → (knowledge family, loss entry). Widths differ (16 vs 64): losses comparing features learn projectors.
METHODS = {
    "kl": ("response", {"name": "kl"}),
    "dkd": ("response", {"name": "dkd", "beta": 2.0}),
    "hint": ("intermediate", {"name": "hint"}),
    "hidden_mse": ("intermediate", {"name": "hidden_mse", "projector": "linear"}),
    "hidden_cosine": ("intermediate", {"name": "hidden_cosine", "projector": "linear"}),
    "attention_mse": ("intermediate", {"name": "attention_mse"}),
    "attention_kl": ("intermediate", {"name": "attention_kl"}),
    "pkd": ("intermediate", {"name": "pkd", "projector": "linear"}),
    "at": ("intermediate", {"name": "at"}),
    "fsp": ("intermediate", {"name": "fsp", "projector": "linear"}),
    "rkd_distance": ("relation", {"name": "rkd_distance"}),
    "rkd_angle": ("relation", {"name": "rkd_angle"}),
    "sp": ("relation", {"name": "sp"}),
    "pkt": ("relation", {"name": "pkt"}),
    "irg": ("relation", {"name": "irg"}),
    "vid": ("mutual information", {"name": "vid"}),
    "crd": ("mutual information", {"name": "crd", "num_negatives": 1024}),
    "infonce": ("mutual information", {"name": "infonce"}),
}


def vit(hidden: int, layers: int) -> ViTForImageClassification:
    return ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 16),
            intermediate_size=4 * hidden,
            num_labels=10,
        )
    )


def digits_splits():
    digits = load_digits()
    pixels = ((digits.data / 16.0 - 0.5) / 0.5).reshape(-1, 1, 8, 8).astype(np.float32)
    data = Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": digits.target.tolist()})
    data = data.cast_column("labels", data.features["labels"])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data))
    test, train = data.select(order[:360]), data.select(order[360:])
    labeled, transfer = split_labeled_transfer(train, 100, seed=0)
    return (
        train.with_format("torch"),
        labeled.with_format("torch"),
        add_sample_index(transfer).with_format("torch"),
        test.with_format("torch"),
    )


def arguments(output_dir: str, seed: int, steps: int, **extra) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=64,
        learning_rate=3e-3,
        warmup_steps=50,
        weight_decay=0.01,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        logging_steps=max(steps, 1),
        disable_tqdm=True,
        **extra,
    )


def accuracy(model, test) -> float:
    model.eval()
    rows = test[:]
    with torch.no_grad():
        logits = model(pixel_values=rows["pixel_values"]).logits
    return classification_metrics(EvalPrediction(predictions=logits.numpy(), label_ids=rows["labels"].numpy()))[
        "accuracy"
    ]


def train_teacher(path: str, steps: int) -> float:
    train, _, _, test = digits_splits()
    torch.manual_seed(0)
    teacher = vit(64, 4)
    Trainer(model=teacher, train_dataset=train, args=TrainingArguments(**arguments(path, 0, steps))).train()
    teacher.save_pretrained(path)
    return accuracy(teacher, test)


def run(job: tuple) -> tuple:
    """One training run: (method, variant, seed) → (accuracy, ms per step)."""
    method, variant, seed, steps, teacher_path = job
    torch.set_num_threads(1)
    _, labeled, transfer, test = digits_splits()
    torch.manual_seed(seed)
    student = vit(16, 1)
    with tempfile.TemporaryDirectory() as output_dir:
        if method == "scratch":
            trainer = Trainer(
                model=student, train_dataset=labeled, args=TrainingArguments(**arguments(output_dir, seed, steps))
            )
        else:
            losses = [METHODS[method][1]] + ([{"name": "kl"}] if variant == "+ kl" and method != "kl" else [])
            args = DistillationConfig(**arguments(output_dir, seed, steps, alpha=0.5, temperature=2.0, losses=losses))
            teacher = ViTForImageClassification.from_pretrained(teacher_path)
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=transfer)
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    return method, variant, seed, accuracy(student, test), 1000 * elapsed / steps


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--teacher_steps", type=int, default=800)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/knowledge_table.md")
    options = parser.parse_args()

    teacher_path = tempfile.mkdtemp(prefix="hf_kd_teacher_")
    teacher_accuracy = train_teacher(teacher_path, options.teacher_steps)
    jobs = [("scratch", "alone", seed, options.steps, teacher_path) for seed in options.seeds]
    for method in options.methods:
        for variant in ("alone",) if method == "kl" else ("alone", "+ kl"):
            jobs += [(method, variant, seed, options.steps, teacher_path) for seed in options.seeds]
    with multiprocessing.get_context("spawn").Pool(options.workers) as pool:
        results = pool.map(run, jobs, chunksize=1)

    by_key: dict[tuple, list] = {}
    for method, variant, _, acc, ms in results:
        by_key.setdefault((method, variant), []).append((acc, ms))

    def accuracies_of(method, variant):
        return [acc for acc, _ in by_key.get((method, variant), [])]

    def step_ms(method, variant):
        runs = by_key.get((method, variant), [])
        return f"{statistics.mean(ms for _, ms in runs):.0f}" if runs else "–"

    lines = [
        f"Digits, student ViT 1×16 (3.9k parameters), teacher ViT 4×64 ({100 * teacher_accuracy:.1f}% test accuracy), "
        f"100 labels + 1,337 unlabeled, {options.steps} steps of batch 64, seeds {options.seeds}; test accuracy "
        "(%, mean ± std) and ms per training step (1 thread, 2 runs in parallel).",
        "",
        "| method | knowledge | alone | + kl | ms/step alone | ms/step + kl |",
        "|---|---|---:|---:|---:|---:|",
        f"| scratch (100 labels, no teacher) | – | {cell(accuracies_of('scratch', 'alone'))} | – | "
        f"{step_ms('scratch', 'alone')} | – |",
    ]
    for method in options.methods:
        family = METHODS[method][0]
        plus = "–" if method == "kl" else cell(accuracies_of(method, "+ kl"))
        lines.append(
            f"| {method} | {family} | {cell(accuracies_of(method, 'alone'))} | {plus} | "
            f"{step_ms(method, 'alone')} | {step_ms(method, '+ kl')} |"
        )
    write_table("\n".join(lines), options.output)
    accuracies, spreads = {}, {}  # the picture: every cell's mean ± std, the scratch student as the line
    for method, variant in [("scratch", "alone")] + [(m, v) for m in options.methods for v in ("alone", "+ kl")]:
        values = accuracies_of(method, variant)
        if values and not (method == "kl" and variant == "+ kl"):
            name = method if variant == "alone" else f"{method} + kl"
            accuracies[name] = 100 * statistics.mean(values)
            spreads[name] = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    picture = os.path.splitext(options.output)[0] + ".png"
    scratch = accuracies.get("scratch")
    plot_bars(
        accuracies, picture, xlabel="test accuracy, %", errors=spreads, reference=scratch, reference_label="scratch"
    )
    print(f"picture: {picture}")


if __name__ == "__main__":
    main()
