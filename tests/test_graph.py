"""Distillation graphs: a graph equal to offline KD, to mutual learning and to a teacher-assistant stage gives those
schemes' losses and gradients exactly; gates against hand-computed values; logged names; the graph file; the scheme
end to end; the refusals."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import classification_data, config, tiny_bert

from hf_kd import DistillationTrainer
from hf_kd.schemes import run_scheme
from hf_kd.schemes.graph import DistillationGraph, GraphConfig, GraphEdge, GraphTrainer, graph_distillation
from hf_kd.schemes.mutual_learning import MutualLearningTrainer


def batch_of(rows):
    return {key: torch.tensor(rows[key]) for key in ("input_ids", "attention_mask", "labels")}


def loss_and_grads(trainer, models, batch):
    """One compute_loss on ``batch`` and the gradients it gives each of ``models`` (then zeroed)."""
    total = trainer.compute_loss(trainer.model, dict(batch))
    total.backward()
    grads = [[p.grad.clone() for p in model.parameters()] for model in models]
    for model in models:
        model.zero_grad()
    return total.detach(), grads


def assert_same(got, expected):
    (total, grads), (total_ref, grads_ref) = got, expected
    torch.testing.assert_close(total, total_ref, rtol=1e-6, atol=1e-7)
    for mine, theirs in zip(grads, grads_ref):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_frozen_node_teaching_a_trained_one_is_offline_kd(tmp_path, temperature):
    data = classification_data(n=8)
    teacher, student = tiny_bert(seed=1), tiny_bert(hidden=16, seed=2)
    twin = copy.deepcopy(student)
    args = config(tmp_path, losses="kl", temperature=temperature)
    graph = DistillationGraph({"teacher": "frozen", "student": "trained"}, [GraphEdge("teacher", "student")], "student")
    in_graph = GraphTrainer(graph, {"teacher": teacher, "student": student}, args, train_dataset=data)
    offline = DistillationTrainer(model=twin, teacher_model=copy.deepcopy(teacher), args=args, train_dataset=data)
    batch = batch_of(data[:8])
    assert_same(loss_and_grads(in_graph, [student], batch), loss_and_grads(offline, [twin], batch))


@pytest.mark.parametrize("gate", ["through", "correct", "learned"])
def test_a_cached_frozen_node_teaches_as_the_live_one_does(tmp_path, gate):
    """A frozen node given as a cache of its outputs (every class, float32) gives the live node's loss and gradients
    to both trained nodes it teaches (the cache is checked against the graph's trained nodes, not the cohort), with
    gates that read the source's predictions too."""
    from hf_kd import TeacherCache, write_teacher_cache
    from hf_kd.data import add_sample_index

    data = add_sample_index(classification_data(n=8))
    teacher, student, peer = tiny_bert(seed=1), tiny_bert(hidden=16, seed=2), tiny_bert(hidden=24, seed=3)
    twins = [copy.deepcopy(student), copy.deepcopy(peer)]
    write_teacher_cache(teacher, data, str(tmp_path / "cache"), top_k=3, dtype="float32", progress=False)
    args = config(tmp_path, losses="kl", temperature=2.0, hard_label_weight=1.0)
    nodes = {"teacher": "frozen", "student": "trained", "peer": "trained"}
    edges = [GraphEdge("teacher", "student", gate=gate), GraphEdge("teacher", "peer"), GraphEdge("peer", "student")]
    graph = DistillationGraph(nodes, edges, "student")
    cached = GraphTrainer(
        graph,
        {"teacher": TeacherCache.load(str(tmp_path / "cache")), "student": student, "peer": peer},
        args,
        train_dataset=data,
    )
    live = GraphTrainer(graph, {"teacher": teacher, "student": twins[0], "peer": twins[1]}, args, train_dataset=data)
    batch = {**batch_of(data[:8]), "sample_index": torch.tensor(data["sample_index"])}
    assert_same(loss_and_grads(cached, [student, peer], batch), loss_and_grads(live, twins, dict(batch)))
    # The cache holds no evaluation rows: evaluation reports the edges between trained nodes and the labels, as the
    # same graph without the frozen node does.
    held_out = classification_data(n=6, seed=1)
    without = GraphTrainer(
        DistillationGraph({"student": "trained", "peer": "trained"}, [GraphEdge("peer", "student")], "student"),
        {"student": twins[0], "peer": twins[1]},
        args,
        train_dataset=data,
    )
    torch.testing.assert_close(
        cached.evaluate(held_out)["eval_loss"], without.evaluate(held_out)["eval_loss"], rtol=1e-6, atol=1e-7
    )


def test_a_finished_assistant_teaching_the_student_is_a_teacher_assistant_stage(tmp_path):
    """teacher → assistant (frozen, trained in the stage before) → student: the student's stage of the chain."""
    from hf_kd.schemes.stages import run_stage

    data = classification_data(n=8)
    assistant, student = tiny_bert(hidden=24, seed=5), tiny_bert(hidden=16, seed=2)
    twin = copy.deepcopy(student)
    args = config(tmp_path / "graph", losses="kl:1.0", temperature=3.0, alpha=0.5, max_steps=1)
    graph = DistillationGraph(
        {"teacher": "frozen", "assistant": "frozen", "student": "trained"},
        [GraphEdge("assistant", "student", "kl", 1.0)],
        "student",
    )
    models = {"teacher": tiny_bert(seed=1), "assistant": assistant, "student": student}
    in_graph = GraphTrainer(graph, models, args, train_dataset=data)
    stage_args = config(tmp_path / "chain", losses="kl:1.0", temperature=3.0, alpha=0.5, max_steps=0)
    stage = run_stage("student", twin, copy.deepcopy(assistant), stage_args, [], train_dataset=data)
    batch = batch_of(data[:8])
    assert_same(loss_and_grads(in_graph, [student], batch), loss_and_grads(stage.trainer, [twin], batch))


def test_trained_nodes_teaching_each_other_are_mutual_learning(tmp_path):
    data = classification_data(n=8)
    peers = [tiny_bert(hidden=16, seed=1), tiny_bert(hidden=32, seed=2), tiny_bert(hidden=16, layers=1, seed=3)]
    twins = [copy.deepcopy(peer) for peer in peers]
    args = config(tmp_path, losses="kl", temperature=2.0)
    names = ["a", "b", "c"]
    edges = [GraphEdge(s, t, "kl", 0.5) for s in names for t in names if s != t]  # DML averages the K-1 others
    graph = DistillationGraph(dict.fromkeys(names, "trained"), edges, "a")
    in_graph = GraphTrainer(graph, dict(zip(names, peers)), args, train_dataset=data)
    mutual = MutualLearningTrainer(dict(zip(names, twins)), args, train_dataset=data)
    batch = batch_of(data[:8])
    assert_same(loss_and_grads(in_graph, peers, batch), loss_and_grads(mutual, twins, batch))


def kl_rows(student_logits, teacher_logits, tau=1.0):
    """Per-row τ²·KL(teacher ‖ student)."""
    q = F.softmax(teacher_logits / tau, -1)
    return (q * (q.log() - F.log_softmax(student_logits / tau, -1))).sum(-1) * tau**2


@pytest.mark.parametrize("gate", ["through", "cutoff", "linear_up", "linear_down", "correct"])
def test_gates_scale_the_edge_as_the_paper_defines_them(tmp_path, gate):
    data = classification_data(n=8)
    teacher, student = tiny_bert(seed=1), tiny_bert(hidden=16, seed=2)
    graph = DistillationGraph(
        {"teacher": "frozen", "student": "trained"}, [GraphEdge("teacher", "student", gate=gate)], "student"
    )
    trainer = GraphTrainer(
        graph,
        {"teacher": teacher, "student": student},
        config(tmp_path, max_steps=4, hard_label_weight=1.0),
        train_dataset=data,
    )
    trainer.state.global_step, trainer.state.max_steps = 1, 4  # a quarter of training done
    batch = batch_of(data[:8])
    total = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
        s, t = student(**inputs).logits, teacher(**inputs).logits
        ce = F.cross_entropy(s, batch["labels"])
        rows = kl_rows(s, t)
    scale = {"through": 1.0, "cutoff": 0.0, "linear_up": 0.25, "linear_down": 0.75, "correct": 1.0}[gate]
    keep = t.argmax(-1).eq(batch["labels"]) if gate == "correct" else torch.ones(8, dtype=torch.bool)
    assert gate != "correct" or 0 < keep.sum() < 8  # the case distinguishes the gate
    expected = ce + scale * (rows * keep).sum() / 8
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_every_edge_is_logged_under_loss_source_target_and_every_node_saved(tmp_path):
    data = classification_data(n=16)
    graph = DistillationGraph(
        {"teacher": "frozen", "student": "trained", "peer": "trained"},
        [GraphEdge("teacher", "student"), GraphEdge("peer", "student", "jsd"), GraphEdge("student", "peer")],
        "student",
    )
    models = {"teacher": tiny_bert(seed=1), "student": tiny_bert(hidden=16, seed=2), "peer": tiny_bert(seed=3)}
    args = config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2)
    nodes = graph_distillation(graph, models, args, train_dataset=data, eval_dataset=data)
    trainer = nodes[0].trainer
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"kl/teacher->student", "jsd/peer->student", "kl/student->peer", "ce/student", "ce/peer"} <= logged
    assert {"eval_kl/teacher->student", "eval_ce/peer"} <= logged
    assert [node.name for node in nodes] == ["student", "peer"]
    for node in nodes:
        assert os.path.exists(os.path.join(tmp_path, node.name, "model.safetensors"))
        with open(os.path.join(tmp_path, node.name, "distillation_config.json")) as handle:
            summary = json.load(handle)
        assert summary["stage"]["graph"] == graph.to_dict()
    with open(os.path.join(tmp_path, "student", "distillation_config.json")) as handle:
        assert json.load(handle)["teacher"] == "graph edges kl/teacher->student, jsd/peer->student"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_the_graph_file_reads_back_and_runs_as_the_scheme(tmp_path, suffix):
    graph = DistillationGraph(
        {"teacher": "frozen", "student": "trained", "peer": "trained"},
        [GraphEdge("teacher", "peer", gate="linear_down"), GraphEdge("peer", "student", options={"temperature": 2.0})],
        "student",
    )
    path = str(tmp_path / f"graph{suffix}")
    graph.save(path)
    assert DistillationGraph.load(path) == graph
    data = classification_data(n=16)
    result = run_scheme(
        GraphConfig(graph=path),
        config(tmp_path / "out", max_steps=2),
        teacher=tiny_bert(seed=1),
        make_student=lambda k: tiny_bert(hidden=16, seed=10 + k),
        train_dataset=data,
    )
    assert result.trainer.scheme_config.graph == path
    assert [stage.name for stage in result.stages] == ["peer"]
    assert result.student is not result.stages[0].model
    before = tiny_bert(hidden=16, seed=11).state_dict()
    assert any(not torch.equal(value, before[name]) for name, value in result.student.state_dict().items())


