"""Federated distillation on Flower: clients keep their data; a server model learns from what the clients' models
predict.

Each client trains a transformers model on its private shard (:func:`dirichlet_split` makes non-IID shards). Per
round, by ``mode``:

- ``fedavg`` (McMahan et al. 2017): clients send their weights; the server's model is their average, weighted by
  shard size.
- ``feddf`` (Lin et al. 2020, *Ensemble Distillation for Robust Model Fusion in Federated Learning*): FedAvg, then
  the server distils the averaged model on an unlabeled **public** set from the ensemble of the clients' predictions
  on it (mean logits) — a multi-teacher :class:`~hf_kd.DistillationTrainer` run whose teachers are the clients'
  predictions (:func:`distil_on_public`).
- ``fedmd`` (Li & Wang 2019, *FedMD: Heterogenous Federated Learning via Model Distillation*): no weights cross the
  wire, so clients may differ in architecture. Clients send predictions on the public set; the server averages them
  into a consensus, distils its own student from it, and sends the consensus back; each client *digests* it
  (distils towards it on the public set) before training on its shard again. (The paper also starts with transfer
  learning on a labeled public set; the public set here is unlabeled.)

Only model weights (``fedavg``/``feddf``), predictions on the public set and the consensus cross the wire — never a
client's rows or labels; every message can be recorded (``wire_log``) to check that. Flower's ``ClientApp`` and
``ServerApp`` run in-process through ``flwr.simulation.run_simulation`` (``pip install "hf_kd[federated]"``).
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainingArguments

from .config import DistillationConfig
from .model_kinds import base_model, num_classes
from .teachers import PrecomputedPredictions

MODES = ("fedavg", "feddf", "fedmd")
ENSEMBLE_WEIGHTINGS = ("uniform", "class_counts")
WEIGHTS, PUBLIC_LOGITS, CONSENSUS, SETTINGS, REPORT = "weights", "public_logits", "consensus", "settings", "report"


def _whole_number(name: str, value, minimum: int, advice: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}; {advice}")


def _positive_number(name: str, value, advice: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}; {advice}")


def dirichlet_split(labels, num_clients: int, alpha: float, seed: int = 0, min_rows: int = 2) -> list[list[int]]:
    """Row indices of ``num_clients`` non-IID shards.

    Each class's rows are divided among the clients in proportions drawn from Dirichlet(α) (Hsu et al. 2019) —
    small α gives each client few classes, large α near-IID shards. Draws again until every client holds at least
    ``min_rows`` rows.

    Args:
        labels: One class label per row.
        num_clients: The number of shards, >= 1.
        alpha: α > 0, the Dirichlet concentration.
        seed: Seeds the draws.
        min_rows: The fewest rows a client may get, >= 1 (a client without rows cannot train).

    Returns:
        One sorted list of row indices per client.

    Raises:
        ValueError: a bad count or α, labels that are not 1-D, too few rows, or no draw in 1000 that gives every
            client ``min_rows`` rows.
    """
    labels = np.asarray(labels)
    _whole_number("num_clients", num_clients, 1, "one shard per client.")
    _whole_number("min_rows", min_rows, 1, "a client with no rows has nothing to train on.")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be > 0 and finite (small: non-IID, large: IID, e.g. 0.1 or 1.0), got {alpha!r}.")
    if labels.ndim != 1:
        raise ValueError(f"labels must be one label per row (1-D), got an array of shape {labels.shape}.")
    if len(labels) < num_clients * min_rows:
        raise ValueError(f"{len(labels)} rows cannot give {num_clients} clients {min_rows} rows each.")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(rows)).astype(int)[:-1]
            for client, part in enumerate(np.split(rows, cuts)):
                shards[client].extend(part.tolist())
        if min(len(shard) for shard in shards) >= min_rows:
            return [sorted(shard) for shard in shards]
    raise ValueError(f"no Dirichlet(α={alpha}) draw gave every one of {num_clients} clients {min_rows} rows: raise α.")


@dataclass
class FederatedConfig:
    """A federated run: per round, each client trains ``local_steps`` on its shard (in fedmd after ``digest_steps``
    towards the consensus), and the server distils ``server_steps`` on the public set (feddf, fedmd). Every field
    is checked here, so a bad value is refused before any training.

    Args:
        mode: One of fedavg, feddf and fedmd.
        rounds: Federated rounds.
        local_steps: A client's optimiser steps on its shard per round.
        server_steps: The server's distillation steps on the public set per round (feddf, fedmd).
        digest_steps: fedmd: a client's steps towards the consensus before its local training.
        batch_size: Rows per step, for the clients and the server.
        learning_rate: The clients' learning rate.
        server_learning_rate: The server's learning rate of distillation.
        temperature: Softmax temperature of the distillation (server and digest); 1: none.
        server_validation_fraction: Share of the public rows held out to validate the server's distillation (KL
            to the clients' ensemble) and keep its best checkpoint; 0: none. Lin et al. 2020 early-stop the server
            on held-out data: every ``server_eval_steps`` the distillation loss on these rows (the KL from the
            clients' mean-logit ensemble to the server, which needs no labels) is measured and the server keeps its
            best checkpoint (``load_best_model_at_end``); the same rows (drawn with ``seed``) every round. 0: the
            server distils every ``server_steps`` on every row.
        server_eval_steps: With validation: server steps between validations.
        server_patience: With validation: stop after this many validations without improvement; 0: never
            (transformers' ``EarlyStoppingCallback``; 0 runs every ``server_steps`` and keeps the best).
        ensemble_weighting: How the server combines the clients' logits (feddf, fedmd): uniform (their mean: Lin et
            al.'s AVGLOGITS) or class_counts (class by class, each client's logit weighted by its share of that
            class's training rows, Zhang et al. 2022's class-level ensemble: a client that never saw a class has no
            say on it; clients then also send their rows per class).
        seed: Seed of every party's training.
        num_cpus_per_client: Ray resources of one client; clients run in parallel up to the machine's cores.

    Raises:
        ValueError: a field out of its range (an unknown mode, a count that is not a whole number >= 1 or >= 0, a
            rate or temperature that is not a finite number > 0, more CPUs per client than the machine has, fedmd
            without server steps, a validation share outside [0, 1), a patience without validation rows, validation
            less often than once in ``server_steps``, an unknown ``ensemble_weighting`` or a non-uniform one in
            fedavg).
    """

    mode: str = field(default="feddf", metadata={"help": "One of fedavg, feddf and fedmd."})
    rounds: int = field(default=5, metadata={"help": "Federated rounds."})
    local_steps: int = field(default=50, metadata={"help": "A client's optimiser steps on its shard per round."})
    server_steps: int = field(
        default=100, metadata={"help": "The server's distillation steps on the public set per round (feddf, fedmd)."}
    )
    digest_steps: int = field(
        default=50, metadata={"help": "fedmd: a client's steps towards the consensus before its local training."}
    )
    batch_size: int = field(default=32, metadata={"help": "Rows per step, for the clients and the server."})
    learning_rate: float = field(default=1e-3, metadata={"help": "The clients' learning rate."})
    server_learning_rate: float = field(default=1e-3, metadata={"help": "The server's learning rate of distillation."})
    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the distillation (server and digest); 1: none."}
    )
    server_validation_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of the public rows held out to validate the server's distillation (KL to the clients' "
            "ensemble) and keep its best checkpoint; 0: none. Lin et al. 2020 early-stop the server on held-out "
            "data: every ``server_eval_steps`` the distillation loss on these rows (the KL from the clients' "
            "mean-logit ensemble to the server, which needs no labels) is measured and the server keeps its best "
            "checkpoint (``load_best_model_at_end``); the same rows (drawn with ``seed``) every round. 0: the "
            "server distils every ``server_steps`` on every row."
        },
    )
    server_eval_steps: int = field(default=10, metadata={"help": "With validation: server steps between validations."})
    server_patience: int = field(
        default=0,
        metadata={
            "help": "With validation: stop after this many validations without improvement; 0: never "
            "(transformers' ``EarlyStoppingCallback``; 0 runs every ``server_steps`` and keeps the best)."
        },
    )
    ensemble_weighting: str = field(
        default="uniform",
        metadata={
            "help": "How the server combines the clients' logits (feddf, fedmd): uniform (their mean: Lin et al.'s "
            "AVGLOGITS) or class_counts (class by class, each client's logit weighted by its share of that class's "
            "training rows, Zhang et al. 2022's class-level ensemble: a client that never saw a class has no say on "
            "it; clients then also send their rows per class).",
            "choices": list(ENSEMBLE_WEIGHTINGS),
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of every party's training."})
    num_cpus_per_client: float = field(
        default=1.0,
        metadata={"help": "Ray resources of one client; clients run in parallel up to the machine's cores."},
    )

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        for name in ("rounds", "local_steps", "batch_size"):
            _whole_number(name, getattr(self, name), 1, "set it to a positive whole number.")
        for name in ("server_steps", "digest_steps"):
            _whole_number(name, getattr(self, name), 0, "0 skips the step.")
        _whole_number("seed", self.seed, 0, "any whole number >= 0 seeds the run.")
        _whole_number("server_eval_steps", self.server_eval_steps, 1, "server steps between two validations.")
        _whole_number("server_patience", self.server_patience, 0, "0 never stops early.")
        fraction = self.server_validation_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction < 1:
            raise ValueError(
                f"server_validation_fraction must be a number in [0, 1), got {fraction!r}: the share of the public "
                "rows held out to validate the server (e.g. 0.2); 0 holds out none."
            )
        if fraction and 0 < self.server_steps < self.server_eval_steps:
            raise ValueError(
                f"server_eval_steps={self.server_eval_steps} is more than server_steps={self.server_steps}: the "
                "server would hold out its validation rows and never validate. Set server_eval_steps <= "
                "server_steps, or server_validation_fraction=0."
            )
        if self.server_patience and not fraction:
            raise ValueError(
                f"server_patience={self.server_patience} stops the server when its validation loss stops improving, "
                "but server_validation_fraction=0 holds out no public rows to validate on: set "
                "server_validation_fraction > 0 (e.g. 0.2) or server_patience=0."
            )
        for name in ("learning_rate", "server_learning_rate"):
            _positive_number(name, getattr(self, name), "a step size such as 1e-3.")
        _positive_number("temperature", self.temperature, "1.0 means no softening.")
        _positive_number("num_cpus_per_client", self.num_cpus_per_client, "e.g. 1 (fractions share a core).")
        cores = _ray_cpus()
        if self.num_cpus_per_client > cores:
            raise ValueError(
                f"num_cpus_per_client={self.num_cpus_per_client:g} is more than this machine's {cores} cores, which "
                f"is all the simulation gets: Ray could never start a client. Set num_cpus_per_client <= {cores}."
            )
        if self.ensemble_weighting not in ENSEMBLE_WEIGHTINGS:
            raise ValueError(
                f"ensemble_weighting must be one of {ENSEMBLE_WEIGHTINGS}, got {self.ensemble_weighting!r}."
            )
        if self.ensemble_weighting != "uniform" and self.mode == "fedavg":
            raise ValueError(
                f"ensemble_weighting={self.ensemble_weighting!r} weighs the clients' logits, which fedavg never "
                "combines (it averages weights): use mode='feddf' or 'fedmd', or ensemble_weighting='uniform'."
            )
        if self.mode == "fedmd" and self.server_steps == 0:
            raise ValueError("fedmd has no server weights but its distilled student: server_steps must be >= 1.")


def _ray_cpus() -> int:
    """The cores the simulation gives Ray: all of the machine's."""
    return max(os.cpu_count() or 1, 1)


# ---- the steps a client and the server take (plain functions: tested without Flower) -------------------------------


def _args(folder: str, steps: int, batch_size: int, learning_rate: float, seed: int, rows: int, **extra) -> dict:
    # An epoch's last batch of one row is dropped: BatchNorm cannot train on one row (ResNets fail on it).
    one_row_left = rows > batch_size and rows % batch_size == 1
    return dict(
        dataloader_drop_last=one_row_left,
        output_dir=folder,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        **extra,
    )


def train_locally(model: nn.Module, shard: Dataset, steps: int, config: FederatedConfig, seed: int) -> nn.Module:
    """A client's plain training on its private shard (a ``transformers.Trainer`` run on the CPU). An epoch's last
    batch of a single row is dropped (BatchNorm cannot train on one row).

    Args:
        model: The client's model, trained in place.
        shard: Its private rows.
        steps: Optimiser steps.
        config: The run's settings (batch size, learning rate).
        seed: Seeds the training.

    Returns:
        ``model``.
    """
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(**_args(folder, steps, config.batch_size, config.learning_rate, seed, len(shard)))
        Trainer(model=model, args=args, train_dataset=shard).train()
    return model


def predict(model: nn.Module, public: Dataset, batch_size: int = 256) -> np.ndarray:
    """``model``'s logits on the public set (evaluation mode), ``N×C`` float32.

    Args:
        model: A classifier.
        public: The public rows (a ``labels`` column is left out).
        batch_size: Rows per forward pass.

    Returns:
        The logits as a numpy array.
    """
    was_training = model.training
    model.eval()
    columns = [column for column in public.column_names if column != "labels"]
    rows = public.select_columns(columns).with_format("torch")
    outputs = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            outputs.append(model(**batch).logits.float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(outputs)


def distil_on_public(
    model: nn.Module,
    public: Dataset,
    predictions: list[np.ndarray],
    steps: int,
    config: FederatedConfig,
    learning_rate: float,
    seed: int,
    *,
    validation_fraction: float = 0.0,
    class_weights: np.ndarray | None = None,
) -> nn.Module:
    """``model`` distilled on the unlabeled ``public`` set from the mean logits of ``predictions`` (with
    ``class_weights``: their weighted sum, class by class, :func:`combine_logits`).

    A multi-teacher :class:`~hf_kd.DistillationTrainer` run whose teachers are the predictions, carried by the rows
    as teacher views (``teacher_client0``, …) — the same run as with the client models as live teachers (tested).
    The teacher is the ensemble's mean **logits** (``teacher_aggregation="mean_logits"``), Lin et al.'s AVGLOGITS.

    With ``validation_fraction`` > 0, that share of the rows (drawn with ``config.seed``: the same rows every round)
    is held out: every ``config.server_eval_steps`` steps the distillation loss on them is measured, the best
    checkpoint is loaded at the end (``load_best_model_at_end``) and, with ``config.server_patience``, the run stops
    after that many validations without improvement (``transformers.EarlyStoppingCallback``).

    Args:
        model: The model to distil, trained in place.
        public: The public rows (a ``labels`` column is left out).
        predictions: One ``N×C`` array of logits per client.
        steps: Distillation steps (0: none), at most with validation.
        config: The run's settings (batch size, temperature, validation steps and patience).
        learning_rate: The distillation's learning rate.
        seed: Seeds the training.
        validation_fraction: The share of the rows held out to validate on, in [0, 1).
        class_weights: ``K×C`` weights of the clients' logits per class (:func:`class_count_weights`); None: the mean.

    Returns:
        ``model``.

    Raises:
        ValueError: a client's predictions of another number of rows or classes, or a validation share that
            leaves no row to validate on or none to distil on, or fewer steps than ``config.server_eval_steps``, or
            ``class_weights`` of another shape than clients × classes.
    """
    distilled, _ = _distil(
        model, public, predictions, steps, config, learning_rate, seed, validation_fraction, class_weights
    )
    return distilled


def class_count_weights(class_counts) -> np.ndarray:
    """The class-level ensemble's weights (Zhang et al. 2022, FedFTG): client k's share of class c's rows.

    Args:
        class_counts: ``K×C`` rows per client and class.

    Returns:
        ``K×C`` float32 weights, each class's column summing to 1; a class no client holds weighs every client 1/K.

    Raises:
        ValueError: counts that are not a ``K×C`` array of whole numbers >= 0.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 2 or not len(counts) or (counts < 0).any() or (counts != np.round(counts)).any():
        raise ValueError(f"class_counts must be K×C row counts >= 0, got {np.asarray(class_counts).tolist()!r}.")
    totals = counts.sum(0, keepdims=True)
    uniform = np.full_like(counts, 1.0 / len(counts))
    return np.where(totals > 0, counts / np.maximum(totals, 1.0), uniform).astype(np.float32)


def combine_logits(predictions: list[np.ndarray], class_weights: np.ndarray | None = None) -> np.ndarray:
    """The clients' ensemble: the mean of their logits, or their sum weighted class by class (Σₖ wₖ,c · zₖ,c).

    Args:
        predictions: One ``N×C`` array of logits per client.
        class_weights: ``K×C`` weights (:func:`class_count_weights`); None: the mean.

    Returns:
        The ``N×C`` ensemble logits (float32).
    """
    if class_weights is None:
        return np.mean(predictions, axis=0).astype(np.float32)
    return np.einsum("knc,kc->nc", np.stack(predictions), class_weights).astype(np.float32)


def validation_rows(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The public rows the server distils on and those it holds out to validate on.

    Args:
        count: The number of public rows.
        fraction: The held-out share, in (0, 1): ``round(fraction × count)`` rows.
        seed: Seeds the draw (one seed: the same rows every round).

    Returns:
        The sorted indices of the distillation rows and of the validation rows.

    Raises:
        ValueError: a share that holds out no row, or every row.
    """
    held_out = int(round(fraction * count))
    if not 0 < held_out < count:
        raise ValueError(
            f"server_validation_fraction={fraction:g} of {count} public rows holds out {held_out}: the server needs "
            "at least one row to validate on and one to distil on. Use more public rows or another fraction."
        )
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def _distil(model, public, predictions, steps, config, learning_rate, seed, validation_fraction, class_weights=None):
    """:func:`distil_on_public`, also returning what the run did: ``server_steps_run`` and, with validation,
    ``server_validation_loss`` (the best) and ``server_best_step``."""
    from transformers import EarlyStoppingCallback, PrinterCallback

    from .trainer import DistillationTrainer

    if steps == 0:
        return model, {}
    rows = public.select_columns([c for c in public.column_names if c != "labels"])
    for index, logits in enumerate(predictions):
        if logits.shape[0] != len(rows):
            raise ValueError(f"client {index} sent {logits.shape[0]} predictions for {len(rows)} public rows.")
        if logits.shape[1:] != predictions[0].shape[1:]:
            raise ValueError(
                f"client {index} sent predictions over {logits.shape[-1]} classes and client 0 over "
                f"{predictions[0].shape[-1]}: their mean needs one label set. Build every client with the same "
                "num_labels and id2label."
            )
    if class_weights is not None:
        if np.shape(class_weights) != (len(predictions), predictions[0].shape[-1]):
            raise ValueError(
                f"class_weights has shape {np.shape(class_weights)}; {len(predictions)} clients' logits over "
                f"{predictions[0].shape[-1]} classes need {(len(predictions), predictions[0].shape[-1])}."
            )
        predictions = [combine_logits(predictions, class_weights)]  # one teacher: the weighted ensemble
    for index, logits in enumerate(predictions):
        rows = rows.add_column(f"teacher_client{index}", logits.tolist())
    teachers = {f"client{index}": PrecomputedPredictions(f"client{index}") for index in range(len(predictions))}
    validation, callbacks = None, []
    with tempfile.TemporaryDirectory() as folder:
        if validation_fraction:
            if steps < config.server_eval_steps:
                raise ValueError(
                    f"server_eval_steps={config.server_eval_steps} is more than the {steps} distillation steps: the "
                    "rows held out would never be validated on. Set server_eval_steps <= steps."
                )
            distilled, held_out = validation_rows(len(rows), validation_fraction, config.seed)
            rows, validation = rows.select(distilled), rows.select(held_out).with_format("torch")
        settings = _args(folder, steps, config.batch_size, learning_rate, seed, len(rows))
        if validation is not None:
            # The Trainer's own validation and best-checkpoint machinery: a checkpoint (the student's weights only)
            # at every validation, the best one loaded at the end.
            settings.update(
                eval_strategy="steps",
                eval_steps=config.server_eval_steps,
                save_strategy="steps",
                save_steps=config.server_eval_steps,
                save_only_model=True,
                save_total_limit=1,
                load_best_model_at_end=True,
                metric_for_best_model="eval_loss",
                greater_is_better=False,
                per_device_eval_batch_size=len(validation),  # one batch: dropping a last batch drops nothing
            )
            if config.server_patience:
                callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.server_patience))
        args = DistillationConfig(
            **settings,
            losses="kl",
            temperature=config.temperature,
            hard_label_weight=1.0,  # public rows carry no labels: the KL alone, at weight 1 as in FedDF
            teacher_aggregation="mean_logits",
            check_finite=True,
        )
        trainer = DistillationTrainer(
            model,
            teachers,
            args,
            train_dataset=rows.with_format("torch"),
            eval_dataset=validation,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # silent, as logging_strategy="no" means: no line per validation
        trainer.train()
    report = {"server_steps_run": trainer.state.global_step}
    if validation is not None:
        report["server_validation_loss"] = float(trainer.state.best_metric)
        report["server_best_step"] = int(trainer.state.best_global_step)
    return model, report


def average_weights(states: list[dict[str, torch.Tensor]], sizes: list[int]) -> dict[str, torch.Tensor]:
    """FedAvg: the parameters averaged with weights proportional to the clients' shard sizes.

    Integer buffers are taken from the largest client.

    Args:
        states: Each client's state dict (one architecture).
        sizes: Each client's number of rows.

    Returns:
        The averaged state dict.

    Raises:
        ValueError: no states, not one size per state, or sizes that are negative or sum to 0.
    """
    if not states or len(states) != len(sizes):
        raise ValueError(
            f"average_weights needs one shard size per state: got {len(states)} states and {len(sizes)} sizes."
        )
    if any(size < 0 for size in sizes) or sum(sizes) <= 0:
        raise ValueError(
            f"average_weights weighs each client by its shard's rows, but the sizes {list(sizes)} sum to "
            f"{sum(sizes)}: give every client's row count (>= 0, at least one client with rows)."
        )
    total = float(sum(sizes))
    largest = int(np.argmax(sizes))
    averaged = {}
    for key, value in states[0].items():
        if not value.is_floating_point():
            averaged[key] = states[largest][key].clone()
            continue
        averaged[key] = sum(state[key].float() * (size / total) for state, size in zip(states, sizes)).to(value.dtype)
    return averaged


def _named_labels(model: nn.Module) -> dict[int, str] | None:
    """The model's ``id2label``, or ``None`` when it names no class (transformers' default ``LABEL_k`` names, or no
    config): such a map says nothing that another could contradict."""
    id2label = getattr(getattr(base_model(model), "config", None), "id2label", None)
    if not id2label:
        return None
    id2label = {int(index): name for index, name in id2label.items()}
    if all(name == f"LABEL_{index}" for index, name in id2label.items()):
        return None
    return dict(sorted(id2label.items()))


def check_parties(make_client: Callable[[int], nn.Module], server: nn.Module, count: int, mode: str) -> int | None:
    """Before round 1: every client's model predicts the server's label set and, in fedavg and feddf, has its
    architecture.

    The same number of classes and, where both name them, the same ``id2label`` (the server averages the parties'
    logits or weights class by class, so logit k must mean one class for all). Where the server's config does not
    tell, the first client that does is the reference. Clients are built one at a time.

    Args:
        make_client: Builds client k's model.
        server: The server's model.
        count: The number of clients.
        mode: ``fedavg``, ``feddf`` or ``fedmd``.

    Returns:
        The number of classes (``None`` when no party's config states it).

    Raises:
        ValueError: a client with another number of classes, another ``id2label``, or (fedavg, feddf) another
            architecture.
    """
    classes, names = (num_classes(server), "the server"), (_named_labels(server), "the server's")
    shapes = {key: tuple(value.shape) for key, value in server.state_dict().items()} if mode != "fedmd" else None
    for index in range(count):
        client = make_client(index)
        client_classes, client_names = num_classes(client), _named_labels(client)
        if classes[0] is None:
            classes = (client_classes, f"client {index}")
        if names[0] is None:
            names = (client_names, f"client {index}'s")
        if client_classes is not None and client_classes != classes[0]:
            raise ValueError(
                f"client {index} predicts {client_classes} classes (config.num_labels) and {classes[1]} "
                f"{classes[0]}: {mode} combines the parties' logits class by class, so every client and the server "
                "need the same label set. Build them all with the same num_labels and id2label."
            )
        if client_names is not None and client_names != names[0]:
            raise ValueError(
                f"client {index}'s id2label {client_names} differs from {names[1]} {names[0]}: {mode} combines the "
                "parties' logits class by class, so logit k must name the same class for all. Build every client "
                "and the server with the same id2label and label2id (from one list of label names)."
            )
        if shapes is not None and {key: tuple(value.shape) for key, value in client.state_dict().items()} != shapes:
            raise ValueError(
                f"fedavg and feddf average weights: every client and the server need the same architecture; "
                f"client {index}'s differs from the server's. Use mode='fedmd' for clients of different "
                "architectures (only predictions cross the wire)."
            )
    return classes[0]


def _label_column(shard: Dataset) -> str | None:
    return next((name for name in ("labels", "label") if name in shard.column_names), None)


def class_counts(shard: Dataset, classes: int) -> np.ndarray:
    """A client's training rows per class (its ``labels`` or ``label`` column; −100 rows left out): what it sends
    for ``ensemble_weighting="class_counts"``.

    Args:
        shard: The client's rows.
        classes: The models' number of classes.

    Returns:
        The rows of each class 0..classes−1.

    Raises:
        ValueError: a shard without an integer ``labels``/``label`` column.
    """
    column = _label_column(shard)
    labels = np.asarray(shard.with_format("numpy")[column]) if column else np.zeros(0, dtype=np.float32)
    if column is None or labels.dtype.kind not in "iu":
        raise ValueError(
            "ensemble_weighting='class_counts' counts each client's rows per class, which needs an integer "
            f"'labels' (or 'label') column; this shard has {shard.column_names}."
        )
    return np.bincount(labels[labels >= 0].astype(np.int64), minlength=classes)[:classes]


def check_shards(client_data: list[Dataset], classes: int | None) -> None:
    """Before round 1: every client has rows to train on, and their class labels lie in the models' label set.

    Args:
        client_data: One private shard per client.
        classes: The models' number of classes (``None``: labels are not checked).

    Raises:
        ValueError: no shards, an empty shard, or labels outside 0..classes−1 (other than -100).
    """
    if not client_data:
        raise ValueError("client_data is empty: give one private shard per client.")
    for index, shard in enumerate(client_data):
        if len(shard) == 0:
            raise ValueError(
                f"client {index}'s shard has 0 rows: a client without rows cannot train. Give every client rows "
                "(dirichlet_split keeps at least min_rows per client)."
            )
        column = _label_column(shard)
        if classes is None or column is None:
            continue
        labels = np.asarray(shard.with_format("numpy")[column])
        if labels.dtype.kind not in "iu":
            continue
        outside = np.unique(labels[(labels != -100) & ((labels < 0) | (labels >= classes))])
        if outside.size:
            raise ValueError(
                f"client {index}'s shard has labels {outside.tolist()[:10]} outside the {classes} classes the models "
                f"predict (0-{classes - 1}; -100 is ignored): build the models with num_labels covering every "
                "label, or map the labels into 0..num_labels-1."
            )


# ---- Flower --------------------------------------------------------------------------------------------------------


@dataclass
class FederatedResult:
    """What :func:`run_federated` returns.

    Args:
        server: The server's model after the last round.
        history: Per round: ``round``, the server's metrics from ``evaluate``, ``seconds``.
        wire_log: With ``record_messages``, every message's content (``direction``, ``round``, ``node``,
            ``content``: a ``RecordDict``); else empty.
    """

    server: nn.Module
    history: list[dict]
    wire_log: list[dict]


def run_federated(
    make_client: Callable[[int], nn.Module],
    make_server: Callable[[], nn.Module],
    client_data: list[Dataset],
    public: Dataset,
    config: FederatedConfig,
    *,
    evaluate: Callable[[nn.Module], dict] | None = None,
    evaluate_ensemble: bool = False,
    record_messages: bool = False,
) -> FederatedResult:
    """Run ``config.rounds`` rounds of federated training with Flower's simulation.

    One ``ClientApp`` node per shard of ``client_data`` (client ``k`` builds its model with ``make_client(k)`` and
    never shares its shard), a ``ServerApp`` holding ``make_server()``. (In simulation every client process receives
    the list of shards with the app and reads its own; a deployed client would load its shard itself.) Parties and
    shards are checked before the simulation starts.

    Args:
        make_client: Builds client k's model.
        make_server: Builds the server's model.
        client_data: One private shard per client.
        public: The unlabeled rows every party may read (its labels, if any, are dropped).
        config: The run's settings.
        evaluate: ``evaluate(server_model)`` gives each round's metrics. With server validation (feddf, fedmd), each
            round's history also holds ``server_steps_run``, ``server_best_step`` and ``server_validation_loss``.
        evaluate_ensemble: Also evaluate, each round, the ensemble the server distils from: the clients' models
            (rebuilt from the weights they sent) behind their mean logits, under ``ensemble_<metric>`` (fedavg,
            feddf; needs ``evaluate``). It tells whether distillation had a better teacher than the average.
        record_messages: Keep every message's content in the result's ``wire_log``.

    Returns:
        The run's :class:`FederatedResult`.

    Raises:
        TypeError: ``config`` is not a :class:`FederatedConfig`.
        ValueError: an empty public set (feddf, fedmd), a validation share that leaves the server no row to validate
            or distil on (:func:`validation_rows`), ``evaluate_ensemble`` without ``evaluate`` or in fedmd (no
            weights), or parties and shards that :func:`check_parties` and :func:`check_shards` refuse.
        RuntimeError: a client failed, or the simulation stopped before the last round.
    """
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    if not isinstance(config, FederatedConfig):
        raise TypeError(f"config must be a FederatedConfig, got {type(config).__name__}.")
    public = public.select_columns([c for c in public.column_names if c != "labels"])
    if len(public) == 0 and config.mode != "fedavg":
        raise ValueError(f"{config.mode} distils on the public set, which is empty.")
    if config.mode != "fedavg" and config.server_steps and config.server_validation_fraction:
        validation_rows(len(public), config.server_validation_fraction, config.seed)
    if evaluate_ensemble and (evaluate is None or config.mode == "fedmd"):
        raise ValueError(
            "evaluate_ensemble evaluates the clients' models, rebuilt from the weights they send, with evaluate: "
            f"it needs evaluate and mode fedavg or feddf, got evaluate={'set' if evaluate else None} and "
            f"mode={config.mode!r} (fedmd clients send no weights)."
        )
    # Everything a client or the server would fail on is checked here, in the driver, before the simulation starts.
    server_model = make_server()
    classes = check_parties(make_client, server_model, len(client_data), config.mode)
    check_shards(client_data, classes)
    if config.ensemble_weighting == "class_counts":  # a shard without integer labels fails here, not in a client
        for shard in client_data:
            class_counts(shard, classes or 1)
    history: list[dict] = []
    wire_log: list[dict] = []

    client_app = ClientApp()

    @client_app.train()
    def client_round(msg, context):
        torch.set_num_threads(max(1, int(config.num_cpus_per_client)))
        client = int(context.node_config["partition-id"])
        settings = msg.content[SETTINGS]
        seed = config.seed + 1000 * client + int(settings["round"])
        model = make_client(client)
        if "model" in context.state.array_records:  # fedmd: a client keeps its own weights between rounds
            model.load_state_dict(context.state["model"].to_torch_state_dict())
        if WEIGHTS in msg.content.array_records:
            model.load_state_dict(msg.content[WEIGHTS].to_torch_state_dict())
        if CONSENSUS in msg.content.array_records and config.digest_steps:
            consensus = msg.content[CONSENSUS]["logits"].numpy()
            distil_on_public(model, public, [consensus], config.digest_steps, config, config.learning_rate, seed)
        train_locally(model, client_data[client], config.local_steps, config, seed)
        report = {"num_examples": len(client_data[client])}
        content = RecordDict()
        if config.mode in ("fedavg", "feddf"):
            content[WEIGHTS] = ArrayRecord(model.state_dict())
        if config.mode in ("feddf", "fedmd"):
            logits = predict(model, public)
            content[PUBLIC_LOGITS] = ArrayRecord({"logits": _array(logits)})
            if config.ensemble_weighting == "class_counts":
                report["class_counts"] = class_counts(client_data[client], logits.shape[-1]).tolist()
        content[REPORT] = MetricRecord(report)
        if config.mode == "fedmd":
            context.state["model"] = ArrayRecord(model.state_dict())
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def server_main(grid, context):
        nodes = _wait_for_nodes(grid, len(client_data))
        consensus = None
        for round_number in range(1, config.rounds + 1):
            start = time.perf_counter()
            messages = []
            for node in nodes:
                content = RecordDict({SETTINGS: ConfigRecord({"round": round_number})})
                if config.mode in ("fedavg", "feddf"):
                    content[WEIGHTS] = ArrayRecord(server_model.state_dict())
                if consensus is not None:
                    content[CONSENSUS] = ArrayRecord({"logits": _array(consensus)})
                messages.append(
                    Message(content=content, dst_node_id=node, message_type="train", group_id=str(round_number))
                )
            replies = list(grid.send_and_receive(messages))
            by_node = {}
            for reply in replies:
                if reply.has_error():
                    raise RuntimeError(f"a client failed in round {round_number}: {reply.error.reason}")
                by_node[reply.metadata.src_node_id] = reply.content
            if record_messages:
                wire_log.extend(
                    {
                        "direction": "to client",
                        "round": round_number,
                        "node": m.metadata.dst_node_id,
                        "content": m.content,
                    }
                    for m in messages
                )
                wire_log.extend(
                    {"direction": "to server", "round": round_number, "node": node, "content": content}
                    for node, content in by_node.items()
                )
            ordered = [by_node[node] for node in nodes]
            sizes = [int(content[REPORT]["num_examples"]) for content in ordered]
            weights = None
            if config.ensemble_weighting == "class_counts":
                weights = class_count_weights([content[REPORT]["class_counts"] for content in ordered])
            server_report, ensemble_metrics = {}, {}
            if config.mode in ("fedavg", "feddf"):
                states = [content[WEIGHTS].to_torch_state_dict() for content in ordered]
                server_model.load_state_dict(average_weights(states, sizes))
                if evaluate_ensemble:
                    members = [_loaded(make_client(k), state) for k, state in enumerate(states)]
                    ensemble = _LogitEnsemble(members, weights)
                    ensemble_metrics = {f"ensemble_{name}": value for name, value in evaluate(ensemble).items()}
            if config.mode in ("feddf", "fedmd"):
                predictions = [content[PUBLIC_LOGITS]["logits"].numpy() for content in ordered]
                seed = config.seed + round_number
                server_report = _distil(
                    server_model,
                    public,
                    predictions,
                    config.server_steps,
                    config,
                    config.server_learning_rate,
                    seed,
                    config.server_validation_fraction,
                    weights,
                )[1]
                if config.mode == "fedmd":
                    consensus = combine_logits(predictions, weights)
            metrics = evaluate(server_model) if evaluate is not None else {}
            history.append(
                {
                    "round": round_number,
                    **metrics,
                    **ensemble_metrics,
                    **server_report,
                    "seconds": time.perf_counter() - start,
                }
            )

    # Ray starts its workers (the clients) at niceness 15: beside any other work on the machine they would starve,
    # while the server waits for them at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(client_data),
        backend_config={
            "client_resources": {"num_cpus": config.num_cpus_per_client, "num_gpus": 0.0},
            "init_args": {"log_to_driver": False, "num_cpus": _ray_cpus()},
        },
    )
    if len(history) != config.rounds:
        raise RuntimeError(
            f"the federated run stopped after {len(history)} of {config.rounds} rounds: see Flower's log above."
        )
    return FederatedResult(server=server_model, history=history, wire_log=wire_log)


