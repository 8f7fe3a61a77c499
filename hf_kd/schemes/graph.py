"""Distillation graphs (Minami et al. 2020, *Knowledge Transfer Graph for Deep Collaborative Learning*,
arXiv:1909.04286): the models of a run are nodes — trained, or frozen (a live model, a cache) — and every transfer
of knowledge is an edge ``source → target`` with a loss from the registry, a weight and a *gate* that scales it per
step or per example. Offline KD (frozen → trained), deep mutual learning (trained ⇄ trained) and a teacher-assistant
stage are graphs; the graph's point is to choose which edges exist and how strong each is over training.

A trained node's loss is its label loss plus, for every edge into it, ``weight · gate · loss(node, sg(source))``;
the run's loss is the sum over trained nodes, all trained together by one :class:`~hf_kd.DistillationTrainer`
(its ``members``), one optimizer, one checkpoint. Edge terms are logged as ``LOSS/SOURCE->TARGET``, label losses as
``ce/NODE``; every trained node is evaluated alone and saved to ``OUTPUT_DIR/NODE``.

Gates (the paper's): ``through`` (1), ``cutoff`` (0: the edge is off), ``linear_up`` (t/T over training),
``linear_down`` (1 − t/T) and ``correct`` (only the rows — positions, for token-level models — whose label the
source predicts; rows without a label pass nothing). And ``learned`` (Luo et al. 2018, *Graph Distillation for Action
Detection with Privileged Modalities*, arXiv:1712.00108): a weight per example, ``π(x)``, computed by a small network
on the source's prediction — a softmax over the target's learned edges and a "none" option, so the weights lie in
(0, 1) and sum to at most 1. The networks train on the labeled rows of each batch, by the likelihood of the label
under the sources' predictions mixed by those weights (``−log(Σⱼ πⱼ(x)·pⱼ(y|x) + π_none(x)/C)``, logged as
``edge_nll/TARGET``): they learn on which rows each source is right, and weigh every row, labeled or not, by it. The
edge terms read the weights detached (driven by the imitation losses instead, the weights would learn to switch off
the edges that disagree with the target). A frozen node reads the row's ``teacher_*`` view when the data has one
(:mod:`hf_kd.views`; Luo et al.'s privileged modalities), the trained nodes the plain view.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checks import check_logit_width
from ..config import DistillationConfig, LossSpec
from ..evaluation import evaluate_model
from ..features import output_field
from ..losses import DistillationLoss, get_loss
from ..losses.response import ResponseLoss
from ..model_kinds import is_causal_lm, is_token_level, num_classes
from ..objective import LABEL_TERM, Objective
from ..teachers import TeacherSource, check_materialized
from ..trainer.members import RESPONSE_ONLY, TrainedMembers
from ..views import split_views
from .mean_teacher import EMATeacher
from .mutual_learning import CohortTrainer, best_member
from .peer_cohort import PeerCohort
from .registry import SchemeConfig, SchemeInputs, SchemeResult, register_scheme
from .stages import Stage, train_measure_save

GATES = ("through", "cutoff", "linear_up", "linear_down", "correct", "learned")
EDGE_NLL = "edge_nll"  # logged per target with learned edges: the weight networks' training loss
SCORER_WIDTH = 32  # hidden units of a learned edge's weight network
NODE_KINDS = ("trained", "frozen", "ema")
EMA_DECAY = 0.999  # an EMA node's default decay (the mean teacher's)


@dataclass
class GraphEdge:
    """One transfer of knowledge.

    Args:
        source: The node it reads (detached: the source learns nothing from this edge).
        target: The trained node it teaches.
        loss: A response loss of the registry (``kl``, ``jsd``, ``logit_mse``, ...).
        weight: Its weight in the target's total (finite, >= 0).
        gate: ``through``, ``cutoff``, ``linear_up``, ``linear_down``, ``correct`` or ``learned`` (a weight per example
            from a network on the source's prediction, trained on labeled rows).
        options: The loss's options (``{"temperature": 4.0}``; default temperature: ``args.temperature``).
    """

    source: str
    target: str
    loss: str = "kl"
    weight: float = 1.0
    gate: str = "through"
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Its logged name, ``LOSS/SOURCE->TARGET``."""
        return f"{self.loss}/{self.source}->{self.target}"


@dataclass
class DistillationGraph:
    """Nodes and edges of a run.

    Args:
        nodes: Each node's name → ``"trained"``, ``"frozen"``, or ``{"ema": NODE, "decay": d}``: a node that follows
            the trained node NODE's weights by their exponential moving average (the mean teacher's
            :class:`~hf_kd.schemes.mean_teacher.EMATeacher`; ``d`` in [0, 1), default 0.999, ramped up from 0).
        edges: The transfers, in order.
        student: The trained node that is the run's result (its trainer is returned, saved and pushed).

    Raises:
        ValueError: an unknown node kind, gate or loss; an EMA node that follows no trained node or has a decay
            outside [0, 1); an edge from or to an unknown node, into a frozen or EMA node, or from a node to itself;
            two edges with the same source, target and loss; a non-finite or negative weight; no trained node;
            ``student`` not a trained node.
    """

    nodes: dict[str, str | dict]
    edges: list[GraphEdge]
    student: str

    def __post_init__(self):
        self.edges = [edge if isinstance(edge, GraphEdge) else GraphEdge(**edge) for edge in self.edges]
        for name, kind in self.nodes.items():
            if isinstance(kind, dict):
                self._check_ema(name, kind)
            elif kind not in NODE_KINDS[:2]:
                raise ValueError(
                    f"node {name!r} is {kind!r}: a node is 'trained', 'frozen' or {{'ema': NODE, 'decay': d}}."
                )
            if "/" in name or "->" in name or name == LABEL_TERM:
                raise ValueError(f"node name {name!r}: no '/' or '->' (they are in logged names), and not 'ce'.")
        if not self.trained:
            raise ValueError("the graph has no trained node: at least one node must be 'trained'.")
        if not self.edges:
            raise ValueError("the graph has no edge: nothing would be distilled (fine-tune the student instead).")
        if self.nodes.get(self.student) != "trained":
            raise ValueError(f"student={self.student!r} must be a trained node; the trained nodes are {self.trained}.")
        seen = set()
        for edge in self.edges:
            for end in (edge.source, edge.target):
                if end not in self.nodes:
                    raise ValueError(f"edge {edge.name} names the node {end!r}, which is not among {list(self.nodes)}.")
            if self.nodes[edge.target] != "trained":
                kind = "frozen" if self.nodes[edge.target] == "frozen" else "EMA"
                raise ValueError(f"edge {edge.name} teaches the {kind} node {edge.target!r}: only trained nodes learn.")
            if edge.source == edge.target:
                raise ValueError(f"edge {edge.name} goes from a node to itself.")
            if edge.gate not in GATES:
                raise ValueError(f"edge {edge.name} has the gate {edge.gate!r}; gates: {GATES}.")
            if not (isinstance(edge.weight, (int, float)) and math.isfinite(edge.weight) and edge.weight >= 0):
                raise ValueError(f"edge {edge.name} has the weight {edge.weight!r}: a finite number >= 0.")
            if edge.name in seen:
                raise ValueError(f"edge {edge.name} is given twice: merge the two into one weight.")
            seen.add(edge.name)
            loss = get_loss(edge.loss, **edge.options)  # unknown ids and bad options raise here
            if loss.side_needs("student") != {"logits"} or loss.side_needs("teacher") != {"logits"}:
                raise ValueError(
                    f"edge {edge.name}: a graph's edges exchange predictions; {edge.loss!r} reads other features. "
                    f"Use a response loss ({RESPONSE_ONLY})."
                )

    @property
    def trained(self) -> list[str]:
        """The trained nodes, in order."""
        return [name for name, kind in self.nodes.items() if kind == "trained"]

    @property
    def frozen(self) -> list[str]:
        """The frozen nodes, in order."""
        return [name for name, kind in self.nodes.items() if kind == "frozen"]

    @property
    def ema(self) -> dict[str, tuple[str, float]]:
        """The EMA nodes, in order: name → (the trained node followed, decay)."""
        return {
            name: (kind["ema"], float(kind.get("decay", EMA_DECAY)))
            for name, kind in self.nodes.items()
            if isinstance(kind, dict)
        }

    def _check_ema(self, name: str, kind: dict) -> None:
        if set(kind) - {"ema", "decay"} or "ema" not in kind:
            raise ValueError(f"node {name!r} is {kind!r}: an EMA node is {{'ema': NODE, 'decay': d}}.")
        if self.nodes.get(kind["ema"]) != "trained":
            raise ValueError(f"EMA node {name!r} follows {kind['ema']!r}, which is not a trained node of the graph.")
        decay = kind.get("decay", EMA_DECAY)
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0.0 <= decay < 1.0):
            raise ValueError(f"EMA node {name!r} has the decay {decay!r}: a number in [0, 1).")

    def to_dict(self) -> dict:
        """The graph as plain data (what :meth:`save` writes).

        Returns:
            ``{"nodes", "edges", "student"}``, each edge as a dict of its fields.
        """
        edges = [dataclasses.asdict(edge) for edge in self.edges]
        return {"nodes": dict(self.nodes), "edges": edges, "student": self.student}

    def save(self, path: str) -> None:
        """Write the graph as JSON (``.json``) or YAML (``.yaml``/``.yml``), readable and editable.

        Args:
            path: The file; YAML when it ends in ``.yaml`` or ``.yml``, else JSON.
        """
        with open(path, "w", encoding="utf-8") as handle:
            if path.endswith((".yaml", ".yml")):
                import yaml

                yaml.safe_dump(self.to_dict(), handle, sort_keys=False)
            else:
                json.dump(self.to_dict(), handle, indent=2)

    @classmethod
    def load(cls, path: str) -> DistillationGraph:
        """Read a graph that :meth:`save` (or a person) wrote.

        Args:
            path: The file; YAML when it ends in ``.yaml`` or ``.yml``, else JSON.

        Returns:
            The graph, checked as its constructor checks it.

        Raises:
            ValueError: the file is not a mapping with ``nodes``, ``edges`` and ``student``, or the graph is refused
                (see :class:`DistillationGraph`).
        """
        with open(path, encoding="utf-8") as handle:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(handle)
            else:
                data = json.load(handle)
        if not isinstance(data, dict) or set(data) != {"nodes", "edges", "student"}:
            raise ValueError(f"{path}: a graph file holds exactly 'nodes', 'edges' and 'student'.")
        return cls(**data)


