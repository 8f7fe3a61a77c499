"""Graph search (issue 28, item 2): a trial's edges are the ones the loss reads; the search writes the best trial's
graph, and that file run again by the scheme reproduces the trial's metric with the same seed."""

import numpy as np
import pytest
import torch
from conftest import classification_data, config, tiny_bert

pytest.importorskip("optuna")
import optuna  # noqa: E402
from transformers.trainer_utils import HPSearchBackend  # noqa: E402

from hf_kd.schemes import run_scheme  # noqa: E402
from hf_kd.schemes.graph import DistillationGraph, GraphConfig, GraphEdge, GraphTrainer  # noqa: E402
from hf_kd.schemes.graph_search import GraphSearchSpace, GraphSearchTrainer, search_graph  # noqa: E402

SEEDS = {"student": 11, "peer": 12}


def make_node(name):
    return tiny_bert(hidden=16, seed=SEEDS[name])


def make_student(k):  # what the scheme calls for its k-th trained node (student, then peer)
    return make_node(["student", "peer"][k - 1])


def accuracy(prediction):
    """Accuracy, and the mean log-probability of the true class: a metric that tells apart runs of equal accuracy."""
    logits, labels = torch.tensor(prediction.predictions), torch.tensor(prediction.label_ids)
    log_likelihood = torch.log_softmax(logits, -1).gather(1, labels[:, None]).mean().item()
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean()),
            "log_likelihood": log_likelihood}  # fmt: skip


def three_nodes():
    edges = [GraphEdge("teacher", "student"), GraphEdge("peer", "student"), GraphEdge("student", "peer")]
    return DistillationGraph({"teacher": "frozen", "student": "trained", "peer": "trained"}, edges, "student")


def test_a_trial_trains_exactly_the_graph_it_chose(tmp_path):
    graph, teacher, data = three_nodes(), tiny_bert(seed=1), classification_data(n=8)
    space = GraphSearchSpace(losses=("kl", "jsd"), weights=(0.5, 2.0))
    searching = GraphSearchTrainer(graph, make_node, {"teacher": teacher}, config(tmp_path / "s"), space=space,
                                   train_dataset=data)  # fmt: skip
    params = {
        "gate:teacher->student": "correct", "loss:teacher->student": "jsd", "weight:teacher->student": 2.0,
        "gate:peer->student": "cutoff", "loss:peer->student": "kl", "weight:peer->student": 0.5,
        "gate:student->peer": "through", "loss:student->peer": "kl", "weight:student->peer": 0.5,
    }  # fmt: skip
    searching.hp_search_backend, searching.hp_space = HPSearchBackend.OPTUNA, lambda trial: {}
    searching._hp_search_setup(optuna.trial.FixedTrial(params))  # what train(trial=...) calls
    chosen = space.graph_of(graph, params)
    assert searching.chosen == chosen and chosen.edges[0] == GraphEdge("teacher", "student", "jsd", 2.0, "correct")
    alone = GraphTrainer(chosen, {"teacher": teacher, "student": make_node("student"), "peer": make_node("peer")},
                         config(tmp_path / "a"), train_dataset=data)  # fmt: skip
    batch = {key: torch.tensor(data[:8][key]) for key in ("input_ids", "attention_mask", "labels")}
    searching.model = searching.fresh_nodes()
    torch.testing.assert_close(
        searching.compute_loss(searching.model, dict(batch)), alone.compute_loss(alone.model, dict(batch))
    )


def test_the_searched_graph_file_reruns_to_its_trial_metric(tmp_path):
    teacher, data, validation = tiny_bert(seed=1), classification_data(n=32), classification_data(n=24, seed=1)
    found = search_graph(
        three_nodes(),
        make_node,
        {"teacher": teacher},
        config(tmp_path / "search", max_steps=4),
        n_trials=3,
        output_file=str(tmp_path / "best.yaml"),
        losses=("kl", "jsd"),
        metric="log_likelihood",
        train_dataset=data,
        eval_dataset=validation,
        compute_metrics=accuracy,
    )
    assert DistillationGraph.load(found.path) == found.graph
    assert found.graph == GraphSearchSpace(("kl", "jsd")).graph_of(three_nodes(), found.best_run.hyperparameters)
    assert set(found.best_run.hyperparameters) == {f"{k}:{e}" for k in ("gate", "loss") for e in
                                                   ("teacher->student", "peer->student", "student->peer")}  # fmt: skip
    result = run_scheme(
        GraphConfig(graph=found.path),
        config(tmp_path / "rerun", max_steps=4),
        teacher=teacher,
        make_student=make_student,
        train_dataset=data,
        eval_dataset=validation,
        compute_metrics=accuracy,
    )
    values = [trial["value"] for trial in found.trials]
    assert found.value == max(values) and len(set(values)) > 1  # the trials differ; the best is the one written
    assert result.trainer.stage_metrics["log_likelihood"] == pytest.approx(found.value, rel=1e-6)


def test_the_scheme_searches_then_trains_the_best_graph(tmp_path):
    data, validation = classification_data(n=16), classification_data(n=16, seed=1)
    result = run_scheme(
        GraphConfig(graph_search=2, search_losses="kl,reverse_kl", search_weights="0.5,1"),
        config(tmp_path, max_steps=2),
        teacher=tiny_bert(seed=1),
        make_student=make_student,
        train_dataset=data,
        eval_dataset=validation,
        compute_metrics=accuracy,
    )
    searched = DistillationGraph.load(str(tmp_path / "searched_graph.yaml"))
    assert result.trainer.stage_details["graph"] == searched.to_dict()
    assert {edge.loss for edge in searched.edges} <= {"kl", "reverse_kl"}
    assert {edge.weight for edge in searched.edges} <= {0.5, 1.0}


def test_a_search_needs_held_out_rows_and_a_metric(tmp_path):
    with pytest.raises(
        ValueError, match="give eval_dataset \\(held-out rows, not the test split\\) and compute_metrics"
    ):
        run_scheme(
            GraphConfig(graph_search=2),
            config(tmp_path, max_steps=1),
            teacher=tiny_bert(seed=1),
            make_student=make_student,
            train_dataset=classification_data(n=8),
        )
