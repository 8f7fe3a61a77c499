"""Federated distillation on Flower: clients with private non-IID shards of scikit-learn's digits, a server that
learns from what their models predict on an unlabeled public set.

The digits (1,797 8×8 images) are exported once to a local JSON file and read back with load_dataset, then split:
a held-out test set (the server's evaluation), an unlabeled public set every party may read (--public_fraction of the
rest; FedAvg never reads it), and the rest shared among --num_clients clients by a Dirichlet(α) split over labels
(--alphas: small α, each client sees few digits). The models are small transformers ResNets built from configs. For
every α the script runs, side by side with the same seed: each client alone (local only), FedAvg, FedDF, FedMD (with
--heterogeneous, clients of different widths) and centralised training on every client's rows, and prints (and saves
to OUTPUT_DIR/results.md) the server's test accuracy after the last round, its best, and the rounds it took to reach
--target_accuracy. benchmarks/federated_digits.py compares FedAvg and FedDF over seeds.

    pip install "hf_kd[federated]"       # Flower's simulation (included in `make install`)
    python recipes/federated.py --config recipes/configs/federated.yaml                        # ~10 min, 2 cores
    python recipes/federated.py --config recipes/configs/federated.yaml --modes feddf --alphas 0.1 --rounds 20
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import load_dataset
from transformers import ResNetConfig, ResNetForImageClassification, set_seed

from hf_kd.evaluation import count_parameters, draw
from hf_kd.federated import MODES, FederatedConfig, dirichlet_split, predict, run_federated, train_locally
from hf_kd.plots import plot_series
from hf_kd.recipe_support.cli import parse_args
from hf_kd.recipe_support.tables import report_results


@dataclass
class FederatedRecipeArguments:
    output_dir: str = field(default="outputs/federated", metadata={"help": "Where the data and results go."})
    modes: str = field(default="fedavg,feddf,fedmd", metadata={"help": f"Comma-separated, of {MODES}."})
    alphas: str = field(default="0.1,1.0", metadata={"help": "Dirichlet α of the client split, one run per α."})
    num_clients: int = 5
    test_fraction: float = 0.2
    public_fraction: float = field(default=0.2, metadata={"help": "Of the non-test rows: the unlabeled public set."})
    width: int = field(default=16, metadata={"help": "The ResNets' first stage width (the server's and clients')."})
    heterogeneous: bool = field(default=True, metadata={"help": "fedmd: clients of different widths and depths."})
    target_accuracy: float = 0.8
    baselines: bool = field(default=True, metadata={"help": "Also run local-only and centralised training."})


def load_digits_dataset(cache_dir: str):
    path = os.path.join(cache_dir, "digits.jsonl")
    if not os.path.exists(path):
        from sklearn.datasets import load_digits

        digits = load_digits()
        os.makedirs(cache_dir, exist_ok=True)
        with open(path, "w") as handle:
            for pixels, label in zip(digits.data, digits.target):
                handle.write(json.dumps({"pixels": pixels.astype(int).tolist(), "labels": int(label)}) + "\n")
    dataset = load_dataset("json", data_files=path, split="train")

    def preprocess(batch):
        pixels = np.asarray(batch["pixels"], dtype=np.float32) / 16.0
        return {"pixel_values": ((pixels - 0.5) / 0.5).reshape(-1, 1, 8, 8)}

    return dataset.map(preprocess, batched=True, remove_columns=["pixels"])


def resnet(width: int, depth: int = 1, seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=1,
        embedding_size=width,
        hidden_sizes=[width, 2 * width],
        depths=[depth, depth],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=10,
    )
    return ResNetForImageClassification(config)


def main():
    recipe, config = parse_args((FederatedRecipeArguments, FederatedConfig))
    modes = [mode for mode in recipe.modes.split(",") if mode]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {MODES}.")
    try:
        alphas = [float(alpha) for alpha in recipe.alphas.split(",") if alpha]
    except ValueError:
        raise SystemExit(
            f"--alphas: {recipe.alphas!r} is not a comma-separated list of numbers (e.g. 0.1,1.0)."
        ) from None
    if not alphas:
        raise SystemExit("--alphas is empty: give at least one Dirichlet α (e.g. 0.1,1.0).")
    set_seed(config.seed)
    dataset = load_digits_dataset(os.path.join(recipe.output_dir, "data"))
    split = dataset.train_test_split(test_size=recipe.test_fraction, stratify_by_column=None, seed=config.seed)
    test = split["test"].with_format("torch")
    rest = split["train"].train_test_split(test_size=recipe.public_fraction, seed=config.seed)
    private, public = rest["train"], rest["test"].remove_columns("labels").with_format("torch")

    def accuracy(model) -> float:
        logits = predict(model, test)
        return float((logits.argmax(-1) == np.asarray(test["labels"])).mean())

    # fedmd clients may differ in architecture; fedavg/feddf need the server's.
    shapes = [(recipe.width, 1), (recipe.width // 2, 1), (recipe.width, 2), (2 * recipe.width, 1)]

    def client_shape(client: int, mode: str) -> tuple[int, int]:
        return shapes[client % len(shapes)] if mode == "fedmd" and recipe.heterogeneous else (recipe.width, 1)

    # Every α's split first: a split that cannot be made is refused before anything trains.
    labels = np.asarray(private["labels"])
    splits = {alpha: dirichlet_split(labels, recipe.num_clients, alpha, seed=config.seed) for alpha in alphas}
    rows, curves = {}, {}
    total_steps = config.rounds * config.local_steps
    for alpha in alphas:
        shards = [private.select(shard).with_format("torch") for shard in splits[alpha]]
        if recipe.baselines:
            start = time.perf_counter()
            alone = []
            for client, shard in enumerate(shards):
                model = resnet(recipe.width, seed=config.seed + client)
                alone.append(accuracy(train_locally(model, shard, total_steps, config, config.seed + client)))
            rows[f"α={alpha:g}: each client alone (mean of {len(shards)})"] = {
                "accuracy": float(np.mean(alone)),
                "accuracy_best": float(np.max(alone)),
                "seconds": time.perf_counter() - start,
            }
        for mode in modes:
            # FedAvg combines no logits: the ensemble weighting applies to the distilling modes only.
            weighting = config.ensemble_weighting if mode != "fedavg" else "uniform"
            run_config = dataclasses.replace(config, mode=mode, ensemble_weighting=weighting)
            start = time.perf_counter()
            result = run_federated(
                lambda client, mode=mode: resnet(*client_shape(client, mode), seed=config.seed + client),
                lambda: resnet(recipe.width, seed=config.seed),
                shards,
                public,
                run_config,
                evaluate=lambda model: {"accuracy": accuracy(model)},
            )
            scores = [entry["accuracy"] for entry in result.history]
            reached = next((r + 1 for r, score in enumerate(scores) if score >= recipe.target_accuracy), None)
            rows[f"α={alpha:g}: {mode}"] = {
                "accuracy": scores[-1],
                "accuracy_best": max(scores),
                "rounds_to_target": reached if reached is not None else f">{config.rounds}",
                "seconds": time.perf_counter() - start,
            }
            curves[f"{alpha:g}/{mode}"] = scores
    if recipe.baselines:
        start = time.perf_counter()
        central = resnet(recipe.width, seed=config.seed)
        train_locally(central, private.with_format("torch"), total_steps, config, config.seed)
        rows["centralised (every client's rows in one place)"] = {
            "accuracy": accuracy(central),
            "accuracy_best": accuracy(central),
            "seconds": time.perf_counter() - start,
        }
    size = count_parameters(resnet(recipe.width))
    validation = (
        f" at most (validated every {config.server_eval_steps} on {config.server_validation_fraction:.0%} of the "
        f"public rows, best kept, patience {config.server_patience})"
        if config.server_validation_fraction
        else ""
    )
    title = (
        f"digits, {recipe.num_clients} clients (Dirichlet split), {len(public)} unlabeled public rows, {len(test)} "
        f"test rows; {config.rounds} rounds × {config.local_steps} local steps, server {config.server_steps} "
        f"distillation steps per round{validation}, ResNet width {recipe.width} ({size / 1e3:.0f}k "
        f"parameters), seed {config.seed}; rounds_to_target: server accuracy ≥ {recipe.target_accuracy:.0%}"
    )
    os.makedirs(recipe.output_dir, exist_ok=True)
    report_results(rows, ["accuracy", "accuracy_best", "rounds_to_target", "seconds"], title, recipe.output_dir)
    with open(os.path.join(recipe.output_dir, "curves.json"), "w") as handle:
        json.dump(curves, handle, indent=2)
    # The server's test accuracy round by round, one line per α and mode (results.png / .svg).
    draw(plot_series, curves, os.path.join(recipe.output_dir, "results"), xlabel="round", ylabel="server accuracy")


if __name__ == "__main__":
    main()
