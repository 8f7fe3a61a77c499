"""The mean teacher on a real domain shift: digits (scikit-learn's 8×8 images) → the same digits rotated, with no
target label seen.

Per seed: a held-out test split of 360 images, rotated (the target domain). Of the 1,437 training images, a random
half stays upright and labeled (the source), the other half is rotated and unlabeled (the target rows, label −100).
The same ViT 2×32 student, steps and seed for every row:

- source only: trained on the labeled upright images;
- mean teacher: the labeled source rows + the unlabeled target rows, the student's EMA as teacher (consistency
  --consistency, default ``logit_mse``, ramped up over the first third of the steps; Gaussian input noise --noise
  for each model, drawn separately), the student and its EMA teacher both measured;
- upper bound: trained with the target rows' labels too.

Prints the rotated-test accuracy (mean ± std over seeds) and writes it to --output_dir/mean_teacher_digits.md.

    python benchmarks/mean_teacher_digits.py --seeds 0 1 2      # ~4 min per seed on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
from datasets import concatenate_datasets
from schemes_digits import TRAINING, digits, load_recipe, recorder, sweep
from scipy.ndimage import rotate
from transformers import set_seed

from hf_kd import DistillationConfig
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.noise import GaussianNoise
from hf_kd.recipe_support.baselines import train_plainly
from hf_kd.schemes.mean_teacher import mean_teacher


def rotated(dataset, angle: float):
    """``dataset`` with every image rotated by ``angle`` degrees (background filled with the normalised 0, -1)."""

    def turn(batch):
        pixels = np.asarray(batch["pixel_values"], dtype=np.float32)
        turned = rotate(pixels, angle, axes=(2, 3), reshape=False, order=1, mode="constant", cval=-1.0)
        return {"pixel_values": turned}

    return dataset.with_format(None).map(turn, batched=True).with_format("torch")


def run_seed(seed: int, options, recipe_module, scores: dict[str, list[float]]) -> None:
    folder = os.path.join(options.output_dir, f"seed{seed}")
    recipe, train, test = digits(recipe_module, os.path.join(options.output_dir, "data"), seed)
    test = rotated(test, options.angle)
    halves = train.train_test_split(test_size=0.5, stratify_by_column="labels", seed=seed)
    source, target = halves["train"], rotated(halves["test"], options.angle)
    unlabeled = target.with_format(None).map(lambda row: {"labels": -100}).with_format("torch")
    plain_args = DistillationConfig(
        output_dir=folder,
        max_steps=options.steps,
        seed=seed,
        temperature=1.0,
        distillation_rampup_steps=options.steps // 3,
        **TRAINING,
    )

    def student():
        set_seed(seed)
        return recipe_module.vit(recipe, 32, 2, 10)

    def accuracy(model):
        return evaluate_model(model, test, compute_metrics=classification_metrics, use_cpu=True)["accuracy"]

    record = recorder(scores, seed)

    record(
        "source only (upright labels)",
        accuracy(train_plainly(student(), plain_args, source, output_dir=f"{folder}/source")),
    )
    args = dataclasses.replace(plain_args, output_dir=f"{folder}/mean_teacher")
    trained, ema = mean_teacher(
        student(),
        args,
        ema_decay=options.decay,
        consistency_loss=f"{options.consistency}:{options.consistency_weight}",
        student_noise=GaussianNoise(options.noise) if options.noise else None,
        teacher_noise=GaussianNoise(options.noise) if options.noise else None,
        train_dataset=concatenate_datasets([source, unlabeled]).shuffle(seed=seed),
    )
    record("mean teacher: the student", accuracy(trained.model))
    record("mean teacher: its EMA teacher", accuracy(ema.model))
    both = concatenate_datasets([source, target])
    record(
        "upper bound (target labels too)",
        accuracy(train_plainly(student(), plain_args, both, output_dir=f"{folder}/upper")),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--angle", type=float, default=30.0, help="The target domain's rotation, degrees.")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--consistency", default="logit_mse", help="The consistency loss (logit_mse, prob_mse, kl).")
    parser.add_argument("--consistency_weight", type=float, default=1.0)
    parser.add_argument("--noise", type=float, default=0.1, help="Gaussian input noise std for each model (0: none).")
    parser.add_argument("--output_dir", default="outputs/mean_teacher_digits")
    options = parser.parse_args()
    recipe_module = load_recipe("image_classification")
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, recipe_module, scores),
        lambda seeds: (
            f"digits → digits rotated {options.angle:g}°: 718 labeled upright + 719 unlabeled rotated "
            f"training images, 360 rotated test images, {options.steps} steps, decay {options.decay}, consistency "
            f"{options.consistency}:{options.consistency_weight:g}, noise {options.noise:g}, seeds {seeds}"
        ),
        "mean_teacher_digits",
    )


if __name__ == "__main__":
    main()