def test_the_default_graph_is_every_teacher_teaching_student_and_peer_who_teach_each_other(tmp_path):
    result = run_scheme(
        "graph",
        config(tmp_path, max_steps=1),
        teacher={"bert": tiny_bert(seed=1), "wide": tiny_bert(hidden=48, seed=4)},
        make_student=lambda k: tiny_bert(hidden=16, seed=10 + k),
        train_dataset=classification_data(n=8),
    )
    graph = result.trainer.stage_details["graph"]
    assert graph["nodes"] == {"bert": "frozen", "wide": "frozen", "student": "trained", "peer": "trained"}
    assert [(e["source"], e["target"]) for e in graph["edges"]] == [
        ("bert", "student"), ("bert", "peer"), ("wide", "student"), ("wide", "peer"), ("peer", "student"),
        ("student", "peer"),
    ]  # fmt: skip


BAD_GRAPHS = [
    ({"a": "learned", "b": "trained"}, [("a", "b")], "b", "node 'a' is 'learned'"),
    ({"a": "frozen", "b": "trained"}, [("a", "c")], "b", "names the node 'c'"),
    ({"a": "frozen", "b": "trained"}, [("b", "a")], "b", "teaches the frozen node 'a'"),
    ({"a": "frozen", "b": "trained"}, [("b", "b")], "b", "goes from a node to itself"),
    ({"a": "frozen", "b": "trained"}, [("a", "b"), ("a", "b")], "b", "is given twice"),
    ({"a": "frozen", "b": "trained"}, [("a", "b")], "a", "student='a' must be a trained node"),
    ({"a": "frozen", "b": "trained"}, [], "b", "the graph has no edge"),
    ({"a": "frozen"}, [], "a", "the graph has no trained node"),
]


