"""Online mutual learning (Zhang et al. 2018, *Deep Mutual Learning*, arXiv:1706.00384): K ≥ 2 peers trained
together from scratch, with no pretrained teacher. Each peer's loss is its own label loss plus the configured
distillation losses towards the other peers' detached predictions,

    L_k = w_ce·CE(y, p_k) + w_kd·Σᵢ wᵢ·mean_{j≠k} Lᵢ(p_k, sg(p_j))          (towards="peers", the paper)
    L_k = w_ce·CE(y, p_k) + w_kd·Σᵢ wᵢ·Lᵢ(p_k, sg(mean_{j≠k} p_j^τ))       (towards="ensemble", ONE / KDCL-style)

and the cohort's loss is Σ_k L_k: since a peer's prediction enters the others' losses only detached, each peer's
parameters receive gradients from its own loss alone. One optimizer steps the whole cohort (its state is per
parameter); one forward per peer per batch, as training the peers apart would cost.

Peers may differ in architecture and size; they need one label set (or vocabulary) and one kind of output. The
losses are response losses (they compare predictions); one device and DDP (DeepSpeed and FSDP are refused).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import find_labels

from ..checks import check_compatible, check_logit_width
from ..config import DistillationConfig
from ..evaluation import count_parameters
from ..features import ModelFeatures, output_field
from ..hub import render_student_card
from ..model_kinds import (
    auto_class_for,
    is_causal_lm,
    is_token_level,
    labels_mark_distilled_positions,
    num_classes,
)
from ..objective import LABEL_TERM, Objective, check_finite
from ..positions import ItemCounts, split_sample_index
from ..teachers import check_materialized
from ..term_log import TermLog
from ..trainer import DistillationTrainer
from ..trainer.batch_loss import _drop_last_position, label_term, record_terms
from ..trainer.compat import TrainerCompat
from ..trainer.loss_parts import LossParts
from ..trainer.reporting import DISTILLATION_CONFIG_NAME, measure_alone, run_summary
from ..trainer.trainer import _TermLogReset
from .multi_teacher import TeacherAggregator
from .peer_cohort import PEER_PREFIX, PeerCohort
from .stages import Stage

TOWARDS = ("peers", "ensemble")
_PEERS = "peers"  # the one teacher name the objective's terms read: whichever peers a peer learns from


class MutualLearningTrainer(DistillationTrainer):
    """Trains ``peers`` (a list, named ``peer0``, ``peer1``, …, or a dict name → model) together by deep mutual
    learning. It shares :class:`~hf_kd.DistillationTrainer`'s loss bookkeeping, logging, evaluation and checkpoints;
    its model is the :class:`PeerCohort` of the peers.

    Logged per peer: ``ce/peer0``, ``kl/peer0``, … in training and ``eval_ce/peer0``, … in evaluation. With
    ``compute_metrics``, evaluation reports the cohort's mean prediction (``eval_accuracy``) and each peer alone
    (``eval_peer0_accuracy``). ``save_model(DIR)`` writes every peer to ``DIR/NAME`` with its own
    ``distillation_config.json`` and card; checkpoints hold one such folder per peer and resume all of them.
    """

    def __init__(
        self,
        peers: list[nn.Module] | dict[str, nn.Module] | None = None,
        args: DistillationConfig | None = None,
        *,
        towards: str = "peers",
        **kwargs,
    ):
        args = args if args is not None else DistillationConfig(output_dir="hf_kd_output")
        named = _named_peers(peers)
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}.")
        if towards not in TOWARDS:
            raise ValueError(f"towards must be one of {TOWARDS}, got {towards!r}.")
        if kwargs.get("compute_loss_func") is not None or kwargs.get("model") is not None:
            raise ValueError("MutualLearningTrainer trains the peers it is given (peers=) with its own loss.")
        if args.push_to_hub:
            raise ValueError(_NO_PUSH)
        if args.load_best_model_at_end:
            raise ValueError(
                "load_best_model_at_end reloads one model; mutual learning keeps every peer (mutual_learning() marks "
                "the best one): leave it False."
            )
        objective = Objective(args.loss_specs, [_PEERS], args)
        _check_response_losses(objective)
        for peer in named.values():
            check_logit_width(peer, objective.losses)
        widths = {name: num_classes(peer) for name, peer in named.items()}
        if len(set(widths.values()) - {None}) > 1:
            raise ValueError(
                f"the peers' outputs differ in width ({', '.join(f'{n}: {w}' for n, w in widths.items())} output "
                "classes / vocabulary entries): peers compare predictions, so they need one label set or vocabulary."
            )
        kinds = {(is_token_level(peer), is_causal_lm(peer)) for peer in named.values()}
        if len(kinds) > 1:
            raise ValueError(
                "the peers are of different kinds (sequence vs token outputs, causal or not): give peers of one task."
            )
        TrainerCompat.__init__(self, model=PeerCohort(named), args=args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "mutual learning is not supported under DeepSpeed or FSDP: they wrap one model per engine, and the "
                "peers are trained as one cohort module. Use one device or DDP (accelerate launch without a "
                "DeepSpeed or FSDP config)."
            )
        first = next(iter(named.values()))
        if args.label_names is None:  # the cohort's forward hides the peers' label arguments
            self.label_names = find_labels(type(first))
        self.objective, self.towards = objective, towards
        self.distillation_losses = objective.losses.to(self.args.device)
        self.token_level = args.token_level if args.token_level is not None else is_token_level(first)
        self.shift_labels = is_causal_lm(first)
        self.labels_mark_positions = labels_mark_distilled_positions(first)
        self.teachers, self.student_noise = {}, None
        self.loss_parts = LossParts(nn.ModuleList())  # response losses learn nothing; the hooks expect the parts
        names = [LABEL_TERM, *objective.names]
        self.term_log = TermLog([f"{term}/{peer}" for peer in named for term in names], self.args.device)
        self.add_callback(_TermLogReset(self.term_log))
        self._warned_unlabeled_eval, self._comparing = False, None
        self.comparison, self.comparison_examples, self.model_card_kwargs = None, None, {}
        self.peer_metrics: dict[str, dict] = {}  # set by mutual_learning(): each peer's evaluation
        self.best_peer: str | None = None

    @property
    def peers(self) -> nn.ModuleDict:
        return self.accelerator.unwrap_model(self.model).peers

    def parameters_of(self, role: str) -> int:
        return count_parameters(self.peers[role])

    # ---- loss -----------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = num_items_in_batch
        if not isinstance(counts, ItemCounts):  # called outside the training loop
            counts = self._get_num_items_in_batch([inputs], self.args.device)
        mode = "train" if model.training else "eval"
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if mode == "train" else 1
        inputs, _ = split_sample_index(inputs)
        labels, label_weight = inputs.get("labels"), self.args.label_loss_weight
        results = model(**inputs)  # every peer once; each computes its own label loss
        mask = self._distillation_mask(inputs)
        features = {name: peer_features for name, (_, peer_features) in results.items()}
        position_labels = labels
        if self.token_level and self.shift_labels:
            features = {name: _drop_last_position(peer_features) for name, peer_features in features.items()}
            position_labels = None if labels is None else labels[:, 1:]
        detached = {
            name: ModelFeatures(logits=peer_features.logits.detach()) for name, peer_features in features.items()
        }
        step = self.state.global_step if mode == "train" else None
        labeled = label_weight > 0 and labels is not None
        total = None
        for name, (outputs, _) in results.items():
            student = features[name]
            others = [peer_features for other, peer_features in detached.items() if other != name]
            terms = label_term(self, outputs, labels, counts) if label_weight > 0 else {}
            for term in self.objective.terms:
                teachers = [self._ensemble(others, term)] if self.towards == "ensemble" else others
                values = []
                for teacher in teachers:
                    check_compatible(student, teacher)
                    values.append(term.loss(student, teacher, mask=mask, labels=position_labels))
                terms[term.name] = self.objective.normalise(term, sum(values) / len(values), counts, accumulation)
            if self.args.check_finite:
                check_finite(
                    f"{mode} step {self.state.global_step + 1}, {name}", terms, student, {}, mask, self.args.device
                )
            peer_total = self.objective.total(terms, label_weight, step)
            total = peer_total if total is None else total + peer_total
            record_terms(self, mode, terms, counts, accumulation, True, labeled, suffix=f"/{name}")
        if not return_outputs:
            return total
        # What evaluation's compute_metrics reads: the cohort's mean prediction (each peer: evaluate()).
        return total, {"logits": self._mean_prediction(list(detached.values()), 1.0)}

    def _ensemble(self, others: list[ModelFeatures], term) -> ModelFeatures:
        return ModelFeatures(logits=self._mean_prediction(others, float(getattr(term.loss, "temperature", 1.0))))

    @staticmethod
    def _mean_prediction(features: list[ModelFeatures], temperature: float) -> torch.Tensor:
        """Logits that soften at ``temperature`` into the mean of the peers' softened probabilities."""
        shape = features[0].logits.shape
        flat = [peer.logits.reshape(-1, shape[-1]) for peer in features]
        weights = torch.full((flat[0].shape[0], len(flat)), 1.0 / len(flat), device=flat[0].device)
        combined = TeacherAggregator([str(k) for k in range(len(flat))]).combine(flat, weights, temperature)
        return combined.reshape(shape)

    # ---- evaluation -----------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The Trainer's evaluation of the cohort (every peer's terms; with ``compute_metrics`` the cohort's mean
        prediction), plus ``compute_metrics`` of each peer alone under ``{prefix}_{peer}_``."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.compute_metrics is None or isinstance(dataset, dict):  # a dict: evaluate() was called per set
            return metrics
        peer_metrics = {}
        for name in self.peers:
            self._comparing = name
            try:
                output = self.evaluation_loop(
                    self.get_eval_dataloader(dataset), name, metric_key_prefix=f"{metric_key_prefix}_{name}"
                )
            finally:
                self._comparing = None
            peer_metrics.update({key: value for key, value in output.metrics.items() if not key.endswith(_LOOP_FIELDS)})
        self.log(peer_metrics)
        return {**metrics, **peer_metrics}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self._comparing not in self.peers:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        plain = split_sample_index(self._prepare_inputs(inputs))[0]
        with torch.no_grad():
            peer = self.peers[self._comparing]
            logits = output_field(peer(**{key: value for key, value in plain.items() if key != "labels"}), "logits")
        return None, logits, plain.get("labels")

    # ---- saving ---------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Every peer to ``OUTPUT_DIR/NAME`` (``from_pretrained`` reads it), each with its own
        ``distillation_config.json`` and model card; no cohort file."""
        output_dir = output_dir or self.args.output_dir
        TrainerCompat.save_model(self, output_dir, _internal_call)  # compat._save: one folder per peer
        if not self.args.should_save:
            return
        for name, peer in self.peers.items():
            summary = self.peer_summary(name)
            with open(os.path.join(output_dir, name, DISTILLATION_CONFIG_NAME), "w") as handle:
                json.dump(summary, handle, indent=2)
            if not _internal_call:
                self._peer_card(name, peer, summary).save(os.path.join(output_dir, name, "README.md"))

    def distillation_summary(self) -> dict:
        return {name: self.peer_summary(name) for name in self.peers}

    def peer_summary(self, name: str) -> dict:
        """One peer's ``distillation_config.json``: its teachers are the other peers."""
        others = [other for other in self.peers if other != name]
        stage = {"scheme": "mutual_learning", "peer": name, "peers": list(self.peers), "towards": self.towards}
        if self.best_peer is not None:
            stage["best_peer"] = self.best_peer
        summary = {
            "teacher": f"its peers {', '.join(others)} (deep mutual learning)",
            "teacher_class": ", ".join(dict.fromkeys(type(self.peers[other]).__name__ for other in others)),
            "teacher_parameters": sum(count_parameters(self.peers[other]) for other in others),
            **run_summary(self, self.peers[name]),
            "stage": stage,
        }
        if name in self.peer_metrics:
            summary["metrics"] = self.peer_metrics[name]
        return summary

    def _peer_card(self, name: str, peer: nn.Module, summary: dict):
        rows = None
        if self.comparison:  # this peer last: the card's table reads the last row as the student
            rows = {other: row for other, row in self.comparison.items() if other != name}
            rows[f"{name} (this model)"] = self.comparison[name]
        return render_student_card(
            summary,
            list(self.distillation_losses),
            repo_id=self.args.hub_model_id or name,
            auto_class=auto_class_for(peer).__name__,
            comparison=rows,
            eval_examples=self.comparison_examples,
            device=str(self.args.device),
            **{
                key: value for key, value in self.model_card_kwargs.items() if key in ("dataset_description", "license")
            },
        )

    def create_model_card(self, *args, **kwargs):
        raise NotImplementedError("each peer has its own card, written by save_model() into its folder.")

    def push_to_hub(self, *args, **kwargs):
        raise NotImplementedError(_NO_PUSH)

    def compare_with_teacher(self, eval_dataset=None) -> dict[str, dict]:
        """Each peer's row (metrics, parameters, ms per example), measured alone; kept for the peers' cards."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("compare_with_teacher needs an eval_dataset (here or in MutualLearningTrainer).")
        self.comparison = {name: measure_alone(self, name, dataset) for name in self.peers}
        self.comparison_examples = len(dataset)
        return self.comparison


_NO_PUSH = (
    "a MutualLearningTrainer does not push (push_to_hub=False): save_model() writes every peer to OUTPUT_DIR/NAME "
    "with its weights, distillation_config.json and card; push the one you want with "
    "huggingface_hub.upload_folder(folder_path='OUTPUT_DIR/peer0', repo_id=...)."
)
_LOOP_FIELDS = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time", "_loss")


def mutual_learning(
    peers: list[nn.Module] | dict[str, nn.Module],
    args: DistillationConfig,
    *,
    towards: str = "peers",
    metric: str | None = None,
    **trainer_kwargs,
) -> list[Stage]:
    """Train ``peers`` together by deep mutual learning in ``args.output_dir`` (resuming from its last checkpoint
    there), measure each on ``eval_dataset`` alone, mark the best and save every peer to ``OUTPUT_DIR/NAME``.

    ``metric``: the ``compute_metrics`` key that decides the best peer (default ``args.metric_for_best_model``, else
    ``accuracy``; higher is better unless ``args.greater_is_better`` is False or the key ends in ``loss``). Without
    an eval set, or without that metric, no peer is marked. Returns one :class:`Stage` per peer
    (``details["best"]``), each with the one trainer that trained them all.
    """
    trainer = MutualLearningTrainer(peers, args, towards=towards, **trainer_kwargs)
    folder = args.output_dir
    checkpoint = get_last_checkpoint(folder) if os.path.isdir(folder) else None
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.eval_dataset is not None:
        rows = trainer.compare_with_teacher()
        trainer.peer_metrics = {
            name: {key: value for key, value in row.items() if key not in ("parameters", "ms_per_example")}
            for name, row in rows.items()
        }
        trainer.best_peer = _best(trainer.peer_metrics, metric or args.metric_for_best_model, args.greater_is_better)
    trainer.save_model(folder)
    stages = []
    for name, peer in trainer.peers.items():
        metrics = trainer.peer_metrics.get(name, {})
        stage = Stage(name, os.path.join(folder, name), peer, metrics, {"best": name == trainer.best_peer}, trainer)
        stages.append(stage)
    return stages


def _best(metrics: dict[str, dict], metric: str | None, greater_is_better: bool | None) -> str | None:
    """The peer with the best ``metric`` (``accuracy`` by default when reported; else none is marked)."""
    metric = (metric or "accuracy").removeprefix("eval_")
    scored = {name: row[metric] for name, row in metrics.items() if metric in row}
    if len(scored) != len(metrics) or not scored:
        return None
    higher = greater_is_better if greater_is_better is not None else not metric.endswith("loss")
    return (max if higher else min)(scored, key=scored.get)


def _named_peers(peers) -> dict[str, nn.Module]:
    if isinstance(peers, dict):
        named = dict(peers)
        for name in named:
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(
                    f"peer names must be non-empty strings without '/' (they name log entries "
                    f"such as ce/NAME and folders), got {name!r}."
                )
    elif isinstance(peers, (list, tuple)):
        named = {f"{PEER_PREFIX}{index}": peer for index, peer in enumerate(peers)}
    else:
        raise TypeError(f"peers must be a list or dict of models, got {type(peers).__name__}.")
    if len(named) < 2:
        raise ValueError(f"mutual learning needs at least two peers, got {len(named)}.")
    models = list(named.values())
    for name, peer in named.items():
        if not isinstance(peer, nn.Module):
            raise TypeError(f"peer {name!r} must be an nn.Module (a transformers model), got {type(peer).__name__}.")
        check_materialized(peer, f"peer {name!r}")
    if len({id(peer) for peer in models}) < len(models):
        raise ValueError("the same model is given twice as a peer: give each peer its own model.")
    shared = {id(p) for p in models[0].parameters()}
    for peer in models[1:]:
        if any(id(p) in shared for p in peer.parameters()):
            raise ValueError("two peers share parameters: each peer must be a separate model (copy.deepcopy).")
        shared |= {id(p) for p in peer.parameters()}
    return named


def _check_response_losses(objective: Objective) -> None:
    """Peers exchange predictions: only losses that read logits alone apply."""
    other = [term.loss.name for term in objective.terms if term.loss.side_needs("student") != {"logits"}]
    if other:
        raise ValueError(
            f"mutual learning exchanges the peers' predictions, and {other} read other features (hidden states, "
            "embeddings) with learned parts sized for one teacher: use response losses (kl, reverse_kl, jsd, "
            "soft_ce, tvd, prob_mse, logit_mse, dkd)."
        )