class LearnedEdgeLoss(DistillationLoss):
    """A learned edge's loss: its response loss per position, and the small network that scores its source's
    prediction per example (the edge's weight is the softmax of the scores over the target's learned edges and
    "none", see :meth:`GraphTeaching.edge_weights`).

    Args:
        loss: The edge's response loss (one that calls a function of :mod:`hf_kd.losses.functional`: ``kl``,
            ``reverse_kl``, ``jsd``, ``tvd``, ``soft_ce``, ``logit_mse``, ...).
        num_classes: The width of the source's prediction (the network's input).
        hidden: The network's hidden units.

    Raises:
        ValueError: a loss that is not computed position by position from the two predictions (``dkd``).
    """

    def __init__(self, loss: DistillationLoss, num_classes: int, hidden: int = SCORER_WIDTH):
        super().__init__()
        # Only a loss whose value is its function's sum over positions can be weighed position by position.
        plain = isinstance(loss, ResponseLoss) and type(loss).forward is ResponseLoss.forward and loss.per_position
        if not plain:
            raise ValueError(
                f"a learned edge weighs its loss position by position; {loss.name!r} is not computed that way: use "
                "kl, reverse_kl, jsd, tvd, soft_ce or logit_mse."
            )
        self.loss, self.name = loss, loss.name
        self.compares_distributions = loss.compares_distributions
        self.scorer = nn.Sequential(nn.Linear(num_classes, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.scorer[-1].weight)  # every source starts at the same weight as "none"
        nn.init.zeros_(self.scorer[-1].bias)

    @property
    def temperature(self) -> float:
        """The edge loss's temperature."""
        return self.loss.temperature

    def score(self, source_logits: torch.Tensor) -> torch.Tensor:
        """The network's score of a source's prediction at each position.

        Args:
            source_logits: The source's (detached) logits, ``…×C``.

        Returns:
            The scores, ``…`` (one per position).
        """
        return self.scorer(torch.log_softmax(source_logits.float(), -1)).squeeze(-1)

    def position_values(self, student, teacher, mask) -> torch.Tensor:
        """The edge loss at every position (0 outside ``mask``).

        Args:
            student: The target's features.
            teacher: The source's detached features.
            mask: The positions that count (None: all).

        Returns:
            The values, one per position.
        """
        loss = self.loss
        return type(loss).function(
            student.logits,
            teacher.dense_logits(),
            temperature=loss.temperature,
            mask=loss.confident_mask(teacher, mask),
            reduction="none",
            **loss.options,
        )

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        return self.loss(student, teacher, mask=mask, labels=labels, sample_index=sample_index)


class EMANode(EMATeacher):
    """A graph node that follows a trained node's weights by their exponential moving average: the mean teacher's
    :class:`~hf_kd.schemes.mean_teacher.EMATeacher` (the same update after every optimizer step, the same
    checkpointing), following one node of the graph instead of the trainer's one student. It predicts without
    dropout (a source like the others).

    Args:
        model: The trained node's model (copied now).
        decay: The EMA decay d in [0, 1), ramped up from 0 over the first steps.
        follows: The trained node's name.
    """

    def __init__(self, model: nn.Module, decay: float, follows: str):
        super().__init__(model, decay, dropout=False)
        self.follows = follows

    def followed(self, trainer) -> nn.Module:
        return trainer.accelerator.unwrap_model(trainer.model).peers[self.follows]

    def describe(self) -> dict:
        return {
            **super().describe(),
            "teacher": f"node {self.follows}'s exponential moving average (decay {self.decay})",
        }


class GraphTeaching(TrainedMembers):
    """The trained nodes of a :class:`DistillationGraph` as a trainer's members; its frozen nodes are the trainer's
    teachers. Each edge is one term of the objective, read by its target from its (detached) source.

    Args:
        graph: The nodes and edges.
        reference: One trained node's model, which tells the task.
    """

    scheme, kind = "graph distillation", "node"
    takes_teachers = True

    def __init__(self, graph: DistillationGraph, reference: nn.Module):
        super().__init__(graph.trained, reference)
        self.graph = graph
        self.edges = {edge.name: edge for edge in graph.edges}

    def setup(self) -> dict:
        """The members' class and names, and the graph (its nodes, edges with their gates, student).

        Returns:
            What a checkpoint records about the graph, compared when a run resumes from it.
        """
        return {**super().setup(), "graph": self.graph.to_dict()}

    def objective(self, args: DistillationConfig) -> Objective:
        specs = [LossSpec(e.loss, float(e.weight), dict(e.options), teacher=e.source) for e in self.graph.edges]
        objective = Objective(specs, list(self.graph.nodes), args)
        # Terms named by their edge (the objective names a loss by the teacher it reads; an edge has two ends).
        terms = [dataclasses.replace(t, name=e.name) for t, e in zip(objective.terms, self.graph.edges)]
        learned = [edge for edge in self.graph.edges if edge.gate == "learned"]
        if learned:
            width = num_classes(self.reference)
            if not width or width < 2:
                raise ValueError(
                    f"learned edges {[edge.name for edge in learned]} score a source by its distribution over the "
                    f"classes; the trained nodes have {width} output(s)."
                )
            terms = [
                dataclasses.replace(term, loss=LearnedEdgeLoss(term.loss, width)) if edge.gate == "learned" else term
                for term, edge in zip(terms, self.graph.edges)
            ]
        # The learned edges' weight networks are loss parts: optimised with the nodes, checkpointed beside them.
        objective.terms, objective.losses = terms, nn.ModuleList(term.loss for term in terms)
        self.learned_losses = {term.name: term.loss for term in terms if isinstance(term.loss, LearnedEdgeLoss)}
        self._weights = None  # (sources, {target: (weights by edge, label likelihood loss)}) of the current batch
        check_logit_width(self.reference, objective.losses)
        return objective

    def edge_weights(self, target: str, sources: dict, labels) -> tuple[dict, torch.Tensor]:
        """The per-position weights of ``target``'s learned edges and their networks' training loss, on one batch.

        Args:
            target: A trained node with learned edges.
            sources: Every node's detached prediction, by name.
            labels: The batch's labels, aligned with the logits' positions (None: unlabeled).

        Returns:
            ``({edge name: π over the positions}, loss)``: ``π`` the softmax over the learned edges and "none";
                ``loss`` the mean over labeled positions of ``−log(Σⱼ πⱼ·pⱼ(y) + π_none/C)`` (0 without labels).
        """
        if self._weights is None or self._weights[0] is not sources:
            self._weights = (sources, {})
        cached = self._weights[1]
        if target not in cached:
            names = [name for name, edge in self.edges.items() if edge.target == target and name in self.learned_losses]
            logits = [sources[self.edges[name].source].dense_logits().detach().float() for name in names]
            scores = [self.learned_losses[name].score(each) for name, each in zip(names, logits)]
            scores.append(torch.zeros_like(scores[0]))  # "none": the label loss alone
            weights = torch.softmax(torch.stack(scores, -1), -1)
            loss = weights.sum() * 0.0  # no labeled position: a zero that still reaches every network
            if labels is not None:
                labeled = labels.ne(-100)
                if labeled.any():
                    target_ids = labels.clamp(min=0).unsqueeze(-1)
                    right = [torch.softmax(each, -1).gather(-1, target_ids).squeeze(-1) for each in logits]
                    right.append(torch.full_like(right[0], 1.0 / logits[0].shape[-1]))
                    likelihood = (weights * torch.stack(right, -1)).sum(-1)
                    loss = -likelihood.clamp(min=1e-12).log()[labeled].mean()
            cached[target] = ({name: weights[..., k] for k, name in enumerate(names)}, loss)
        return cached[target]

    def term_value(self, term, student, teacher, mask, labels, sources):
        edge = self.edges[term.name]
        if edge.gate != "learned":
            return super().term_value(term, student, teacher, mask, labels, sources)
        weights, _ = self.edge_weights(edge.target, sources, labels)
        return (term.loss.position_values(student, teacher, mask) * weights[term.name].detach()).sum()

    def extra_terms(self, member, results, sources):
        if not any(self.edges[name].target == member for name in self.learned_losses):
            return {}
        if self._weights is None or self._weights[0] is not sources:
            return {}  # every edge into the member was skipped in this batch (a cache at evaluation): none weighed
        _, loss = self._weights[1].get(member, (None, None))
        return {} if loss is None else {f"{EDGE_NLL}/{member}": loss}

    def teachers_of(self, member, sources, term):
        edge = self.edges[term.name]
        read = edge.target == member and edge.gate != "cutoff" and edge.source in sources  # absent: a cache at eval
        return [sources[edge.source]] if read else []

    def gate(self, term, sources, labels, progress):
        gate = self.edges[term.name].gate
        if gate == "linear_up":
            return (1.0 if progress is None else progress), None
        if gate == "linear_down":
            return (1.0 if progress is None else 1.0 - progress), None
        if gate == "correct":
            logits = sources[self.edges[term.name].source].dense_logits()  # a cache: its dense form
            if labels is None:
                return 1.0, torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
            return 1.0, logits.argmax(-1).eq(labels) & labels.ne(-100)
        return 1.0, None

    def log_name(self, term, member):
        return f"{term}/{member}" if term == LABEL_TERM else term

    def logged_names(self, objective):
        learned_targets = dict.fromkeys(e.target for e in self.graph.edges if e.gate == "learned")
        return [
            *(f"{LABEL_TERM}/{node}" for node in self.names),
            *objective.names,
            *(f"{EDGE_NLL}/{node}" for node in learned_targets),
        ]

    def logits_alone(self, module, member, inputs):
        plain, _ = split_views(inputs)  # a node alone reads the plain view
        return output_field(module.peers[member](**plain), "logits")

    def model_of(self, module, member):
        return module.peers[member]


class GraphTrainer(CohortTrainer):
    """Trains the trained nodes of ``graph`` together, each learning from its edges; a
    :class:`~hf_kd.DistillationTrainer` whose members are the trained nodes (:class:`GraphTeaching`) and whose
    teachers are the frozen ones. ``save_model(DIR)`` writes every trained node to ``DIR/NODE`` with its own
    ``distillation_config.json`` (its incoming edges) and card.

    Args:
        graph: The nodes and edges.
        models: Each node's model: a model for a trained node; a model, path or
            :class:`~hf_kd.teachers.TeacherSource` (a cache) for a frozen one.
        args: The run's :class:`~hf_kd.DistillationConfig` (its ``losses`` are not read: the edges name theirs).
        **kwargs: What :class:`~hf_kd.DistillationTrainer` takes beside ``model`` and ``teacher_model``.

    Raises:
        TypeError: ``graph`` is not a :class:`DistillationGraph`; a trained node that is not an ``nn.Module``; a
            frozen node that is not a model, a path or a :class:`~hf_kd.teachers.TeacherSource`.
        ValueError: a node without a model or a model without a node; one model for two trained nodes; trained
            nodes of different label sets or kinds; ``push_to_hub`` (push the student's trainer).
    """

    def __init__(self, graph: DistillationGraph, models: dict, args: DistillationConfig | None = None, **kwargs):
        if not isinstance(graph, DistillationGraph):
            raise TypeError(f"graph must be a DistillationGraph, got {type(graph).__name__}.")
        given = sorted(set(graph.nodes) - set(graph.ema))
        if set(models) != set(given):
            raise ValueError(
                f"the graph's trained and frozen nodes {given} and the models given {sorted(models)} differ: give one "
                "model per node (an EMA node is built from the node it follows)."
            )
        if args is not None and args.push_to_hub:
            raise ValueError(_NO_PUSH)
        trained = {name: models[name] for name in graph.trained}
        for name, model in trained.items():
            if not isinstance(model, nn.Module):
                raise TypeError(f"trained node {name!r} must be an nn.Module, got {type(model).__name__}.")
            check_materialized(model, f"node {name!r}")
        if len({id(model) for model in trained.values()}) < len(trained):
            raise ValueError("the same model is given for two trained nodes: give each its own model.")
        widths = {name: num_classes(model) for name, model in trained.items()}
        if len(set(widths.values()) - {None}) > 1:
            raise ValueError(f"the trained nodes' outputs differ in width ({widths}): edges compare predictions.")
        if len({(is_token_level(m), is_causal_lm(m)) for m in trained.values()}) > 1:
            raise ValueError("the trained nodes are of different kinds (sequence vs token outputs, causal or not).")
        frozen = {name: models[name] for name in graph.frozen}
        for name, model in frozen.items():
            if not isinstance(model, (nn.Module, str, TeacherSource)):
                raise TypeError(
                    f"frozen node {name!r} must be a model, a path or a TeacherSource, got {type(model).__name__}."
                )
        followers = {name: EMANode(trained[node], decay, node) for name, (node, decay) in graph.ema.items()}
        teachers = {**frozen, **followers}  # the graph's sources beside the members, in a dict by node name
        members = GraphTeaching(graph, next(iter(trained.values())))
        super().__init__(
            model=PeerCohort(trained), teacher_model=teachers or None, args=args, members=members, **kwargs
        )
        self.graph, self.no_push = graph, _NO_PUSH
        self.peer_metrics: dict[str, dict] = {}
        self.best_peer: str | None = None

    def teachers_of_peer(self, name: str) -> dict:
        incoming = [edge for edge in self.graph.edges if edge.target == name and edge.gate != "cutoff"]
        sources = list(dict.fromkeys(edge.source for edge in incoming))
        classes, parameters = [], 0
        for source in sources:
            if source in self.peers:
                classes.append(type(self.peers[source]).__name__)
                parameters += sum(p.numel() for p in self.peers[source].parameters())
            else:
                described = self.teachers[source].describe()
                classes.append(str(described.get("teacher_class")))
                parameters += described.get("teacher_parameters") or 0
        return {
            "teacher": f"graph edges {', '.join(e.name for e in incoming)}" if incoming else "none (labels only)",
            "teacher_class": ", ".join(dict.fromkeys(classes)),
            "teacher_parameters": parameters,
        }

    def peer_stage(self, name: str) -> dict:
        return {"scheme": "graph", "node": name, "graph": self.graph.to_dict()}


_NO_PUSH = (
    "a GraphTrainer does not push (push_to_hub=False): save_model() writes every trained node to OUTPUT_DIR/NODE "
    "with its weights, distillation_config.json and card; run_scheme('graph', ...) with push_to_hub pushes the "
    "graph's student."
)


@dataclass
class GraphConfig(SchemeConfig):
    """Settings of a distillation graph (Minami et al. 2020). The graph file's trained nodes are fresh students
    (``make_student(k)`` for the k-th), its frozen ones the teachers given (one: any frozen node name; several: by
    name); without a file, :func:`default_graph`. With ``graph_search``, that graph's edges are searched first
    (:func:`~hf_kd.schemes.graph_search.search_graph`: gate, loss and weight of each edge, compared on the student
    node's metric on ``eval_dataset``), the best graph is written to ``OUTPUT_DIR/searched_graph.yaml``, and that
    graph is the one trained.

    Args:
        graph: graph: the graph file (JSON or YAML: nodes, edges, student); default: every teacher teaching two
            trained nodes, student and peer, which also teach each other.
        graph_search: graph: trials of a search over the graph's edges (gate, loss, weight; Optuna through
            Trainer.hyperparameter_search, the search extra), compared on the student node's validation metric;
            0: no search.
        search_losses: graph: with --graph_search, the response losses an edge may use besides its own
            (comma-separated).
        search_weights: graph: with --graph_search, the weights an edge may take (comma-separated); default: each
            edge keeps its own.

    Raises:
        ValueError: the graph file does not exist, or holds a graph that is refused (see
            :meth:`DistillationGraph.load`); ``graph_search`` < 0; a search loss that is not a response loss or a
            search weight that is not a number >= 0.
    """

    graph: str | None = field(
        default=None,
        metadata={
            "help": "graph: the graph file (JSON or YAML: nodes, edges, student); default: every teacher teaching "
            "two trained nodes, student and peer, which also teach each other."
        },
    )
    graph_search: int = field(
        default=0,
        metadata={
            "help": "graph: trials of a search over the graph's edges (gate, loss, weight; Optuna through "
            "Trainer.hyperparameter_search, the search extra), compared on the student node's validation metric; "
            "0: no search."
        },
    )
    search_losses: str = field(
        default="kl",
        metadata={
            "help": "graph: with --graph_search, the response losses an edge may use besides its own (comma-separated)."
        },
    )
    search_weights: str | None = field(
        default=None,
        metadata={
            "help": "graph: with --graph_search, the weights an edge may take (comma-separated); default: each edge "
            "keeps its own."
        },
    )

    def __post_init__(self):
        if self.graph is not None:
            if not os.path.isfile(self.graph):
                raise ValueError(f"graph file {self.graph!r} does not exist.")
            DistillationGraph.load(self.graph)  # a bad graph is refused here, before anything loads
        if not isinstance(self.graph_search, int) or self.graph_search < 0:
            raise ValueError(f"graph_search is a number of trials (0: no search), got {self.graph_search!r}.")
        for loss in self.losses_searched:
            probe = get_loss(loss)
            if probe.side_needs("student") != {"logits"} or probe.side_needs("teacher") != {"logits"}:
                raise ValueError(
                    f"search_losses: {loss!r} reads other features; use response losses ({RESPONSE_ONLY})."
                )
        self.weights_searched  # noqa: B018  (refuses a weight that is not a number >= 0)

    @property
    def losses_searched(self) -> tuple[str, ...]:
        """``search_losses`` as a tuple of loss ids."""
        return tuple(loss.strip() for loss in self.search_losses.split(",") if loss.strip())

    @property
    def weights_searched(self) -> tuple[float, ...] | None:
        """``search_weights`` as a tuple of numbers (None: not searched).

        Raises:
            ValueError: an entry that is not a finite number >= 0.
        """
        if self.search_weights is None:
            return None
        weights = []
        for entry in self.search_weights.split(","):
            try:
                weight = float(entry)
            except ValueError:
                weight = float("nan")
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"search_weights: {entry.strip()!r} is not a finite number >= 0.")
            weights.append(weight)
        return tuple(weights)