@pytest.mark.parametrize(("nodes", "edges", "student", "message"), BAD_GRAPHS)
def test_bad_graphs_are_refused_naming_the_fault(nodes, edges, student, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DistillationGraph(nodes, [GraphEdge(s, t) for s, t in edges], student)


@pytest.mark.parametrize(
    ("edge", "message"),
    [
        (GraphEdge("a", "b", gate="sometimes"), "has the gate 'sometimes'"),
        (GraphEdge("a", "b", weight=-1.0), "has the weight -1.0"),
        (GraphEdge("a", "b", "hidden_mse"), "reads other features"),
    ],
)
def test_bad_edges_are_refused(edge, message):
    with pytest.raises(ValueError, match=message):
        DistillationGraph({"a": "frozen", "b": "trained"}, [edge], "b")


def test_a_graph_without_frozen_nodes_refuses_a_teacher_it_would_not_read(tmp_path):
    path = str(tmp_path / "peers.json")
    DistillationGraph({"a": "trained", "b": "trained"}, [GraphEdge("a", "b")], "b").save(path)
    with pytest.raises(ValueError, match="has no frozen node, so the teacher given would not be read"):
        run_scheme(
            GraphConfig(graph=path),
            config(tmp_path / "out", max_steps=1),
            teacher=tiny_bert(seed=1),
            make_student=lambda k: tiny_bert(hidden=16, seed=k),
            train_dataset=classification_data(n=8),
        )


def test_models_must_match_the_nodes(tmp_path):
    graph = DistillationGraph({"a": "frozen", "b": "trained"}, [GraphEdge("a", "b")], "b")
    with pytest.raises(ValueError, match="give one model per node"):
        GraphTrainer(graph, {"b": tiny_bert()}, config(tmp_path), train_dataset=classification_data(n=8))


def test_a_rerun_resumes_its_own_graph_and_refuses_another_graphs_checkpoints(tmp_path):
    data = classification_data(n=16)

    def run(gate):
        graph = DistillationGraph(
            {"teacher": "frozen", "student": "trained", "peer": "trained"},
            [GraphEdge("teacher", "student"), GraphEdge("peer", "student", gate=gate)],
            "student",
        )
        models = {"teacher": tiny_bert(seed=1), "student": tiny_bert(hidden=16, seed=2), "peer": tiny_bert(seed=3)}
        args = config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
        return graph_distillation(graph, models, args, train_dataset=data)

    first = run("through")
    assert first[0].trainer.state.global_step == 2
    again = run("through")  # the same graph: resumes from its checkpoint-2, nothing left to train
    assert again[0].trainer.state.global_step == 2
    torch.testing.assert_close(again[0].model.state_dict(), first[0].model.state_dict())
    with pytest.raises(ValueError) as refused:
        run("linear_up")  # another graph, same folder: its checkpoint is not this run's
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'checkpoint-2'} was saved by a run with another set-up (members: ")
    assert "'gate': 'through'" in message and "'gate': 'linear_up'" in message
    assert message.endswith(
        f"resuming from it would continue that run, not this one. Remove the checkpoint-N folders of {tmp_path} "
        "(or give another output_dir) to start this run afresh."
    )
