"""Evidence for the many-teacher schemes on real digits (scikit-learn's 1,797 8×8 images), over several seeds.

The image recipe's setting: a held-out test split of 360 images; the students see --num_labeled labels plus the
other training images unlabeled (the transfer set). Per seed, with the same steps for every student:

- several teachers: the good teacher (ViT 4×64, all labels), a second teacher of another architecture trained on
  a random half of the labels (ViT 2×32), and a broken one (the good teacher with its classes permuted: as
  confident as the good one, and always wrong); the ViT 1×16 student distilled from the good teacher alone, from
  the ensemble of all three by mean_probs, and by adaptive weights at τ_w = 1 (the default) and 0.1; also each
  teacher's mean adaptive weight;
- teacher assistant: good teacher → 1×16 student directly vs via a 2×32 assistant;
- born-again: a 2×32 teacher trained on every label, then generations 1–3 of the same architecture (CE + KD);
- noisy student: a 2×32 teacher trained on the labeled images only, then rounds 1–3 of an equal-size student on
  labels + soft pseudo-labels (threshold 0.5) with Gaussian input noise (std 0.1) and dropout 0.1.

Prints one table of test accuracy (mean ± std over seeds) and writes it to --output_dir/schemes_digits.md.

    python benchmarks/schemes_digits.py --seeds 0 1 2        # ~16 min per seed on 2 CPU cores
    python benchmarks/schemes_digits.py --seeds 0 1 2 --parts ns   # one scheme: multi, ta, ban, ns
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys

import numpy as np
import torch
from transformers import set_seed

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.data import add_sample_index, split_labeled_transfer
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.noise import GaussianNoise
from hf_kd.plots import plot_bars
from hf_kd.recipe_support.baselines import train_plainly
from hf_kd.schemes.born_again import born_again
from hf_kd.schemes.noisy_student import noisy_student
from hf_kd.schemes.teacher_assistant import teacher_assistant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How every digits student and teacher trains (the digits benchmarks share it).
TRAINING = dict(
    per_device_train_batch_size=64,
    per_device_eval_batch_size=256,
    learning_rate=3e-3,
    warmup_steps=50,
    weight_decay=0.01,
    logging_steps=100,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
)


def recorder(scores: dict[str, list[float]], seed: int):
    """``record(name, value)``: appends ``value`` to ``scores[name]`` and prints it with the seed."""

    def record(name: str, value: float) -> None:
        scores.setdefault(name, []).append(value)
        print(f"seed {seed}: {name}: {value:.4f}", flush=True)

    return record


def load_recipe(name: str):
    """``recipes/NAME.py`` imported as a module (its data loading and model builders)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def digits(recipe_module, folder: str, seed: int):
    recipe = recipe_module.ImageRecipeArguments()
    dataset = recipe_module.load_image_dataset(recipe, cache_dir=folder)
    dataset = dataset.class_encode_column("label").rename_column("label", "labels")

    def preprocess(batch):
        pixels = np.asarray(batch["pixels"], dtype=np.float32) / recipe.max_pixel_value
        return {"pixel_values": ((pixels - 0.5) / 0.5).reshape(-1, 1, recipe.image_side, recipe.image_side)}

    dataset = dataset.map(preprocess, batched=True, remove_columns=["pixels"]).with_format("torch")
    splits = dataset.train_test_split(test_size=0.2, stratify_by_column="labels", seed=seed)
    return recipe, splits["train"], splits["test"]


