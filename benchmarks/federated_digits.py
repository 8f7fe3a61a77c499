"""FedDF against FedAvg on skewed digits over seeds, with Lin et al. 2020's server set-up (issue 29 item 3).

Per seed, one split for every row: 360 test images (20%), of the other 1,437 a --public_fraction share is the
unlabeled public set (FedAvg never reads it), the rest is dealt to --num_clients clients by a Dirichlet(α) split over
labels (--alphas). The recipe's ResNet (width 16, 20k parameters) everywhere; --rounds rounds of --local_steps local
steps (batch 32, lr 5e-3) on Flower's simulation (hf_kd.federated.run_federated). Rows (--runs):

- ``fedavg``: the clients' weights averaged (McMahan et al. 2017);
- ``feddf``: FedAvg, then the server distils the averaged model from the clients' mean logits (AVGLOGITS) on the
  public rows, as Lin et al. do: Adam at --server_learning_rate (1e-3), temperature --temperature (1), up to
  --server_steps steps, validated every --server_eval_steps steps on a held-out --server_validation_fraction of the
  public rows (the KL from the ensemble to the server: no labels), the best checkpoint kept, stopped after
  --server_patience validations without improvement. Also measured: the clients' ensemble itself (the teacher the
  server distils from; ``feddf: clients' ensemble``) and the server steps each round ran;
- ``feddf_class_counts``: ``feddf`` with the class-level ensemble (Zhang et al. 2022): each client's logit of a
  class weighted by its share of that class's training rows (``ensemble_weighting="class_counts"``), so that under
  skew a client that never saw a class has no say on it;
- ``feddf_recipe``: FedDF as ``recipes/configs/federated.yaml`` runs it (50 server steps per round at lr 5e-3, τ 2, no
  validation), on the same split.

Prints each seed's final-round test accuracy (and its mean over the rounds, the area under the curve: Lin et al.
also claim fewer rounds) and the mean ± std per row; writes OUTPUT_DIR/federated_digits.md
(.json, .png). Run single-threaded (the models are tiny; Ray's clients run beside each other):

    OMP_NUM_THREADS=1 python benchmarks/federated_digits.py --seeds 0 1 2 --alphas 0.1 1.0   # ~25 min, 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import numpy as np
import torch
from schemes_digits import load_recipe, recorder, sweep
from transformers import ResNetConfig, ResNetForImageClassification, set_seed
from transformers.utils import logging as transformers_logging

from hf_kd.federated import FederatedConfig, dirichlet_split, predict, run_federated

RUNS = ["fedavg", "feddf", "feddf_class_counts", "feddf_recipe"]
ENSEMBLE_RUNS = ("feddf", "feddf_class_counts")  # the runs whose teacher, the clients' ensemble, is also scored


def resnet(width: int, seed: int) -> ResNetForImageClassification:
    """The recipe's ResNet (``recipes/federated.py``), defined here: Ray's client processes unpickle the model
    builder, and a function of this script travels by value where one of the recipe module would not import."""
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=1,
        embedding_size=width,
        hidden_sizes=[width, 2 * width],
        depths=[1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=10,
    )
    return ResNetForImageClassification(config)


def run_seed(seed: int, options, recipe, scores: dict[str, list[float]], steps_run: dict[str, list[float]]) -> None:
    record = recorder(scores, seed)
    set_seed(seed)
    dataset = recipe.load_digits_dataset(os.path.join(options.output_dir, "data"))
    split = dataset.train_test_split(test_size=0.2, seed=seed)
    test = split["test"].with_format("torch")
    rest = split["train"].train_test_split(test_size=options.public_fraction, seed=seed)
    private, public = rest["train"], rest["test"].remove_columns("labels").with_format("torch")
    labels = np.asarray(test["labels"])

    def accuracy(model) -> dict:
        return {"accuracy": float((predict(model, test).argmax(-1) == labels).mean())}

    base = FederatedConfig(
        rounds=options.rounds,
        local_steps=options.local_steps,
        batch_size=32,
        learning_rate=5e-3,
        seed=seed,
        num_cpus_per_client=1.0,
    )
    configs = {
        "fedavg": dataclasses.replace(base, mode="fedavg", server_steps=0),
        "feddf": dataclasses.replace(
            base,
            mode="feddf",
            server_steps=options.server_steps,
            server_learning_rate=options.server_learning_rate,
            temperature=options.temperature,
            server_validation_fraction=options.server_validation_fraction,
            server_eval_steps=options.server_eval_steps,
            server_patience=options.server_patience,
        ),
        "feddf_recipe": dataclasses.replace(
            base, mode="feddf", server_steps=50, server_learning_rate=5e-3, temperature=2.0
        ),
    }
    configs["feddf_class_counts"] = dataclasses.replace(configs["feddf"], ensemble_weighting="class_counts")
    for alpha in options.alphas:
        shards = dirichlet_split(np.asarray(private["labels"]), options.num_clients, alpha, seed=seed)
        shards = [private.select(shard).with_format("torch") for shard in shards]
        for run in options.runs:
            config = configs[run]
            result = run_federated(
                lambda client: resnet(16, seed=seed + client),
                lambda: resnet(16, seed=seed),
                shards,
                public,
                config,
                evaluate=accuracy,
                evaluate_ensemble=run in ENSEMBLE_RUNS,
            )
            last, curve = result.history[-1], [entry["accuracy"] for entry in result.history]
            record(f"α={alpha:g}: {run}", last["accuracy"])
            # Lin et al.'s other claim: fewer rounds. The mean over the rounds is the area under the curve.
            record(f"α={alpha:g}: {run}: mean over the rounds", float(np.mean(curve)))
            if run in ENSEMBLE_RUNS:
                record(f"α={alpha:g}: {run}: clients' ensemble", last["ensemble_accuracy"])
                if "server_steps_run" in last:
                    per_round = [entry["server_steps_run"] for entry in result.history]
                    best = [entry["server_best_step"] for entry in result.history]
                    steps_run.setdefault(f"α={alpha:g}: {run}", []).extend(per_round)
                    print(f"seed {seed}: α={alpha:g}: {run} server steps run per round {per_round}, best {best}")
            reached = next((index + 1 for index, value in enumerate(curve) if value >= 0.8), None)
            print(
                f"seed {seed}: α={alpha:g}: {run}: accuracy per round {[round(value, 3) for value in curve]}, "
                f"rounds to 80%: {reached if reached is not None else f'>{len(curve)}'}",
                flush=True,
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    parser.add_argument("--num_clients", type=int, default=5)
    parser.add_argument("--public_fraction", type=float, default=0.5, help="Of the 1,437 non-test images.")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local_steps", type=int, default=20)
    parser.add_argument("--server_steps", type=int, default=500, help="feddf: the most server steps per round.")
    parser.add_argument("--server_learning_rate", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--server_validation_fraction", type=float, default=0.2)
    parser.add_argument("--server_eval_steps", type=int, default=20)
    parser.add_argument("--server_patience", type=int, default=5)
    parser.add_argument("--output_dir", default="outputs/federated_digits")
    options = parser.parse_args()
    transformers_logging.disable_progress_bar()  # a checkpoint per server validation: no bar for each
    recipe = load_recipe("federated")
    steps_run: dict[str, list[float]] = {}

    def title(seeds):
        public = round(1437 * options.public_fraction)
        return (
            f"digits, {options.num_clients} clients (Dirichlet split), {public} unlabeled public images (FedDF "
            f"validates on {options.server_validation_fraction:.0%} of them), 360 test images; {options.rounds} "
            f"rounds × {options.local_steps} local steps; FedDF server: Adam lr {options.server_learning_rate:g}, "
            f"τ {options.temperature:g}, up to {options.server_steps} steps, patience {options.server_patience} × "
            f"{options.server_eval_steps} steps; final-round test accuracy; seeds {seeds}"
        )

    sweep(options, lambda seed, scores: run_seed(seed, options, recipe, scores, steps_run), title, "federated_digits")
    for alpha, values in steps_run.items():
        spread = f"{min(values)}-{max(values)}"
        print(f"{alpha}: server steps per round: mean {statistics.mean(values):.0f}, range {spread}")


if __name__ == "__main__":
    main()
