"""Federated runs (hf_kd.federated) refused before round 1: the config, the shards and the parties' label sets are
checked in the driver, before Flower's simulation starts (none of these rows starts one)."""

from __future__ import annotations

import numpy as np
import torch
from conftest import tiny_bert
from datasets import Dataset
from refusal_cases import Case

from hf_kd.federated import (
    FederatedConfig,
    average_weights,
    class_count_weights,
    dirichlet_split,
    distil_on_public,
    run_federated,
)


def bert(seed: int, num_labels: int = 2, names: list[str] | None = None):
    model = tiny_bert(hidden=16, layers=1, num_labels=num_labels, seed=seed)
    if names is not None:
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: index for index, name in enumerate(names)}
    return model


def rows(count: int, labels: list[int] | None = None) -> Dataset:
    labels = labels if labels is not None else [index % 2 for index in range(count)]
    return Dataset.from_dict(
        {"input_ids": [[1, 2, 3]] * count, "attention_mask": [[1, 1, 1]] * count, "labels": labels}
    )


def federate(make_client, make_server=lambda: bert(0), shards=None, mode="feddf", **options):
    """One round of the smallest run; every row below is refused before it starts."""
    settings = dict(rounds=1, local_steps=1, server_steps=1, digest_steps=1, batch_size=2, **options)
    shards = shards if shards is not None else [rows(4), rows(4)]
    public = rows(4).remove_columns("labels")
    return run_federated(make_client, make_server, shards, public, FederatedConfig(mode=mode, **settings))


NAMES = ["negative", "positive"]


def permuted_label_maps(mode):
    return federate(lambda k: bert(k, names=NAMES if k == 0 else NAMES[::-1]), lambda: bert(0, names=NAMES), mode=mode)