def run_seed(seed: int, options, recipe_module, scores: dict[str, list[float]]) -> None:
    """Every scheme's runs for one seed, their test accuracies appended to ``scores``."""
    folder = os.path.join(options.output_dir, f"seed{seed}")
    recipe, train, test = digits(recipe_module, os.path.join(options.output_dir, "data"), seed)
    labeled, transfer = split_labeled_transfer(train, options.num_labeled, seed=seed)
    labeled, transfer = labeled.with_format("torch"), add_sample_index(transfer).with_format("torch")
    half, _ = split_labeled_transfer(train, len(train) // 2, seed=seed + 100)
    args = DistillationConfig(
        output_dir=folder, max_steps=options.steps, seed=seed, losses="kl", temperature=2.0, alpha=0.5, **TRAINING
    )

    def vit(hidden, layers, init_seed):
        set_seed(init_seed)
        return recipe_module.vit(recipe, hidden, layers, 10)

    def accuracy(model):
        return evaluate_model(model, test, compute_metrics=classification_metrics, use_cpu=True)["accuracy"]

    record = recorder(scores, seed)

    def plain(model, data, steps, name):
        return train_plainly(model, dataclasses.replace(args, max_steps=steps), data, output_dir=f"{folder}/{name}")

    def distil(student, teacher, name, data=transfer, **overrides):
        run_args = dataclasses.replace(args, output_dir=f"{folder}/{name}", **overrides)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=run_args, train_dataset=data)
        trainer.train()
        return trainer

    if {"multi", "ta"} & set(options.parts):
        teachers_and_students(
            seed, options, recipe, plain, distil, vit, accuracy, record, train, labeled, transfer, half, args
        )
    if "ban" in options.parts:
        born_again_generations(seed, options, plain, vit, accuracy, record, train, args, folder)
    if "ns" in options.parts:
        noisy_student_rounds(seed, options, plain, vit, accuracy, record, labeled, transfer, args, folder)


def teachers_and_students(
    seed, options, recipe, plain, distil, vit, accuracy, record, train, labeled, transfer, half, args
):
    # ---- teachers and the scratch student ----
    good = plain(vit(64, 4, seed), train, options.teacher_steps, "good")
    other = plain(vit(32, 2, seed + 1), half, options.teacher_steps, "other")
    broken = vit(64, 4, seed)
    broken.load_state_dict(good.state_dict())
    permutation = torch.roll(torch.arange(10), 1)  # class c scored as c + 1: confidently wrong everywhere
    with torch.no_grad():
        broken.classifier.weight.copy_(good.classifier.weight[permutation])
        broken.classifier.bias.copy_(good.classifier.bias[permutation])
    record("teacher: ViT 4×64, all labels", accuracy(good))
    record("teacher: ViT 2×32, half the labels", accuracy(other))
    record("teacher: broken (classes permuted)", accuracy(broken))
    record(
        "student 1×16 from scratch (labels only)",
        accuracy(plain(vit(16, 1, seed), labeled, options.steps, "scratch")),
    )

    # ---- several teachers ----
    record("student ← good teacher alone", accuracy(distil(vit(16, 1, seed), good, "single").model))
    three = {"good": good, "other": other, "broken": broken}
    trainer = distil(vit(16, 1, seed), three, "mean_probs", teacher_aggregation="mean_probs")
    record("student ← 3 teachers, mean_probs", accuracy(trainer.model))
    # τ_w = 1 (the default) and a sharper 0.1: both good teachers fit the few labels, so their cross-entropies
    # differ by tenths and τ_w = 1 leaves them near even.
    for weight_temperature in (1.0, 0.1):
        name = f"adaptive τ_w={weight_temperature:g}"
        trainer = distil(
            vit(16, 1, seed), three, name, teacher_aggregation="adaptive", adaptive_temperature=weight_temperature
        )
        record(f"student ← 3 teachers, {name}", accuracy(trainer.model))
        history = trainer.state.log_history
        for teacher in three:  # one value per logging window
            weights = [entry[f"teacher_weight/{teacher}"] for entry in history if f"teacher_weight/{teacher}" in entry]
            if weights:
                record(f"adaptive: {name}: mean weight of the {teacher} teacher", statistics.mean(weights))

    if "ta" not in options.parts:
        return
    # ---- teacher assistant ----
    stages = teacher_assistant(good, [vit(32, 2, seed)], vit(16, 1, seed), args, train_dataset=transfer)
    record("student ← assistant 2×32 ← good teacher", accuracy(stages[-1].model))


def born_again_generations(seed, options, plain, vit, accuracy, record, train, args, folder):
    # ---- born-again: same architecture, every label ----
    base = plain(vit(32, 2, seed + 2), train, options.steps, "ban_teacher")
    record("born-again teacher 2×32 (all labels)", accuracy(base))
    generations = born_again(
        base,
        lambda k: vit(32, 2, seed + 10 + k),
        dataclasses.replace(args, output_dir=f"{folder}/ban"),
        generations=3,
        train_dataset=train,
    )
    for stage in generations:
        record(f"born-again {stage.name}", accuracy(stage.model))


