"""Refusals of distillation graphs (hf_kd.schemes.graph): each before anything trains."""

from conftest import classification_data, config, tiny_bert
from refusal_cases import Case

from hf_kd.schemes import run_scheme
from hf_kd.schemes.graph import DistillationGraph, GraphConfig, GraphEdge, GraphTrainer


def _graph(nodes, edges, student="b"):
    return lambda p: DistillationGraph(nodes, edges, student)


def _peer_graph_with_a_teacher(p):
    path = str(p / "peers.json")
    DistillationGraph({"a": "trained", "b": "trained"}, [GraphEdge("a", "b")], "b").save(path)
    return run_scheme(
        GraphConfig(graph=path),
        config(p / "out", max_steps=1),
        teacher=tiny_bert(seed=1),
        make_student=lambda k: tiny_bert(hidden=16, seed=k),
        train_dataset=classification_data(n=8),
    )


def _missing_model(p):
    graph = DistillationGraph({"a": "frozen", "b": "trained"}, [GraphEdge("a", "b")], "b")
    return GraphTrainer(graph, {"b": tiny_bert()}, config(p), train_dataset=classification_data(n=8))


def _search_without_validation(p):
    return run_scheme(
        GraphConfig(graph_search=2),
        config(p / "out", max_steps=1),
        teacher=tiny_bert(seed=1),
        make_student=lambda k: tiny_bert(hidden=16, seed=k),
        train_dataset=classification_data(n=8),
    )


def _search_with_a_learned_edge(p):
    from hf_kd.schemes.graph_search import search_graph

    graph = DistillationGraph({"a": "frozen", "b": "trained"}, [GraphEdge("a", "b", gate="learned")], "b")
    return search_graph(graph, lambda name: tiny_bert(hidden=16), {"a": tiny_bert()}, config(p), n_trials=1,
                        output_file=str(p / "g.yaml"), train_dataset=classification_data(n=8),
                        eval_dataset=classification_data(n=8), compute_metrics=lambda prediction: {})  # fmt: skip


def _learned_dkd_edge(p):
    graph = DistillationGraph({"a": "frozen", "b": "trained"}, [GraphEdge("a", "b", "dkd", gate="learned")], "b")
    return GraphTrainer(graph, {"a": tiny_bert(), "b": tiny_bert(hidden=16)}, config(p))


def _listed_teachers_for_one_frozen_node(p):
    path = str(p / "graph.json")
    DistillationGraph({"a": "frozen", "b": "trained"}, [GraphEdge("a", "b")], "b").save(path)
    return run_scheme(
        GraphConfig(graph=path),
        config(p / "out", max_steps=1),
        teacher=[tiny_bert(seed=1), tiny_bert(seed=2)],
        make_student=lambda k: tiny_bert(hidden=16, seed=k),
        train_dataset=classification_data(n=8),
    )


FROZEN_AND_TRAINED = {"a": "frozen", "b": "trained"}