CASES = [
    Case(
        "federated-label-maps-feddf",
        "FedDF clients whose `id2label` are permutations of each other",
        lambda p: permuted_label_maps("feddf"),
        ValueError,
        "client 1's id2label {0: 'positive', 1: 'negative'} differs from the server's",
    ),
    Case(
        "federated-label-maps-fedmd",
        "FedMD clients whose `id2label` are permutations of each other",
        lambda p: permuted_label_maps("fedmd"),
        ValueError,
        "client 1's id2label {0: 'positive', 1: 'negative'} differs from the server's",
    ),
    Case(
        "federated-fedmd-classes",
        "FedMD clients predicting 3 and 4 classes",
        lambda p: federate(lambda k: bert(k, num_labels=3 + k), lambda: bert(0, num_labels=3), mode="fedmd"),
        ValueError,
        "client 1 predicts 4 classes (config.num_labels) and the server 3",
    ),
    Case(
        "federated-shard-labels",
        "a client's shard labeled 0-4 for models of 2 classes",
        lambda p: federate(lambda k: bert(k), shards=[rows(4), rows(4, labels=[0, 1, 4, 1])]),
        ValueError,
        "client 1's shard has labels [4] outside the 2 classes",
    ),
    Case(
        "federated-empty-shard",
        "`run_federated` with a client whose shard has 0 rows",
        lambda p: federate(lambda k: bert(k), shards=[rows(4), rows(0)]),
        ValueError,
        "client 1's shard has 0 rows",
    ),
    Case(
        "federated-min-rows",
        "`dirichlet_split(..., min_rows=0)`",
        lambda p: dirichlet_split([0, 1] * 10, 2, alpha=1.0, min_rows=0),
        ValueError,
        "min_rows must be a whole number >= 1, got 0",
    ),
    Case(
        "federated-num-clients",
        "`dirichlet_split(..., num_clients=2.5)`",
        lambda p: dirichlet_split([0, 1] * 10, 2.5, alpha=1.0),
        ValueError,
        "num_clients must be a whole number >= 1, got 2.5",
    ),
    Case(
        "federated-temperature",
        "`FederatedConfig(temperature=0)`",
        lambda p: FederatedConfig(temperature=0),
        ValueError,
        "temperature must be a finite number > 0, got 0",
    ),
    Case(
        "federated-learning-rate",
        "`FederatedConfig(learning_rate=-1)`",
        lambda p: FederatedConfig(learning_rate=-1),
        ValueError,
        "learning_rate must be a finite number > 0, got -1",
    ),
    Case(
        "federated-cpus",
        "`FederatedConfig(num_cpus_per_client=0)`",
        lambda p: FederatedConfig(num_cpus_per_client=0),
        ValueError,
        "num_cpus_per_client must be a finite number > 0, got 0",
    ),
    Case(
        "federated-cpus-machine",
        "`FederatedConfig(num_cpus_per_client=10000)`",
        lambda p: FederatedConfig(num_cpus_per_client=10_000),
        ValueError,
        "num_cpus_per_client=10000 is more than this machine's",
    ),
    Case(
        "federated-rounds-fraction",
        "`FederatedConfig(rounds=2.5)`",
        lambda p: FederatedConfig(rounds=2.5),
        ValueError,
        "rounds must be a whole number >= 1, got 2.5",
    ),
    Case(
        "federated-average-no-rows",
        "`average_weights(states, sizes=[0, 0])`",
        lambda p: average_weights([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], [0, 0]),
        ValueError,
        "sizes [0, 0] sum to 0",
    ),
    Case(
        "federated-prediction-widths",
        "`distil_on_public` with clients' predictions over 3 and 4 classes",
        lambda p: distil_on_public(
            bert(0, num_labels=3),
            rows(4).remove_columns("labels"),
            [np.zeros((4, 3), np.float32), np.zeros((4, 4), np.float32)],
            1,
            FederatedConfig(batch_size=2),
            1e-3,
            0,
        ),
        ValueError,
        "client 1 sent predictions over 4 classes and client 0 over 3",
    ),
    Case(
        "federated-validation-fraction",
        "`FederatedConfig(server_validation_fraction=1.0)`",
        lambda p: FederatedConfig(server_validation_fraction=1.0),
        ValueError,
        "server_validation_fraction must be a number in [0, 1), got 1.0",
    ),
    Case(
        "federated-patience-without-validation",
        "`FederatedConfig(server_patience=3)` with no validation rows",
        lambda p: FederatedConfig(server_patience=3),
        ValueError,
        "server_patience=3 stops the server when its validation loss stops improving, but "
        "server_validation_fraction=0 holds out no public rows",
    ),
    Case(
        "federated-validation-never",
        "`FederatedConfig(server_steps=2, server_eval_steps=20, server_validation_fraction=0.2)`",
        lambda p: FederatedConfig(server_steps=2, server_eval_steps=20, server_validation_fraction=0.2),
        ValueError,
        "server_eval_steps=20 is more than server_steps=2: the server would hold out its validation rows and never "
        "validate",
    ),
    Case(
        "federated-distil-validation-never",
        "`distil_on_public(..., steps=2, validation_fraction=0.5)` with `server_eval_steps=10`",
        lambda p: distil_on_public(
            bert(0),
            rows(4).remove_columns("labels"),
            [np.zeros((4, 2), np.float32)],
            2,
            FederatedConfig(batch_size=2),
            1e-3,
            0,
            validation_fraction=0.5,
        ),
        ValueError,
        "server_eval_steps=10 is more than the 2 distillation steps",
    ),
    Case(
        "federated-validation-rows",
        "`run_federated` whose `server_validation_fraction=0.1` holds out none of 4 public rows",
        lambda p: run_federated(
            lambda k: bert(k),
            lambda: bert(0),
            [rows(4), rows(4)],
            rows(4).remove_columns("labels"),
            FederatedConfig(
                rounds=1,
                local_steps=1,
                server_steps=1,
                batch_size=2,
                server_validation_fraction=0.1,
                server_eval_steps=1,
            ),
        ),
        ValueError,
        "server_validation_fraction=0.1 of 4 public rows holds out 0",
    ),
    Case(
        "federated-ensemble-fedmd",
        "`run_federated(..., evaluate_ensemble=True)` in fedmd, whose clients send no weights",
        lambda p: run_federated(
            lambda k: bert(k),
            lambda: bert(0),
            [rows(4), rows(4)],
            rows(4).remove_columns("labels"),
            FederatedConfig(mode="fedmd", rounds=1, local_steps=1, server_steps=1, batch_size=2),
            evaluate=lambda model: {},
            evaluate_ensemble=True,
        ),
        ValueError,
        "evaluate_ensemble evaluates the clients' models, rebuilt from the weights they send, with evaluate",
    ),
    Case(
        "federated-ensemble-weighting",
        "`FederatedConfig(ensemble_weighting='by_size')`",
        lambda p: FederatedConfig(ensemble_weighting="by_size"),
        ValueError,
        "ensemble_weighting must be one of ('uniform', 'class_counts'), got 'by_size'",
    ),
    Case(
        "federated-ensemble-weighting-fedavg",
        "`FederatedConfig(mode='fedavg', ensemble_weighting='class_counts')`",
        lambda p: FederatedConfig(mode="fedavg", ensemble_weighting="class_counts"),
        ValueError,
        "ensemble_weighting='class_counts' weighs the clients' logits, which fedavg never combines",
    ),
    Case(
        "federated-class-counts-no-labels",
        "`run_federated` with `ensemble_weighting='class_counts'` and a shard without a label column",
        lambda p: federate(
            lambda k: bert(k),
            shards=[rows(4), rows(4).remove_columns("labels")],
            ensemble_weighting="class_counts",
        ),
        ValueError,
        "ensemble_weighting='class_counts' counts each client's rows per class, which needs an integer 'labels'",
    ),
    Case(
        "federated-class-weights-shape",
        "`distil_on_public(..., class_weights=)` of 3 clients' weights for 2 clients",
        lambda p: distil_on_public(
            bert(0),
            rows(4).remove_columns("labels"),
            [np.zeros((4, 2), np.float32)] * 2,
            1,
            FederatedConfig(batch_size=2),
            1e-3,
            0,
            class_weights=np.full((3, 2), 1 / 3, np.float32),
        ),
        ValueError,
        "class_weights has shape (3, 2); 2 clients' logits over 2 classes need (2, 2)",
    ),
    Case(
        "federated-class-counts-negative",
        "`class_count_weights([[1, -1]])`",
        lambda p: class_count_weights([[1, -1]]),
        ValueError,
        "class_counts must be K×C row counts >= 0, got [[1, -1]]",
    ),
]