def default_graph(teachers: list[str]) -> DistillationGraph:
    """Every teacher (frozen) teaching two trained nodes, ``student`` and ``peer``, which teach each other (``kl``,
    gates ``through``): offline KD and mutual learning in one graph.

    Args:
        teachers: The frozen nodes' names.

    Returns:
        The graph, its student ``student``.
    """
    nodes = {**{name: "frozen" for name in teachers}, "student": "trained", "peer": "trained"}
    edges = [GraphEdge(teacher, node) for teacher in teachers for node in ("student", "peer")]
    edges += [GraphEdge("peer", "student"), GraphEdge("student", "peer")]
    return DistillationGraph(nodes, edges, "student")


def graph_distillation(
    graph: DistillationGraph, models: dict, args: DistillationConfig, *, metric: str | None = None, **trainer_kwargs
) -> list[Stage]:
    """Train ``graph``'s trained nodes together in ``args.output_dir`` (resuming from its last checkpoint there),
    measure each on ``eval_dataset`` alone and save every one to ``OUTPUT_DIR/NODE``.

    Args:
        graph: The nodes and edges.
        models: Each node's model (see :class:`GraphTrainer`).
        args: The run's :class:`~hf_kd.DistillationConfig`.
        metric: The ``compute_metrics`` key that marks the best node (default ``args.metric_for_best_model``).
        **trainer_kwargs: What :class:`~hf_kd.DistillationTrainer` takes (``train_dataset``, ``eval_dataset``, ...).

    Returns:
        A stage per trained node (:class:`~hf_kd.schemes.stages.Stage`, ``details["best"]``), then one per EMA node
            (``details["follows"]``), each with the one trainer.
    """
    trainer = GraphTrainer(graph, models, args, **trainer_kwargs)

    def measure(trainer):  # every trained node alone
        rows = trainer.compare_with_teacher()
        trainer.peer_metrics = {
            name: {key: value for key, value in row.items() if key not in ("parameters", "ms_per_example")}
            for name, row in rows.items()
        }
        best = metric or args.metric_for_best_model
        trainer.best_peer = best_member(trainer.peer_metrics, best, args.greater_is_better)

    train_measure_save(trainer, args.output_dir, measure if trainer.eval_dataset is not None else None)
    stages = [
        Stage(
            name,
            os.path.join(args.output_dir, name),
            node,
            trainer.peer_metrics.get(name, {}),
            {"best": name == trainer.best_peer},
            trainer,
        )
        for name, node in trainer.peers.items()
    ]
    for name, (follows, decay) in graph.ema.items():  # each EMA node measured alone and saved as a model of its own
        node = trainer.teachers[name].model
        folder = os.path.join(args.output_dir, name)
        metrics = {}
        if trainer.eval_dataset is not None and trainer.compute_metrics is not None:
            row = evaluate_model(
                node,
                trainer.eval_dataset,
                compute_metrics=trainer.compute_metrics,
                data_collator=trainer.data_collator,
                use_cpu=args.use_cpu,
            )
            metrics = {key: value for key, value in row.items() if key not in ("parameters", "ms_per_example")}
        if args.should_save:
            node.save_pretrained(folder)
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(folder)
        stages.append(Stage(name, folder, node, metrics, {"follows": follows, "decay": decay}, trainer))
    return stages


