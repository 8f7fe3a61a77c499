"""EMA nodes: a node that follows a trained node's weights by their moving average (the mean teacher's EMATeacher,
reused): its update after a step by hand, its edge equal to the mean teacher's term, saved and measured as a node."""

import copy
import os

import numpy as np
import pytest
import torch
from conftest import classification_data, config, tiny_bert
from test_graph import assert_same, batch_of, loss_and_grads

from hf_kd import DistillationTrainer
from hf_kd.schemes.graph import DistillationGraph, GraphEdge, GraphTrainer, graph_distillation
from hf_kd.schemes.graph_search import search_graph
from hf_kd.schemes.mean_teacher import EMATeacher


def student_and_mean(decay=0.9, loss="kl"):
    nodes = {"student": "trained", "mean": {"ema": "student", "decay": decay}}
    return DistillationGraph(nodes, [GraphEdge("mean", "student", loss)], "student")


def test_an_ema_node_follows_its_node_by_the_mean_teachers_update(tmp_path):
    student = tiny_bert(hidden=16, seed=2)
    start = copy.deepcopy(student)
    trainer = GraphTrainer(
        student_and_mean(0.9), {"student": student}, config(tmp_path, max_steps=1), train_dataset=classification_data()
    )
    trainer.train()
    mean = trainer.teachers["mean"].model
    # After step 1 the decay is min(1 - 1/2, 0.9) = 0.5 (the mean teacher's ramp).
    for averaged, before, after in zip(mean.parameters(), start.parameters(), student.parameters()):
        torch.testing.assert_close(averaged, 0.5 * before + 0.5 * after.detach())
    assert any(not torch.equal(b, a) for b, a in zip(start.parameters(), student.parameters()))


def test_an_edge_from_an_ema_node_is_the_mean_teachers_term(tmp_path):
    data = classification_data(n=8)
    student = tiny_bert(hidden=16, seed=2)
    twin = copy.deepcopy(student)
    args = config(tmp_path, losses="logit_mse", temperature=1.0)
    in_graph = GraphTrainer(student_and_mean(0.99, "logit_mse"), {"student": student}, args, train_dataset=data)
    mean_teacher = DistillationTrainer(
        model=twin, teacher_model=EMATeacher(twin, 0.99, dropout=False), args=args, train_dataset=data
    )
    batch = batch_of(data[:8])
    assert_same(loss_and_grads(in_graph, [student], batch), loss_and_grads(mean_teacher, [twin], batch))


def test_an_ema_node_is_measured_and_saved_beside_the_trained_ones(tmp_path):
    data = classification_data(n=16)
    graph = DistillationGraph(
        {"teacher": "frozen", "student": "trained", "mean": {"ema": "student", "decay": 0.5}},
        [GraphEdge("teacher", "student"), GraphEdge("mean", "student", "jsd")],
        "student",
    )
    graph.save(str(tmp_path / "graph.yaml"))
    assert DistillationGraph.load(str(tmp_path / "graph.yaml")) == graph

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    stages = graph_distillation(
        graph,
        {"teacher": tiny_bert(seed=1), "student": tiny_bert(hidden=16, seed=2)},
        config(tmp_path / "run", max_steps=2),
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=accuracy,
    )
    assert [stage.name for stage in stages] == ["student", "mean"]
    assert stages[1].details == {"follows": "student", "decay": 0.5} and "accuracy" in stages[1].metrics
    assert os.path.exists(tmp_path / "run" / "mean" / "model.safetensors")
    logged = {key for entry in stages[0].trainer.state.log_history for key in entry}
    assert "jsd/mean->student" in logged


@pytest.mark.parametrize(
    ("nodes", "edges", "message"),
    [
        ({"a": "frozen", "b": "trained", "m": {"ema": "a"}}, [("m", "b")], "EMA node 'm' follows 'a', which is not a"),
        ({"b": "trained", "m": {"ema": "b", "decay": 1.0}}, [("m", "b")], "EMA node 'm' has the decay 1.0"),
        ({"b": "trained", "m": {"ema": "b", "rate": 0.9}}, [("m", "b")], "an EMA node is {'ema': NODE, 'decay': d}"),
        ({"b": "trained", "m": {"ema": "b"}}, [("b", "m")], "teaches the EMA node 'm': only trained nodes learn"),
    ],
)
def test_bad_ema_nodes_are_refused(nodes, edges, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{")):
        DistillationGraph(nodes, [GraphEdge(s, t) for s, t in edges], "b")


def test_a_search_refuses_ema_nodes(tmp_path):
    with pytest.raises(ValueError, match=r"EMA nodes \['mean'\] follow the models of one run"):
        search_graph(student_and_mean(), lambda name: tiny_bert(hidden=16), {}, config(tmp_path), n_trials=1,
                     output_file=str(tmp_path / "g.yaml"), train_dataset=classification_data(n=8),
                     eval_dataset=classification_data(n=8), compute_metrics=lambda p: {})  # fmt: skip