CASES = [
    Case(
        "graph-edge-into-frozen",
        '`DistillationGraph(..., edges=[GraphEdge("b", "a")])` where `a` is frozen',
        _graph(FROZEN_AND_TRAINED, [GraphEdge("b", "a")]),
        ValueError,
        "teaches the frozen node 'a': only trained nodes learn",
    ),
    Case(
        "graph-unknown-node",
        '`GraphEdge("a", "c")` where the graph has no node `c`',
        _graph(FROZEN_AND_TRAINED, [GraphEdge("a", "c")]),
        ValueError,
        "names the node 'c', which is not among ['a', 'b']",
    ),
    Case(
        "graph-unknown-gate",
        '`GraphEdge("a", "b", gate="sometimes")`',
        _graph(FROZEN_AND_TRAINED, [GraphEdge("a", "b", gate="sometimes")]),
        ValueError,
        "has the gate 'sometimes'; gates: ('through', 'cutoff', 'linear_up', 'linear_down', 'correct', 'learned')",
    ),
    Case(
        "graph-feature-loss",
        '`GraphEdge("a", "b", "hidden_mse")`',
        _graph(FROZEN_AND_TRAINED, [GraphEdge("a", "b", "hidden_mse")]),
        ValueError,
        "a graph's edges exchange predictions; 'hidden_mse' reads other features",
    ),
    Case(
        "graph-duplicate-edge",
        'the same `GraphEdge("a", "b", "kl")` twice',
        _graph(FROZEN_AND_TRAINED, [GraphEdge("a", "b"), GraphEdge("a", "b")]),
        ValueError,
        "is given twice: merge the two into one weight",
    ),
    Case(
        "graph-frozen-student",
        '`DistillationGraph(..., student="a")` where `a` is frozen',
        _graph(FROZEN_AND_TRAINED, [GraphEdge("a", "b")], student="a"),
        ValueError,
        "student='a' must be a trained node",
    ),
    Case(
        "graph-no-edge",
        "`DistillationGraph(nodes, edges=[], ...)`",
        _graph(FROZEN_AND_TRAINED, []),
        ValueError,
        "the graph has no edge: nothing would be distilled",
    ),
    Case(
        "graph-teacher-unread",
        '`run_scheme(GraphConfig(graph="peers.json"), ..., teacher=...)` on a graph without frozen nodes',
        _peer_graph_with_a_teacher,
        ValueError,
        "has no frozen node, so the teacher given would not be read",
    ),
    Case(
        "graph-missing-model",
        "`GraphTrainer(graph, models)` without a model for every node",
        _missing_model,
        ValueError,
        "give one model per node",
    ),
    Case(
        "graph-search-no-validation",
        "`run_scheme(GraphConfig(graph_search=2), ...)` without `eval_dataset` and `compute_metrics`",
        _search_without_validation,
        ValueError,
        "a graph search compares trials on the student node's validation metric: give eval_dataset",
    ),
    Case(
        "graph-search-feature-loss",
        '`GraphConfig(graph_search=4, search_losses="kl,hidden_mse")`',
        lambda p: GraphConfig(graph_search=4, search_losses="kl,hidden_mse"),
        ValueError,
        "search_losses: 'hidden_mse' reads other features",
    ),
    Case(
        "graph-ema-follows-frozen",
        '`DistillationGraph({"a": "frozen", "b": "trained", "m": {"ema": "a"}}, ...)`',
        _graph({"a": "frozen", "b": "trained", "m": {"ema": "a"}}, [GraphEdge("m", "b")]),
        ValueError,
        "EMA node 'm' follows 'a', which is not a trained node of the graph",
    ),
    Case(
        "graph-edge-into-ema",
        '`GraphEdge("b", "m")` where `m` is an EMA node',
        _graph({"b": "trained", "m": {"ema": "b"}}, [GraphEdge("b", "m")]),
        ValueError,
        "teaches the EMA node 'm': only trained nodes learn",
    ),
    Case(
        "graph-ema-decay",
        '`{"ema": "b", "decay": 1.0}` as a node',
        _graph({"b": "trained", "m": {"ema": "b", "decay": 1.0}}, [GraphEdge("m", "b")]),
        ValueError,
        "EMA node 'm' has the decay 1.0: a number in [0, 1)",
    ),
    Case(
        "graph-learned-edge-dkd",
        '`GraphEdge("a", "b", "dkd", gate="learned")`',
        _learned_dkd_edge,
        ValueError,
        "a learned edge weighs its loss position by position; 'dkd' is not computed that way",
    ),
    Case(
        "graph-search-learned-edge",
        '`search_graph(graph, ...)` where an edge has `gate="learned"`',
        _search_with_a_learned_edge,
        ValueError,
        "are learned: a search chooses among fixed gates",
    ),
    Case(
        "graph-search-weights",
        '`GraphConfig(graph_search=4, search_weights="1,heavy")`',
        lambda p: GraphConfig(graph_search=4, search_weights="1,heavy"),
        ValueError,
        "search_weights: 'heavy' is not a finite number >= 0",
    ),
    Case(
        "graph-listed-teachers",
        "`--teachers A,B` (a list) for a graph file with one frozen node",
        _listed_teachers_for_one_frozen_node,
        ValueError,
        "2 teachers for the graph's frozen nodes ['a']: give one per frozen node, in the graph file's order",
    ),
]