def noisy_student_rounds(seed, options, plain, vit, accuracy, record, labeled, transfer, args, folder):
    # ---- noisy student: labeled images only for the teacher, pseudo-labels for the rest ----
    weak = plain(vit(32, 2, seed + 3), labeled, options.steps, "ns_teacher")
    record("noisy-student teacher 2×32 (labels only)", accuracy(weak))
    rounds = noisy_student(
        weak,
        lambda k: vit(32, 2, seed + 20 + k),
        dataclasses.replace(args, output_dir=f"{folder}/ns"),
        train_dataset=transfer,
        rounds=3,
        pseudo_label_threshold=0.5,
        # A 1-pixel RandomShift is too strong on 8×8 digits (measured: round 1 at 46% vs 75% without noise).
        student_noise=GaussianNoise(0.1),
        student_dropout=0.1,
    )
    for stage in rounds:
        record(f"noisy student {stage.name}", accuracy(stage.model))


def write_table(table: str, path: str) -> None:
    """Print a finished table and write it to ``path`` (its folder made if missing)."""
    print(table, flush=True)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        handle.write(table.rstrip("\n") + "\n")


def write_scores(scores: dict[str, list[float]], title: str, stem: str, metric: str = "test accuracy") -> None:
    """Print the mean ± std table of ``scores`` (fractions of 1 shown in %, named ``metric``; ``adaptive:`` rows are
    weights, ``… ms per example`` rows latencies) and write it to ``STEM.md``, the raw values to ``STEM.json`` and
    the fractions to ``STEM.png``."""
    lines = [title, "", f"| model | {metric} (mean ± std) |", "|---|---:|"]
    for name, values in scores.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        if name.startswith("adaptive:") or name.endswith("ms per example"):  # weights and latencies, as numbers
            lines.append(f"| {name} | {statistics.mean(values):.3f} ± {spread:.3f} |")
        else:
            lines.append(f"| {name} | {100 * statistics.mean(values):.1f}% ± {100 * spread:.1f} |")
    write_table("\n".join(lines), f"{stem}.md")
    with open(f"{stem}.json", "w") as handle:
        json.dump(scores, handle, indent=1)
    accuracies = {  # the picture: the accuracy rows, in % (weights and latencies are on other scales)
        name: 100 * statistics.mean(values)
        for name, values in scores.items()
        if not (name.startswith("adaptive:") or name.endswith("ms per example"))
    }
    spreads = {name: 100 * statistics.stdev(scores[name]) if len(scores[name]) > 1 else 0.0 for name in accuracies}
    plot_bars(accuracies, f"{stem}.png", xlabel=f"{metric}, % (mean ± std over seeds)", errors=spreads, title=title)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_labeled", type=int, default=100)
    parser.add_argument("--teacher_steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=600, help="Optimizer steps of every student and stage.")
    parser.add_argument("--output_dir", default="outputs/schemes_digits")
    parser.add_argument(
        "--parts", nargs="+", default=["multi", "ta", "ban", "ns"], choices=["multi", "ta", "ban", "ns"]
    )
    options = parser.parse_args()
    recipe_module = load_recipe("image_classification")
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, recipe_module, scores),
        lambda seeds: (
            f"digits, test split of 360 images, {options.num_labeled} labels + "
            f"{1437 - options.num_labeled} unlabeled for the students, {options.steps} steps per student, seeds {seeds}"
        ),
        "schemes_digits",
    )


def sweep(options, run_seed, title, stem: str, metric: str = "test accuracy") -> None:
    """``run_seed(seed, scores)`` for each of ``options.seeds``; the table (``title(seeds done)``) is rewritten to
    ``options.output_dir/STEM.md`` after every seed, so an interrupted sweep keeps the seeds it finished."""
    os.makedirs(options.output_dir, exist_ok=True)
    scores: dict[str, list[float]] = {}
    for done, seed in enumerate(options.seeds, start=1):
        run_seed(seed, scores)
        write_scores(scores, title(options.seeds[:done]), os.path.join(options.output_dir, stem), metric)


if __name__ == "__main__":
    main()
