"""Searching a distillation graph (Minami et al. 2020, section 3.3): which gate each edge has, which loss it uses and
how strong it is, chosen by ``transformers.Trainer.hyperparameter_search`` (Optuna backend, the ``search`` extra)
with the student node's validation metric as the objective and a budget of trials.

Every trial trains the graph's trained nodes afresh (the Trainer's ``model_init`` rebuilds them, then reseeds as a
run's set-up does) with the edges the trial chose; the trial is applied to the members' objective in the Trainer's
own hook, ``_hp_search_setup``. The search runs over one trainer whose graph holds every edge once per candidate
loss: a trial gives the chosen loss the chosen gate (and weight) and cuts the others off, so the objective, its
logged names and the loss modules stay the same across trials. The best trial's graph is written as the file
``DistillationGraph.load`` reads — ``--scheme graph --graph FILE`` runs it again, to the trial's metric with the same
seed.

    from hf_kd.schemes.graph_search import search_graph

    found = search_graph(graph, make_node, {"teacher": teacher}, args, n_trials=12, output_file="best_graph.yaml",
                         losses=("kl", "jsd"), train_dataset=train, eval_dataset=validation,
                         compute_metrics=accuracy)
    found.graph, found.value   # the best graph (also in best_graph.yaml) and its student's validation accuracy
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import set_seed
from transformers.trainer_utils import BestRun, HPSearchBackend

from ..config import DistillationConfig
from .graph import GATES, DistillationGraph, GraphEdge, GraphTrainer
from .peer_cohort import PeerCohort

SEARCH_GATES = tuple(gate for gate in GATES if gate != "learned")  # a learned edge's network is not a choice


def _pair(edge: GraphEdge) -> str:
    return f"{edge.source}->{edge.target}"


@dataclass
class GraphSearchSpace:
    """What a graph search chooses for every edge of a graph: its gate, its loss and (optionally) its weight.

    Each edge is searched over its own loss and ``losses``; the edge's options (a temperature) go with its own loss
    only, the other losses take the run's defaults. Optuna's parameters are named ``gate:SOURCE->TARGET``,
    ``loss:SOURCE->TARGET`` and ``weight:SOURCE->TARGET``.

    Args:
        losses: The response losses an edge may use besides its own (``kl``, ``jsd``, ``reverse_kl``, ...).
        gates: The gates an edge may take (a subset of ``through``, ``cutoff``, ``linear_up``, ``linear_down``,
            ``correct``; ``learned`` edges train networks of their own, which a trial cannot switch in and out).
        weights: The weights an edge may take; None: each edge keeps its own.

    Raises:
        ValueError: no gate or loss to choose from, an unknown gate or ``learned``, or a weight that is not a finite
            number >= 0.
    """

    losses: tuple[str, ...] = ("kl",)
    gates: tuple[str, ...] = SEARCH_GATES
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        self.losses, self.gates = tuple(self.losses), tuple(self.gates)
        if not self.losses or not self.gates:
            raise ValueError("a graph search needs at least one loss and one gate to choose from.")
        unknown = [gate for gate in self.gates if gate not in SEARCH_GATES]
        if unknown:
            raise ValueError(f"gates {unknown} cannot be searched; the gates a search chooses from are {SEARCH_GATES}.")
        if self.weights is not None:
            self.weights = tuple(self.weights)
            if not self.weights or not all(isinstance(w, (int, float)) and 0 <= w < float("inf") for w in self.weights):
                raise ValueError(f"weights must be finite numbers >= 0, got {self.weights!r}.")

    def losses_of(self, edge: GraphEdge) -> list[str]:
        """The losses ``edge`` may use: its own, then ``losses`` (each once).

        Args:
            edge: An edge of the searched graph.

        Returns:
            The loss ids.
        """
        return list(dict.fromkeys([edge.loss, *self.losses]))

    def every_choice(self, graph: DistillationGraph) -> DistillationGraph:
        """``graph`` with each edge once per loss it may use: the graph a search trains (a trial cuts off all but
        one of each edge's copies).

        Args:
            graph: The graph searched.

        Returns:
            The graph of every choice (refused, as any graph, when a loss is not a response loss).
        """
        edges = [
            GraphEdge(edge.source, edge.target, loss, edge.weight, edge.gate, edge.options if loss == edge.loss else {})
            for edge in graph.edges
            for loss in self.losses_of(edge)
        ]
        return DistillationGraph(dict(graph.nodes), edges, graph.student)

    def sample(self, trial, graph: DistillationGraph) -> dict:
        """One trial's choices for every edge of ``graph``.

        Args:
            trial: An ``optuna.Trial`` (or ``FixedTrial``: the same names give the same values again).
            graph: The graph searched.

        Returns:
            ``{"gate:A->B": ..., "loss:A->B": ..., ["weight:A->B": ...]}`` for every edge.
        """
        params = {}
        for edge in graph.edges:
            pair = _pair(edge)
            params[f"gate:{pair}"] = trial.suggest_categorical(f"gate:{pair}", list(self.gates))
            params[f"loss:{pair}"] = trial.suggest_categorical(f"loss:{pair}", self.losses_of(edge))
            if self.weights is not None:
                params[f"weight:{pair}"] = trial.suggest_categorical(f"weight:{pair}", list(self.weights))
        return params

    def graph_of(self, graph: DistillationGraph, params: dict) -> DistillationGraph:
        """The graph a trial chose: each edge with its chosen loss, gate and weight (a chosen ``cutoff`` stays in
        the graph as an edge that is off, so the file shows what was searched).

        Args:
            graph: The graph searched.
            params: A trial's choices (:meth:`sample`, or ``BestRun.hyperparameters``).

        Returns:
            The chosen graph.

        Raises:
            ValueError: ``params`` misses a choice for an edge of ``graph``.
        """
        edges = []
        for edge in graph.edges:
            pair = _pair(edge)
            missing = [key for key in (f"gate:{pair}", f"loss:{pair}") if key not in params]
            if missing:
                raise ValueError(f"the trial's choices {sorted(params)} miss {missing}.")
            loss = params[f"loss:{pair}"]
            weight = params.get(f"weight:{pair}", edge.weight)
            options = dict(edge.options) if loss == edge.loss else {}
            edges.append(GraphEdge(edge.source, edge.target, loss, weight, params[f"gate:{pair}"], options))
        return DistillationGraph(dict(graph.nodes), edges, graph.student)


class GraphSearchTrainer(GraphTrainer):
    """A :class:`~hf_kd.schemes.graph.GraphTrainer` for ``Trainer.hyperparameter_search``: its ``model_init``
    rebuilds the trained nodes for every trial, and its ``_hp_search_setup`` applies the trial's edges (gates,
    losses, weights) to the members' objective before the Trainer applies the rest of the trial to its arguments.

    Args:
        graph: The graph searched.
        make_node: ``make_node(name)`` builds a fresh model for trained node ``name`` (called in the graph's order
            of trained nodes for every trial).
        frozen: The frozen nodes' models (or paths, caches), by name.
        args: The run's :class:`~hf_kd.DistillationConfig`.
        space: What is searched (:class:`GraphSearchSpace`).
        **kwargs: What :class:`~hf_kd.DistillationTrainer` takes (``train_dataset``, ``eval_dataset``, ...).

    Raises:
        TypeError: ``make_node`` is not callable.
        ValueError: two edges between the same nodes, a ``learned`` edge, an EMA node, or what
            :class:`~hf_kd.schemes.graph.GraphTrainer` refuses.
    """

    def __init__(
        self,
        graph: DistillationGraph,
        make_node: Callable[[str], nn.Module],
        frozen: dict,
        args: DistillationConfig,
        *,
        space: GraphSearchSpace,
        **kwargs,
    ):
        if not callable(make_node):
            raise TypeError(f"make_node must build a trained node's model from its name, got {type(make_node)}.")
        if graph.ema:
            raise ValueError(
                f"EMA nodes {list(graph.ema)} follow the models of one run; a search rebuilds the nodes every trial. "
                "Search the graph without them."
            )
        learned = [edge.name for edge in graph.edges if edge.gate == "learned"]
        if learned:
            raise ValueError(f"edges {learned} are learned: a search chooses among fixed gates; give them another.")
        pairs = [_pair(edge) for edge in graph.edges]
        repeated = sorted({pair for pair in pairs if pairs.count(pair) > 1})
        if repeated:
            raise ValueError(
                f"the searched graph has more than one edge {repeated}: a search chooses each edge's one loss, so "
                "give one edge per source and target."
            )
        self.searched, self.space, self.make_node = graph, space, make_node
        every = space.every_choice(graph)
        models = {**frozen, **{name: make_node(name) for name in graph.trained}}
        super().__init__(every, models, args, **kwargs)
        self.model_init = self.fresh_nodes  # set after the Trainer's set-up, which refuses a model and model_init
        self.use_graph(graph)

    def fresh_nodes(self, trial=None) -> PeerCohort:
        """The trained nodes built afresh (the Trainer's ``model_init``), then the seed set again as a run sets it
        once its models are built, so a trial trains as the chosen graph run alone trains.

        Args:
            trial: The trial (unused: a trial changes edges, not nodes).

        Returns:
            The trained nodes in one :class:`~hf_kd.schemes.peer_cohort.PeerCohort`.
        """
        cohort = PeerCohort({name: self.make_node(name) for name in self.searched.trained})
        set_seed(self.args.seed)
        return cohort

    def use_graph(self, chosen: DistillationGraph) -> None:
        """Train the edges of ``chosen`` (a graph :meth:`GraphSearchSpace.graph_of` gave): its loss of every edge
        with its gate and weight, the edge's other losses cut off.

        Args:
            chosen: The trial's graph.
        """
        picked = {edge.name: edge for edge in chosen.edges}
        edges = [
            picked.get(edge.name, dataclasses.replace(edge, gate="cutoff"))
            for edge in self.space.every_choice(self.searched).edges
        ]
        self.graph = self.members.graph = DistillationGraph(dict(chosen.nodes), edges, chosen.student)
        self.members.edges = {edge.name: edge for edge in edges}
        weights = {edge.name: float(edge.weight) for edge in edges}
        terms = self.distillation_objective.terms
        self.distillation_objective.terms = [dataclasses.replace(term, weight=weights[term.name]) for term in terms]
        self.chosen = chosen

    def _hp_search_setup(self, trial) -> None:
        # The Trainer's hook for a trial (called by train(trial=...) after model_init): the edges first, then the
        # Trainer sets the trial's TrainingArguments (hp_space's keys) and rebuilds its accelerator.
        if self.hp_search_backend is not None and trial is not None:
            if self.hp_search_backend != HPSearchBackend.OPTUNA:
                raise ValueError(f"a graph search runs on the optuna backend, not {self.hp_search_backend.value}.")
            self.use_graph(self.space.graph_of(self.searched, self.space.sample(trial, self.searched)))
        super()._hp_search_setup(trial)


@dataclass
class GraphSearchResult:
    """What :func:`search_graph` found.

    Args:
        graph: The best trial's graph.
        value: Its student node's validation metric.
        best_run: The Trainer's ``BestRun`` (trial number, objective, every chosen parameter).
        path: The file the graph was written to.
        trainer: The :class:`GraphSearchTrainer` that ran the trials.
        trials: Every trial's number, choices and student metric, in order.
    """

    graph: DistillationGraph
    value: float
    best_run: BestRun
    path: str
    trainer: GraphSearchTrainer
    trials: list[dict]


def search_graph(
    graph: DistillationGraph,
    make_node: Callable[[str], nn.Module],
    frozen: dict,
    args: DistillationConfig,
    *,
    n_trials: int,
    output_file: str,
    losses: tuple[str, ...] = ("kl",),
    gates: tuple[str, ...] = SEARCH_GATES,
    weights: tuple[float, ...] | None = None,
    metric: str | None = None,
    hp_space: Callable | None = None,
    **trainer_kwargs,
) -> GraphSearchResult:
    """Search ``graph``'s edges — gate, loss, weight — with ``Trainer.hyperparameter_search`` (Optuna's TPE sampler,
    seeded by ``args.seed``) for the student node's best validation metric, and write the best graph to
    ``output_file``.

    Args:
        graph: The graph searched: its nodes, and its edges (each edge's own loss, gate and weight are choices too).
        make_node: ``make_node(name)`` builds a fresh model for a trained node.
        frozen: The frozen nodes' models (or paths, caches), by name.
        args: The run's :class:`~hf_kd.DistillationConfig` (every trial trains ``max_steps`` with ``seed``).
        n_trials: The budget of trials.
        output_file: Where the best graph goes (YAML for ``.yaml``/``.yml``, else JSON).
        losses: The response losses an edge may use besides its own.
        gates: The gates an edge may take.
        weights: The weights an edge may take (None: its own).
        metric: The ``compute_metrics`` key compared (default ``args.metric_for_best_model``, else ``accuracy``);
            higher is better unless ``args.greater_is_better`` is False or the key ends in ``loss``.
        hp_space: Further ``TrainingArguments`` to search, ``trial → {name: value}`` (e.g. the learning rate), as
            ``Trainer.hyperparameter_search`` takes it.
        **trainer_kwargs: What :class:`~hf_kd.DistillationTrainer` takes: ``train_dataset``, ``eval_dataset`` and
            ``compute_metrics`` are needed.

    Returns:
        The best graph, its metric, the ``BestRun`` and the file.

    Raises:
        ValueError: ``n_trials`` < 1, no ``eval_dataset`` or ``compute_metrics``, or what :class:`GraphSearchSpace`
            and :class:`GraphSearchTrainer` refuse.
        ImportError: optuna is not installed (``pip install 'hf_kd[search]'``).
    """
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a whole number >= 1, got {n_trials!r}.")
    if trainer_kwargs.get("eval_dataset") is None or trainer_kwargs.get("compute_metrics") is None:
        raise ValueError(
            "a graph search compares trials on the student node's validation metric: give eval_dataset (held-out "
            "rows, not the test split) and compute_metrics."
        )
    try:
        import optuna
    except ImportError as error:
        raise ImportError("a graph search runs on Optuna: pip install 'hf_kd[search]'.") from error
    space = GraphSearchSpace(tuple(losses), tuple(gates), None if weights is None else tuple(weights))
    trainer = GraphSearchTrainer(graph, make_node, frozen, args, space=space, **trainer_kwargs)
    metric = (metric or args.metric_for_best_model or "accuracy").removeprefix("eval_")
    higher = args.greater_is_better if args.greater_is_better is not None else not metric.endswith("loss")
    key = f"eval_{graph.student}_{metric}"

    trials: dict[int, dict] = {}

    def student_metric(metrics: dict) -> float:  # after each evaluation of a trial: its last one counts
        if key not in metrics:
            raise ValueError(f"the evaluation gave no {key!r} (its metrics: {sorted(metrics)}): check metric=.")
        trial = trainer._trial
        trials[trial.number] = {"trial": trial.number, "params": dict(trial.params), "value": metrics[key]}
        return metrics[key]

    best = trainer.hyperparameter_search(
        hp_space=hp_space if hp_space is not None else (lambda trial: {}),
        compute_objective=student_metric,
        n_trials=n_trials,
        direction="maximize" if higher else "minimize",
        backend="optuna",
        sampler=optuna.samplers.TPESampler(seed=args.seed),
    )
    found = space.graph_of(graph, best.hyperparameters)
    found.save(output_file)
    return GraphSearchResult(found, best.objective, best, output_file, trainer, [trials[n] for n in sorted(trials)])