@register_scheme("graph", config=GraphConfig, teachers="many", stages=True)
def run_graph(config: GraphConfig, args: DistillationConfig, given: SchemeInputs) -> SchemeResult:
    """A distillation graph: trained and frozen nodes, edges with losses, weights and gates, all trained nodes
    together; the graph's student is the result (Minami et al. 2020).

    Args:
        config: The graph file (or none: :func:`default_graph`).
        args: The run's :class:`~hf_kd.DistillationConfig`.
        given: The student builder (one per trained node), data, teachers (the frozen nodes: one, a dict by node
            name, or a list in the graph file's order) and trainer arguments.

    Returns:
        A trainer around the graph's student (the other nodes its frozen teachers), and the other trained nodes'
            stages.

    Raises:
        ValueError: a list of teachers whose length differs from the graph's frozen nodes (a list is read in the
            file's order of frozen nodes; without a file the teachers are ``teacher0``, ``teacher1``, ...); a graph
            without frozen nodes; several frozen nodes and one teacher not named; teachers whose names differ from the
            frozen nodes; ``graph_search`` without ``eval_dataset`` and ``compute_metrics``.
    """
    teachers = given.teacher if isinstance(given.teacher, dict) else None
    listed = list(given.teacher) if isinstance(given.teacher, (list, tuple)) else None
    if config.graph is None:
        if listed is not None:
            teachers = {f"teacher{k}": teacher for k, teacher in enumerate(listed)}
        graph = default_graph(list(teachers) if teachers is not None else ["teacher"])
    else:
        graph = DistillationGraph.load(config.graph)
        if listed is not None:  # the recipes' --teachers A,B: the file's frozen nodes, in its order
            if len(listed) != len(graph.frozen):
                raise ValueError(
                    f"{len(listed)} teachers for the graph's frozen nodes {graph.frozen}: give one per frozen node, "
                    "in the graph file's order (or a dict by node name)."
                )
            teachers = dict(zip(graph.frozen, listed))
    if not graph.frozen:
        raise ValueError(
            f"the graph {config.graph} has no frozen node, so the teacher given would not be read: add a frozen node "
            "for it, or run the graph with GraphTrainer / graph_distillation (no teacher)."
        )
    if teachers is None and len(graph.frozen) > 1:
        raise ValueError(f"the graph has the frozen nodes {graph.frozen}: give the teachers as a dict by those names.")
    models = {name: (teachers[name] if teachers is not None else given.teacher) for name in graph.frozen}
    if teachers is not None and set(teachers) != set(graph.frozen):
        raise ValueError(f"the teachers {sorted(teachers)} and the graph's frozen nodes {graph.frozen} differ.")
    if config.graph_search:
        graph = _searched(graph, config, args, models, given)
    for k, name in enumerate(graph.trained, start=1):
        models[name] = given.make_student(k)
    nodes = graph_distillation(graph, models, dataclasses.replace(args, push_to_hub=False), **given.trainer_kwargs)
    student = next(node for node in nodes if node.name == graph.student)
    others = [node for node in nodes if node is not student]
    from ..trainer import DistillationTrainer

    frozen = {name: node for name, node in models.items() if name in graph.frozen}
    sources = {**frozen, **{node.name: node.model for node in others}}
    trainer = DistillationTrainer(model=student.model, teacher_model=sources or None, args=args, **given.extra)
    summary = student.trainer.peer_summary(student.name)
    trainer.state.global_step = student.trainer.state.global_step
    trainer.stage_metrics, trainer.stage_details = summary.get("metrics"), summary["stage"]
    trainer.scheme_config = config
    return SchemeResult(trainer, others)


def _searched(graph: DistillationGraph, config: GraphConfig, args: DistillationConfig, frozen: dict, given):
    """``graph`` with its edges searched (``config.graph_search`` trials in ``OUTPUT_DIR/graph_search``, no
    checkpoints); the best graph is written to ``OUTPUT_DIR/searched_graph.yaml`` and returned."""
    from .graph_search import search_graph

    trials_args = dataclasses.replace(
        args, output_dir=os.path.join(args.output_dir, "graph_search"), save_strategy="no", push_to_hub=False
    )
    found = search_graph(
        graph,
        lambda name: given.make_student(graph.trained.index(name) + 1),  # as the run below builds the k-th node
        frozen,
        trials_args,
        n_trials=config.graph_search,
        output_file=os.path.join(args.output_dir, "searched_graph.yaml"),
        losses=config.losses_searched,
        weights=config.weights_searched,
        **given.trainer_kwargs,
    )
    return found.graph
