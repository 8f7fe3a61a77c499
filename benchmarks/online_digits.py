"""The online schemes on real digits (scikit-learn's 8×8 images), over several seeds: deep mutual learning (``dml``)
and self-distillation through early exits (``byot``).

Per seed, a held-out test split of 360 images and --num_labeled training labels (the other training images
unlabeled, as in the image recipe; 1437 gives every label). Every run takes the same steps and seed.

- ``dml``: ViT peers of the image recipe — 2×32, 1×16 and 2×32 again (another initialisation). Each peer alone on
  the labels (its CE only) vs 2 (and 3) peers together, CE + KL (τ = 1) towards the others, on the labels only
  and, when some rows are unlabeled, on labeled + unlabeled images (the KL terms read every row, CE the labeled).
- ``byot``: a ViT 4×32 with exits after blocks 1, 2 and 3, every member on its CE. Exits on the labels alone (KL
  weight 0) vs self-distilled from the model's own head (KL at τ = 3 with weight 0.3 or 1, and a feature hint of
  weight 0.1): each exit's test accuracy and milliseconds per example (the model stopped at the exit's block), and
  the anytime rule at confidence 0.9.

Prints the test accuracies (mean ± std over seeds) and writes them to --output_dir/online_digits.md.

    python benchmarks/online_digits.py --parts dml --seeds 0 1 2                      # ~4 min per seed
    python benchmarks/online_digits.py --parts dml --num_labeled 1437 --seeds 0 1 2   # every label (DML's setting)
    python benchmarks/online_digits.py --parts byot --num_labeled 1437 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from schemes_digits import TRAINING, digits, load_recipe, recorder, sweep
from transformers import set_seed

from hf_kd import DistillationConfig
from hf_kd.data import split_labeled_transfer
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.recipe_support.baselines import train_plainly
from hf_kd.schemes.mutual_learning import mutual_learning
from hf_kd.schemes.self_distillation import exit_report, self_distillation

PEERS = [("ViT 2×32", 32, 2), ("ViT 1×16", 16, 1), ("ViT 2×32 (b)", 32, 2)]

# (row label, KL weight at τ = 3, hint weight): the exits on their labels alone, then self-distilled
BYOT_VARIANTS = [("exits on labels only", 0.0, 0.0), ("KL 0.3 + hint 0.1", 0.3, 0.1), ("KL 1 + hint 0.1", 1.0, 0.1)]


def run_seed(seed: int, options, recipe_module, scores: dict[str, list[float]]) -> None:
    folder = os.path.join(options.output_dir, f"seed{seed}")
    recipe, train, test = digits(recipe_module, os.path.join(options.output_dir, "data"), seed)
    labeled, transfer = split_labeled_transfer(train, options.num_labeled, seed=seed)
    labeled, transfer = labeled.with_format("torch"), transfer.with_format("torch")
    args = DistillationConfig(
        output_dir=folder,
        max_steps=options.steps,
        seed=seed,
        losses="kl",
        temperature=1.0,
        hard_label_weight=1.0,  # each peer's CE + KL, as in Zhang et al.'s DML
        **TRAINING,
    )

    def vit(hidden, layers, init_seed):
        set_seed(init_seed)
        return recipe_module.vit(recipe, hidden, layers, 10)

    def accuracy(model):
        return evaluate_model(model, test, compute_metrics=classification_metrics, use_cpu=True)["accuracy"]

    record = recorder(scores, seed)

    if "dml" in options.parts:
        for k, (name, hidden, layers) in enumerate(PEERS):
            alone = train_plainly(vit(hidden, layers, seed * 10 + k), args, labeled, output_dir=f"{folder}/alone{k}")
            record(f"independent: {name}", accuracy(alone))
        for count in (2, 3):
            variants = [(labeled, "labels only"), (transfer, "+ unlabeled rows")]
            for data, what in variants[: 1 if len(transfer) == len(labeled) else 2]:  # every label: no unlabeled
                run_args = dataclasses.replace(args, output_dir=f"{folder}/dml{count}-{what.split()[0]}")
                peers = [vit(hidden, layers, seed * 10 + k) for k, (_, hidden, layers) in enumerate(PEERS[:count])]
                for k, stage in enumerate(mutual_learning(peers, run_args, train_dataset=data)):
                    record(f"DML {count} peers, {what}: {PEERS[k][0]}", accuracy(stage.model))
    if "byot" in options.parts:
        for label, weight, hint in BYOT_VARIANTS:
            run_args = dataclasses.replace(
                args, output_dir=f"{folder}/byot-{weight:g}-{hint:g}", temperature=3.0, losses=f"kl:{weight}"
            )
            trainer = self_distillation(
                vit(32, 4, seed), run_args, exits_after=[1, 2, 3], hint_weight=hint, train_dataset=labeled
            )
            rows = exit_report(trainer.early_exit_model, test, batch_size=256, thresholds=(0.9,))
            for member, row in rows.items():
                record(f"BYOT ViT 4×32, {label}: {member}", row["accuracy"])
                record(f"BYOT ViT 4×32, {label}: {member}: ms per example", row["ms_per_example"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_labeled", type=int, default=100)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--parts", nargs="+", default=["dml", "byot"], choices=["dml", "byot"])
    parser.add_argument("--output_dir", default="outputs/online_digits")
    options = parser.parse_args()
    recipe_module = load_recipe("image_classification")
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, recipe_module, scores),
        lambda seeds: (
            f"digits, held-out 20% (360 images), {options.num_labeled} labels (+ the other training images "
            f"unlabeled where said), {options.steps} steps per run, seeds {seeds}"
        ),
        "online_digits",
    )


if __name__ == "__main__":
    main()
