"""Deep mutual learning on real digits (scikit-learn's 8×8 images): 2 and 3 peers trained together vs the same
models trained independently, over several seeds.

Per seed, a held-out test split of 360 images; --num_labeled training labels (the rest of the training images
unlabeled, as in the image recipe). Peers are ViTs of the image recipe — 2×32, 1×16 and 2×32 again (another
initialisation) — each trained for the same steps with the same seed:

- independent: each peer alone on the labels (its CE only);
- DML, labels only: the first 2 (or all 3) peers together on the labels, CE + KL (τ = 1) towards the others;
- DML + unlabeled rows: the same on the labeled + unlabeled images (the KL terms read every row, CE the labeled).

Prints the test accuracy of every peer (mean ± std over seeds) and writes it to --output_dir/mutual_learning_digits.md.

    python benchmarks/mutual_learning_digits.py --seeds 0 1 2      # ~5 min per seed on 2 CPU cores
    python benchmarks/mutual_learning_digits.py --num_labeled 1437  # every training label (DML's own setting)
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from schemes_digits import TRAINING, digits, load_recipe, sweep
from transformers import set_seed

from hf_kd import DistillationConfig
from hf_kd.baselines import train_plainly
from hf_kd.data import split_labeled_transfer
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.schemes.mutual_learning import mutual_learning

PEERS = [("ViT 2×32", 32, 2), ("ViT 1×16", 16, 1), ("ViT 2×32 (b)", 32, 2)]


def run_seed(seed: int, options, recipe_module, scores: dict[str, list[float]]) -> None:
    folder = os.path.join(options.output_dir, f"seed{seed}")
    recipe, train, test = digits(recipe_module, os.path.join(options.output_dir, "data"), seed)
    labeled, transfer = split_labeled_transfer(train, options.num_labeled, seed=seed)
    labeled, transfer = labeled.with_format("torch"), transfer.with_format("torch")
    args = DistillationConfig(
        output_dir=folder, max_steps=options.steps, seed=seed, losses="kl", temperature=1.0, **TRAINING
    )

    def peer(k):
        _, hidden, layers = PEERS[k]
        set_seed(seed * 10 + k)
        return recipe_module.vit(recipe, hidden, layers, 10)

    def accuracy(model):
        return evaluate_model(model, test, compute_metrics=classification_metrics, use_cpu=True)["accuracy"]

    def record(name, value):
        scores.setdefault(name, []).append(value)
        print(f"seed {seed}: {name}: {value:.4f}", flush=True)

    for k, (name, _, _) in enumerate(PEERS):
        record(f"independent: {name}", accuracy(train_plainly(peer(k), args, labeled, output_dir=f"{folder}/alone{k}")))
    for count in (2, 3):
        variants = [(labeled, "labels only"), (transfer, "+ unlabeled rows")]
        for data, what in variants[: 1 if len(transfer) == len(labeled) else 2]:  # every label given: no unlabeled
            run_args = dataclasses.replace(args, output_dir=f"{folder}/dml{count}-{what.split()[0]}")
            stages = mutual_learning([peer(k) for k in range(count)], run_args, train_dataset=data)
            for k, stage in enumerate(stages):
                record(f"DML {count} peers, {what}: {PEERS[k][0]}", accuracy(stage.model))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_labeled", type=int, default=100)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--output_dir", default="outputs/mutual_learning_digits")
    options = parser.parse_args()
    recipe_module = load_recipe("image_classification")
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, recipe_module, scores),
        lambda seeds: (
            f"digits, held-out 20% (360 images), {options.num_labeled} labels (+ the other training images "
            f"unlabeled where said), {options.steps} steps per run, seeds {seeds}"
        ),
        "mutual_learning_digits",
    )


if __name__ == "__main__":
    main()