def _loaded(model: nn.Module, state: dict) -> nn.Module:
    model.load_state_dict(state)
    return model.eval()


class _LogitEnsemble(nn.Module):
    """The clients' models behind their mean logits (AVGLOGITS), or their class-weighted sum with ``weights``
    (:func:`combine_logits`): what the feddf server distils from."""

    def __init__(self, members: list[nn.Module], weights: np.ndarray | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)

    def forward(self, **inputs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = torch.stack([m(**inputs).logits for m in self.members])
        combined = logits.mean(0) if self.weights is None else (logits * self.weights[:, None, :]).sum(0)
        return SequenceClassifierOutput(logits=combined)


def _array(values: np.ndarray):
    from flwr.app import Array

    return Array.from_numpy_ndarray(np.ascontiguousarray(values, dtype=np.float32))


def _wait_for_nodes(grid, count: int, timeout: float = 120.0) -> list[int]:
    """Flower's nodes register asynchronously: wait until all ``count`` are there."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} Flower nodes registered within {timeout:.0f} s.")
        time.sleep(0.2)


__all__ = [
    "ENSEMBLE_WEIGHTINGS",
    "MODES",
    "FederatedConfig",
    "FederatedResult",
    "average_weights",
    "check_parties",
    "check_shards",
    "class_count_weights",
    "class_counts",
    "combine_logits",
    "dirichlet_split",
    "distil_on_public",
    "predict",
    "run_federated",
    "train_locally",
    "validation_rows",
]
