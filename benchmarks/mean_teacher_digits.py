"""The mean teacher on a real domain shift: digits (scikit-learn's 8×8 images) → the same digits rotated, with no
target label seen; plain, and with French et al. 2018's fixes (self-ensembling for domain adaptation).

Per seed: a held-out test split of 360 images, rotated (the target domain). Of the 1,437 training images, a random
half stays upright and labeled (the source), the other half is rotated and unlabeled (the target rows, label −100).
The same ViT 2×32 student, steps and seed for every row (--runs picks them):

- ``source``: source only, trained on the labeled upright images;
- ``source_augmented``: the same with French et al.'s augmentation (below), so that the adaptation rows are compared
  with the augmentation alone too;
- ``mean_teacher``: the labeled source rows + the unlabeled target rows, the student's EMA as teacher (consistency
  --consistency, default ``logit_mse``, ramped up over the first third of the steps; Gaussian input noise --noise
  for each model, drawn separately), the student and its EMA teacher both measured;
- ``self_ensembling``: French et al.'s set-up on the same data: ``prob_mse`` (their squared difference of the
  probabilities) weight --se_weight with ``confidence_threshold`` --confidence_threshold (their 0.968), plus
  ``class_balance`` weight --class_balance scaled by the confident fraction, no ramp-up (theirs has none with the
  threshold), and their augmentation drawn separately for each model: a random affine map (identity + N(0, 0.1²) per
  entry), a translation of up to 2 px of their 32 (here 0.5 px of 8), Gaussian noise 0.1. Its batch holds
  --se_batch_rows source-only batches (2: about as many labeled rows per step as source only, plus as many target
  rows, as French et al. draw a source and a target batch each step). Several --confidence_threshold values: one run
  each, and the row is the one whose EMA teacher scores best on the target training rows (chosen per seed on
  validation, never on the test split); each run prints the share of target rows its teacher is confident on;
- ``upper``: upper bound, trained with the target rows' labels too.

--validation measures every row on the target training rows (rotated, their labels never used in training)
instead of the test split: settings are chosen there, the test split is read once, for the table.

Prints the rotated-test accuracy (mean ± std over seeds) and writes it to --output_dir/mean_teacher_digits.md.

    python benchmarks/mean_teacher_digits.py --seeds 0 1 2 --steps 2000 --runs source source_augmented \
        self_ensembling upper --confidence_threshold 0.968 0.9 0.8
    python benchmarks/mean_teacher_digits.py --seeds 0 --runs self_ensembling --validation
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F
from datasets import concatenate_datasets
from schemes_digits import TRAINING, digits, load_recipe, recorder, sweep
from scipy.ndimage import rotate
from transformers import default_data_collator, set_seed

from hf_kd import DistillationConfig
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.noise import GaussianNoise
from hf_kd.recipe_support.baselines import train_plainly
from hf_kd.schemes.mean_teacher import mean_teacher

RUNS = ["source", "source_augmented", "mean_teacher", "self_ensembling", "upper"]


def rotated(dataset, angle: float):
    """``dataset`` with every image rotated by ``angle`` degrees (background filled with the normalised 0, -1)."""

    def turn(batch):
        pixels = np.asarray(batch["pixel_values"], dtype=np.float32)
        turned = rotate(pixels, angle, axes=(2, 3), reshape=False, order=1, mode="constant", cval=-1.0)
        return {"pixel_values": turned}

    return dataset.with_format(None).map(turn, batched=True).with_format("torch")


class RandomAffine:
    """French et al. 2018's augmentation of small images: a random affine map (the identity plus N(0, std²) on each
    entry of its 2×2 matrix), a translation uniform in ±shift pixels along each axis, then Gaussian noise.

    Args:
        std: The standard deviation added to each entry of the affine matrix.
        shift: The largest translation, in pixels.
        noise: The standard deviation of the Gaussian noise added afterwards (0: none).
        fill: The value of pixels mapped from outside the image (the normalised background).
    """

    def __init__(self, std: float = 0.1, shift: float = 0.5, noise: float = 0.1, fill: float = -1.0):
        self.std, self.shift, self.noise, self.fill = std, shift, noise, fill

    def __call__(self, batch: dict) -> dict:
        images = batch["pixel_values"]
        size, (height, width) = len(images), images.shape[-2:]
        matrix = torch.eye(2) + self.std * torch.randn(size, 2, 2)
        # affine_grid's coordinates span [-1, 1]: one pixel is 2/width of them.
        pixels = torch.tensor([2.0 / width, 2.0 / height])
        translation = (torch.rand(size, 2) * 2 - 1) * self.shift * pixels
        theta = torch.cat([matrix, translation[:, :, None]], dim=2).to(images)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved = F.grid_sample(images - self.fill, grid, align_corners=False) + self.fill  # outside: the fill
        if self.noise:
            moved = moved + self.noise * torch.randn_like(moved)
        return {**batch, "pixel_values": moved}


@torch.no_grad()
def confident_share(model, dataset, threshold: float) -> tuple[float, float]:
    """The share of ``dataset``'s rows where ``model``'s top-class probability reaches ``threshold`` (the rows a
    thresholded consistency keeps), and the share of those it classifies right (the labels only measure)."""
    model.eval()
    pixels = torch.stack(list(dataset["pixel_values"])).to(next(model.parameters()).device)
    labels = torch.as_tensor(dataset["labels"][:]).to(pixels.device)
    top, predicted = model(pixel_values=pixels).logits.float().softmax(-1).max(-1)
    kept = top >= threshold
    right = (predicted[kept] == labels[kept]).float().mean().item() if kept.any() else float("nan")
    return kept.float().mean().item(), right


def run_seed(seed: int, options, recipe_module, scores: dict[str, list[float]]) -> None:
    folder = os.path.join(options.output_dir, f"seed{seed}")
    recipe, train, test = digits(recipe_module, os.path.join(options.output_dir, "data"), seed)
    test = rotated(test, options.angle)
    halves = train.train_test_split(test_size=0.5, stratify_by_column="labels", seed=seed)
    source, target = halves["train"], rotated(halves["test"], options.angle)
    unlabeled = target.with_format(None).map(lambda row: {"labels": -100}).with_format("torch")
    measured_on = target if options.validation else test  # the target rows' labels: measuring only
    mixed = concatenate_datasets([source, unlabeled]).shuffle(seed=seed)
    plain_args = DistillationConfig(
        output_dir=folder,
        max_steps=options.steps,
        seed=seed,
        temperature=1.0,
        hard_label_weight=1.0,  # CE + the ramped consistency, as in Tarvainen & Valpola and French et al.
        distillation_rampup_steps=options.steps // 3,
        **TRAINING,
    )

    def student():
        set_seed(seed)
        return recipe_module.vit(recipe, 32, 2, 10)

    def accuracy(model):
        return evaluate_model(model, measured_on, compute_metrics=classification_metrics, use_cpu=True)["accuracy"]

    def augmentation():
        return RandomAffine(options.affine_std, options.shift_pixels, options.augment_noise)

    record = recorder(scores, seed)

    if "source" in options.runs:
        record(
            "source only (upright labels)",
            accuracy(train_plainly(student(), plain_args, source, output_dir=f"{folder}/source")),
        )
    if "source_augmented" in options.runs:
        augment = augmentation()
        model = train_plainly(
            student(),
            plain_args,
            source,
            output_dir=f"{folder}/source_augmented",
            data_collator=lambda rows: augment(default_data_collator(rows)),
        )
        record("source only, French et al.'s augmentation", accuracy(model))
    if "mean_teacher" in options.runs:
        args = dataclasses.replace(plain_args, output_dir=f"{folder}/mean_teacher")
        trained, ema = mean_teacher(
            student(),
            args,
            ema_decay=options.decay,
            consistency_loss=f"{options.consistency}:{options.consistency_weight}",
            student_noise=GaussianNoise(options.noise) if options.noise else None,
            teacher_noise=GaussianNoise(options.noise) if options.noise else None,
            train_dataset=mixed,
        )
        record("mean teacher: the student", accuracy(trained.model))
        record("mean teacher: its EMA teacher", accuracy(ema.model))
    if "self_ensembling" in options.runs:
        # One run per candidate threshold; the one whose EMA teacher scores best on the target training rows (their
        # labels only measure) is the row: chosen on validation, never on the test split.
        candidates = []
        for threshold in options.confidence_threshold:
            losses = f"prob_mse:{options.se_weight}:confidence_threshold={threshold}"
            if options.class_balance:
                losses += f",class_balance:{options.class_balance}:confidence_threshold={threshold}"
            name = "self_ensembling" if len(options.confidence_threshold) == 1 else f"self_ensembling_{threshold:g}"
            args = dataclasses.replace(
                plain_args,
                output_dir=f"{folder}/{name}",
                distillation_rampup_steps=0,
                # Twice the rows: about a source-only batch of labeled rows plus as many target rows per step, as
                # French et al. draw a source and a target batch each step.
                per_device_train_batch_size=options.se_batch_rows * TRAINING["per_device_train_batch_size"],
            )
            trained, ema = mean_teacher(
                student(),
                args,
                ema_decay=options.decay,
                consistency_loss=losses,
                student_noise=augmentation(),
                teacher_noise=augmentation(),
                train_dataset=mixed,
            )
            kept, right = confident_share(ema.model, target, threshold)
            on_target = evaluate_model(ema.model, target, compute_metrics=classification_metrics, use_cpu=True)
            print(
                f"seed {seed}: threshold {threshold:g}: the EMA teacher reaches it on {kept:.1%} of the target rows "
                f"at the end ({right:.1%} of those right); target training rows: {on_target['accuracy']:.4f}",
                flush=True,
            )
            candidates.append((on_target["accuracy"], threshold, trained.model, ema.model))
        _, threshold, trained_model, ema_model = max(candidates, key=lambda candidate: candidate[0])
        if len(candidates) > 1:
            print(f"seed {seed}: threshold chosen on the target training rows: {threshold:g}", flush=True)
        record("self-ensembling (French et al.): the student", accuracy(trained_model))
        record("self-ensembling (French et al.): its EMA teacher", accuracy(ema_model))
    if "upper" in options.runs:
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
    parser.add_argument(
        "--confidence_threshold",
        type=float,
        nargs="+",
        default=[0.968],
        help="self_ensembling's threshold; several: one run each, the best on the target training rows is the row.",
    )
    parser.add_argument("--se_weight", type=float, default=3.0, help="self_ensembling's consistency weight.")
    parser.add_argument(
        "--se_batch_rows",
        type=int,
        default=2,
        help="self_ensembling's batch, in source-only batches (2: as many labeled rows per step as source only).",
    )
    parser.add_argument("--class_balance", type=float, default=0.005, help="self_ensembling's class balance weight.")
    parser.add_argument("--affine_std", type=float, default=0.1, help="The augmentation's affine-matrix std.")
    parser.add_argument("--shift_pixels", type=float, default=0.5, help="The augmentation's largest translation.")
    parser.add_argument("--augment_noise", type=float, default=0.1, help="The augmentation's Gaussian noise std.")
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS, help="Which rows to train.")
    parser.add_argument("--validation", action="store_true", help="Measure on the target training rows.")
    parser.add_argument("--output_dir", default="outputs/mean_teacher_digits")
    options = parser.parse_args()
    recipe_module = load_recipe("image_classification")
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, recipe_module, scores),
        lambda seeds: (
            f"digits → digits rotated {options.angle:g}°: 718 labeled upright + 719 unlabeled rotated "
            f"training images, 360 rotated test images, {options.steps} steps, decay {options.decay}, consistency "
            f"{options.consistency}:{options.consistency_weight:g}, noise {options.noise:g}; self-ensembling: "
            f"prob_mse:{options.se_weight:g} threshold {' / '.join(f'{t:g}' for t in options.confidence_threshold)}"
            f"{' (chosen per seed on the target training rows)' if len(options.confidence_threshold) > 1 else ''}, "
            "class_balance "
            f"{options.class_balance:g}, affine {options.affine_std:g}, shift {options.shift_pixels:g} px, noise "
            f"{options.augment_noise:g}; measured on the "
            f"{'target training rows (validation)' if options.validation else 'rotated test split'}; seeds {seeds}"
        ),
        "mean_teacher_digits",
    )


if __name__ == "__main__":
    main()
