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

import dataclasses
import os
from dataclasses import dataclass, field

from torch import nn

from ..checks import check_logit_width
from ..config import DistillationConfig
from ..evaluation import count_parameters
from ..features import ModelFeatures, output_field
from ..hub import render_student_card
from ..model_kinds import auto_class_for, is_causal_lm, is_token_level, num_classes
from ..teachers import check_materialized, name_models
from ..trainer import DistillationTrainer
from ..trainer.compat import TrainerCompat
from ..trainer.members import TrainedMembers, mean_prediction
from ..trainer.reporting import run_summary, write_summary
from .peer_cohort import PEER_PREFIX, PeerCohort
from .registry import SchemeConfig, SchemeInputs, SchemeResult, register_scheme
from .stages import Stage, train_measure_save

TOWARDS = ("peers", "ensemble")


class CohortTrainer(DistillationTrainer):
    """A :class:`~hf_kd.DistillationTrainer` whose model is a :class:`PeerCohort` of models trained together:
    ``save_model(DIR)`` writes every one to ``DIR/NAME`` with its own ``distillation_config.json`` and card, and
    checkpoints hold one such folder each. Subclasses say what taught a member (:meth:`teachers_of_peer`) and what
    its summary records (:meth:`peer_stage`); they set ``peer_metrics`` and ``best_peer``.

    Args:
        model: the :class:`PeerCohort` of the models trained together.
        teacher_model: as for :class:`~hf_kd.DistillationTrainer` (None: the members teach each other).
        args: the run's :class:`~hf_kd.DistillationConfig`.
        student_noise: as for :class:`~hf_kd.DistillationTrainer` (refused with members).
        members: who teaches whom among the peers (a :class:`~hf_kd.trainer.members.TrainedMembers`).
        **kwargs: everything ``transformers.Trainer`` takes (``train_dataset``, ``data_collator``, ...).
    """

    no_push = ""  # the refusal of push_to_hub, naming what to push instead

    @property
    def peers(self) -> nn.ModuleDict:
        """The models trained together, by name (unwrapped)."""
        return self.accelerator.unwrap_model(self.model).peers

    def teachers_of_peer(self, name: str) -> dict:
        """``teacher``, ``teacher_class``, ``teacher_parameters`` of member ``name``'s summary.

        Args:
            name: the member's name.
        """
        raise NotImplementedError

    def peer_stage(self, name: str) -> dict:
        """What member ``name``'s summary records under ``"stage"``.

        Args:
            name: the member's name.
        """
        raise NotImplementedError

    # ---- saving ---------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Every peer to ``OUTPUT_DIR/NAME`` (``from_pretrained`` reads it), each with its own
        ``distillation_config.json`` and model card; no cohort file.

        Args:
            output_dir: the folder (default ``args.output_dir``).
            _internal_call: set by the Trainer's own saves (checkpoints), which write no cards.
        """
        output_dir = output_dir or self.args.output_dir
        TrainerCompat.save_model(self, output_dir, _internal_call)  # compat._save: one folder per peer
        if not self.args.should_save:
            return
        for name, peer in self.peers.items():
            summary = self.peer_summary(name)
            write_summary(os.path.join(output_dir, name), summary)
            if not _internal_call:
                self._peer_card(name, peer, summary).save(os.path.join(output_dir, name, "README.md"))

    def distillation_summary(self) -> dict:
        return {name: self.peer_summary(name) for name in self.peers}

    def peer_summary(self, name: str) -> dict:
        """One member's ``distillation_config.json``: its teachers (:meth:`teachers_of_peer`) and its stage.

        Args:
            name: the member's name.

        Returns:
            The summary, with the member's ``metrics`` once measured.
        """
        summary = {**self.teachers_of_peer(name), **run_summary(self, self.peers[name]), "stage": self.peer_stage(name)}
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
            dataset_description=self.model_card_kwargs.get("dataset_description"),
            license=self.model_card_kwargs.get("license"),
        )

    def create_model_card(self, *args, **kwargs):
        raise NotImplementedError("each peer has its own card, written by save_model() into its folder.")

    def push_to_hub(self, *args, **kwargs):
        raise NotImplementedError(self.no_push)


class PeerTeaching(TrainedMembers):
    """Deep mutual learning's members: every peer learns from the others (``towards="peers"``, averaged over them)
    or from their ensemble (``towards="ensemble"``).

    Args:
        names: the peers, in the cohort's order.
        reference: one peer's model, which tells the task.
        towards: ``"peers"`` or ``"ensemble"``.
    """

    scheme, kind = "mutual learning", "peer"

    def __init__(self, names: list[str], reference: nn.Module, towards: str = "peers"):
        super().__init__(names, reference)
        self.towards = towards

    def teachers_of(self, member, detached, term):
        others = [features for name, features in detached.items() if name != member]
        if self.towards == "ensemble":
            return [ModelFeatures(logits=mean_prediction(others, float(getattr(term.loss, "temperature", 1.0))))]
        return others

    def logits_alone(self, module, member, inputs):
        return output_field(module.peers[member](**inputs), "logits")

    def model_of(self, module, member):
        return module.peers[member]


class MutualLearningTrainer(CohortTrainer):
    """Trains ``peers`` (a list, named ``peer0``, ``peer1``, …, or a dict name → model) together by deep mutual
    learning: a :class:`~hf_kd.DistillationTrainer` whose model is the :class:`PeerCohort` of the peers and whose
    members (:class:`PeerTeaching`) teach each other.

    Logged per peer: ``ce/peer0``, ``kl/peer0``, … in training and ``eval_ce/peer0``, … in evaluation. With
    ``compute_metrics``, evaluation reports the cohort's mean prediction (``eval_accuracy``) and each peer alone
    (``eval_peer0_accuracy``). ``save_model(DIR)`` writes every peer to ``DIR/NAME`` with its own
    ``distillation_config.json`` and card; checkpoints hold one such folder per peer and resume all of them.

    Args:
        peers: the models trained together (a list or a dict name → model; two at least, each its own model).
        args: the run's :class:`~hf_kd.DistillationConfig`; its losses must be response losses.
        towards: ``"peers"`` (each peer learns from every other, averaged: the paper) or ``"ensemble"``.
        **kwargs: what :class:`~hf_kd.DistillationTrainer` takes beside ``model`` and ``teacher_model``.

    Raises:
        ValueError: peers of different label sets or kinds, ``push_to_hub``, or an option the scheme cannot take.
    """

    def __init__(
        self,
        peers: list[nn.Module] | dict[str, nn.Module] | None = None,
        args: DistillationConfig | None = None,
        *,
        towards: str = "peers",
        **kwargs,
    ):
        named = _named_peers(peers)
        if towards not in TOWARDS:
            raise ValueError(f"towards must be one of {TOWARDS}, got {towards!r}.")
        if "model" in kwargs:
            raise ValueError("MutualLearningTrainer trains the peers it is given: pass them as peers, not model=.")
        if args is not None and args.push_to_hub:
            raise ValueError(_NO_PUSH)
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
        members = PeerTeaching(list(named), next(iter(named.values())), towards)
        super().__init__(model=PeerCohort(named), args=args, members=members, **kwargs)
        for peer in named.values():  # distribution losses on a one-logit head
            check_logit_width(peer, self.distillation_objective.losses)
        self.towards, self.no_push = towards, _NO_PUSH
        self.peer_metrics: dict[str, dict] = {}  # set by mutual_learning(): each peer's evaluation
        self.best_peer: str | None = None

    def teachers_of_peer(self, name: str) -> dict:
        others = [other for other in self.peers if other != name]
        return {
            "teacher": f"its peers {', '.join(others)} (deep mutual learning)",
            "teacher_class": ", ".join(dict.fromkeys(type(self.peers[other]).__name__ for other in others)),
            "teacher_parameters": sum(count_parameters(self.peers[other]) for other in others),
        }

    def peer_stage(self, name: str) -> dict:
        stage = {"scheme": "mutual_learning", "peer": name, "peers": list(self.peers), "towards": self.towards}
        if self.best_peer is not None:
            stage["best_peer"] = self.best_peer
        return stage


_NO_PUSH = (
    "a MutualLearningTrainer does not push (push_to_hub=False): save_model() writes every peer to OUTPUT_DIR/NAME "
    "with its weights, distillation_config.json and card; push the one you want with "
    "huggingface_hub.upload_folder(folder_path='OUTPUT_DIR/peer0', repo_id=...)."
)


@dataclass
class MutualLearningConfig(SchemeConfig):
    """Settings of deep mutual learning (Zhang et al. 2018): at least 2 peers, each a fresh ``make_student(k)``;
    ``towards="peers"`` is the paper's (each peer learns from the others, averaged), ``"ensemble"`` learns from their
    mean prediction.

    Args:
        peers: mutual_learning: the number of peers (each a fresh student).
        towards: mutual_learning: each peer learns from every other peer (averaged), or from their ensemble.

    Raises:
        ValueError: fewer than 2 peers, or ``towards`` neither ``peers`` nor ``ensemble``.
    """

    peers: int = field(default=2, metadata={"help": "mutual_learning: the number of peers (each a fresh student)."})
    towards: str = field(
        default="peers",
        metadata={
            "help": "mutual_learning: each peer learns from every other peer (averaged), or from their ensemble.",
            "choices": list(TOWARDS),
        },
    )

    def __post_init__(self):
        if not isinstance(self.peers, int) or self.peers < 2:
            raise ValueError(f"mutual learning needs at least 2 peers, got {self.peers!r}.")
        if self.towards not in TOWARDS:
            raise ValueError(f"towards must be one of {TOWARDS}, got {self.towards!r}.")


def mutual_learning(
    peers: list[nn.Module] | dict[str, nn.Module],
    args: DistillationConfig,
    *,
    towards: str = "peers",
    metric: str | None = None,
    scheme: MutualLearningConfig | None = None,
    **trainer_kwargs,
) -> list[Stage]:
    """Train ``peers`` together by deep mutual learning in ``args.output_dir`` (resuming from its last checkpoint
    there), measure each on ``eval_dataset`` alone, mark the best and save every peer to ``OUTPUT_DIR/NAME``.

    Args:
        peers: the models trained together (a list or a dict name → model).
        args: the run's :class:`~hf_kd.DistillationConfig`.
        towards: ``"peers"`` (the paper) or ``"ensemble"``.
        metric: the ``compute_metrics`` key that decides the best peer (default ``args.metric_for_best_model``,
            else ``accuracy``; higher is better unless ``args.greater_is_better`` is False or the key ends in
            ``loss``). Without an eval set, or without that metric, no peer is marked.
        scheme: the scheme's settings, recorded in each peer's summary (default: from the arguments above).
        **trainer_kwargs: passed to the :class:`MutualLearningTrainer` (``train_dataset``, ``eval_dataset``, ...).

    Returns:
        A stage per peer (:class:`Stage`, ``details["best"]``), each with the one trainer that trained them all.
    """
    trainer = MutualLearningTrainer(peers, args, towards=towards, **trainer_kwargs)
    trainer.scheme_config = scheme if scheme is not None else MutualLearningConfig(len(trainer.members.names), towards)
    folder = args.output_dir

    def measure(trainer):  # every peer alone; the best one marked
        rows = trainer.compare_with_teacher()
        trainer.peer_metrics = {
            name: {key: value for key, value in row.items() if key not in ("parameters", "ms_per_example")}
            for name, row in rows.items()
        }
        trainer.best_peer = best_member(
            trainer.peer_metrics, metric or args.metric_for_best_model, args.greater_is_better
        )

    train_measure_save(trainer, folder, measure if trainer.eval_dataset is not None else None)
    stages = []
    for name, peer in trainer.peers.items():
        metrics = trainer.peer_metrics.get(name, {})
        stage = Stage(name, os.path.join(folder, name), peer, metrics, {"best": name == trainer.best_peer}, trainer)
        stages.append(stage)
    return stages


def best_member(metrics: dict[str, dict], metric: str | None, greater_is_better: bool | None) -> str | None:
    """The member with the best ``metric``.

    Args:
        metrics: each member's metrics, by name.
        metric: the metric's key, with or without ``eval_`` (None: ``accuracy``).
        greater_is_better: whether higher is better (None: unless the key ends in ``loss``).

    Returns:
        The best member's name; None when a member lacks the metric or there are none.
    """
    metric = (metric or "accuracy").removeprefix("eval_")
    scored = {name: row[metric] for name, row in metrics.items() if metric in row}
    if len(scored) != len(metrics) or not scored:
        return None
    higher = greater_is_better if greater_is_better is not None else not metric.endswith("loss")
    return (max if higher else min)(scored, key=scored.get)


def _named_peers(peers) -> dict[str, nn.Module]:
    if not isinstance(peers, (list, tuple, dict)):
        raise TypeError(f"peers must be a list or dict of models, got {type(peers).__name__}.")
    named = name_models(peers, PEER_PREFIX)
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


@register_scheme("mutual_learning", config=MutualLearningConfig, teachers="none", stages=True)
def run_mutual_learning(config: MutualLearningConfig, args: DistillationConfig, given: SchemeInputs) -> SchemeResult:
    """Deep mutual learning: peers trained together from scratch, each learning from the others' predictions; no
    pretrained teacher, and the best peer is the student (Zhang et al. 2018).

    Args:
        config: the number of peers and what each learns from.
        args: the run's :class:`~hf_kd.DistillationConfig`.
        given: the student builder (one per peer), data and trainer arguments.

    Returns:
        A trainer around the best peer (the other peers its frozen teachers), and the other peers' stages.
    """
    peers = mutual_learning(
        [given.make_student(k) for k in range(1, config.peers + 1)],
        dataclasses.replace(args, push_to_hub=False),  # the cohort never pushes; the best peer's trainer does
        towards=config.towards,
        scheme=config,
        **given.trainer_kwargs,
    )
    best = next((peer for peer in peers if peer.details["best"]), peers[0])
    others = [peer for peer in peers if peer is not best]
    return SchemeResult(_best_peer_trainer(best, others, args, config, given.extra), others)


def _best_peer_trainer(best: Stage, others: list[Stage], args, scheme, trainer_kwargs):
    """After deep mutual learning: a trainer around the best peer (its teachers, the other peers, now frozen), for
    the recipe's evaluation, save and push; it records the cohort's run (steps, peers, metrics)."""
    trainer = DistillationTrainer(
        model=best.model, teacher_model={peer.name: peer.model for peer in others}, args=args, **trainer_kwargs
    )
    summary = best.trainer.peer_summary(best.name)
    trainer.state.global_step = best.trainer.state.global_step
    trainer.stage_metrics, trainer.stage_details = summary.get("metrics"), summary["stage"]
    trainer.scheme_config = scheme
    return trainer
