"""Learned edges (Luo et al. 2018): a weight per example from a small network on the source's prediction, a softmax
over the target's learned edges and "none", trained on the labeled rows by the label's likelihood under the mixed
sources; the frozen node reads its own view of each row. Checked against the formulas by hand, with gradients."""

import torch
import torch.nn.functional as F
from conftest import classification_data, config, tiny_bert
from safetensors.torch import load_file

from hf_kd.schemes.graph import DistillationGraph, GraphEdge, GraphTrainer, LearnedEdgeLoss, graph_distillation


def two_view_batch(n=8):
    rows = classification_data(n=n)[:n]
    ids = torch.tensor(rows["input_ids"])
    labels = torch.tensor(rows["labels"])
    labels[[1, 5]] = -100  # two unlabeled rows: weighed, but no evidence for the networks
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "teacher_input_ids": ids.flip(-1),  # the teacher's own view of each row
        "teacher_attention_mask": torch.ones_like(ids),
    }


def learned_graph():
    edges = [
        GraphEdge("teacher", "student", gate="learned"),
        GraphEdge("peer", "student", gate="learned"),
        GraphEdge("student", "peer"),
    ]
    return DistillationGraph({"teacher": "frozen", "student": "trained", "peer": "trained"}, edges, "student")


def kl_rows(student_logits, teacher_logits):
    q = F.softmax(teacher_logits, -1)
    return (q * (q.log() - F.log_softmax(student_logits, -1))).sum(-1)


def mlp(loss: LearnedEdgeLoss, logits):
    first, last = loss.scorer[0], loss.scorer[2]
    return (torch.tanh(F.log_softmax(logits, -1) @ first.weight.T + first.bias) @ last.weight.T + last.bias)[:, 0]


def test_learned_edges_weigh_rows_as_the_formula_says_and_train_their_networks(tmp_path):
    teacher, student, peer = tiny_bert(seed=1), tiny_bert(hidden=16, seed=2), tiny_bert(seed=3)
    with torch.no_grad():  # untrained models predict near-uniformly; sharper sources make the weights differ per row
        teacher.classifier.weight.mul_(50.0)
        peer.classifier.weight.mul_(50.0)
    models = {"teacher": teacher, "student": student, "peer": peer}
    trainer = GraphTrainer(
        learned_graph(), models, config(tmp_path, temperature=1.0, hard_label_weight=1.0), train_dataset=None
    )
    learned = trainer.members.learned_losses
    assert set(learned) == {"kl/teacher->student", "kl/peer->student"}
    torch.manual_seed(7)
    for loss in learned.values():  # away from the zero start, so that the weights differ per row
        torch.nn.init.normal_(loss.scorer[2].weight, std=2.0)
    batch = two_view_batch()
    total = trainer.compute_loss(trainer.model, dict(batch))
    total.backward()

    plain = {key: batch[key] for key in ("input_ids", "attention_mask")}
    s, p = student(**plain).logits, peer(**plain).logits
    with torch.no_grad():
        t = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    labels, labeled = batch["labels"], batch["labels"].ne(-100)
    scores = [mlp(learned["kl/teacher->student"], t), mlp(learned["kl/peer->student"], p.detach())]
    weights = torch.softmax(torch.stack([*scores, torch.zeros(8)], -1), -1)
    assert weights[:, 0].std() > 0.01  # the weights do vary per row
    right = torch.stack(
        [F.softmax(t, -1)[range(8), labels.clamp(min=0)], F.softmax(p.detach(), -1)[range(8), labels.clamp(min=0)]]
        + [torch.full((8,), 1 / 3)],
        -1,
    )
    nll = -(weights * right).sum(-1).log()[labeled].mean()
    edges = (weights[:, 0].detach() * kl_rows(s, t) + weights[:, 1].detach() * kl_rows(s, p.detach())).sum() / 8
    ce_student, ce_peer = F.cross_entropy(s, labels), F.cross_entropy(p, labels)
    expected = ce_student + edges + nll + ce_peer + kl_rows(p, s.detach()).sum() / 8
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)

    # The networks learn from the label likelihood alone (the edge terms read their weights detached).
    network = [param for loss in learned.values() for param in loss.scorer.parameters()]
    got = [param.grad.clone() for param in network]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in got)
    reference = torch.autograd.grad(nll, network)
    for mine, theirs in zip(got, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)


def test_a_run_with_learned_edges_trains_their_networks_and_logs_their_loss(tmp_path):
    data = classification_data(n=16)
    data = data.add_column("teacher_input_ids", [list(reversed(row)) for row in data["input_ids"]])
    data = data.add_column("teacher_attention_mask", data["attention_mask"])
    models = {"teacher": tiny_bert(seed=1), "student": tiny_bert(hidden=16, seed=2), "peer": tiny_bert(seed=3)}
    args = config(tmp_path, max_steps=3, learning_rate=1e-2, save_strategy="steps", save_steps=3)
    trainer = GraphTrainer(learned_graph(), models, args, train_dataset=data)
    before = {n: loss.scorer[2].weight.detach().clone() for n, loss in trainer.members.learned_losses.items()}
    trainer.train()
    for name, loss in trainer.members.learned_losses.items():
        assert not torch.equal(loss.scorer[2].weight, before[name])  # the optimizer steps the networks
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"edge_nll/student", "kl/teacher->student", "kl/peer->student", "kl/student->peer"} <= logged
    assert "edge_nll/peer" not in logged
    parts = load_file(str(tmp_path / "checkpoint-3" / "hf_kd_losses.safetensors"))  # the networks resume with the run
    terms = trainer.distillation_objective.terms  # the objective's loss modules, in the terms' order
    for index, term in enumerate(terms):
        if term.name in trainer.members.learned_losses:
            torch.testing.assert_close(parts[f"{index}.scorer.2.weight"], term.loss.scorer[2].weight.detach())

    nodes = graph_distillation(learned_graph(), {**models, "student": tiny_bert(hidden=16, seed=2)},
                               config(tmp_path / "run", max_steps=1), train_dataset=data)  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "run" / "student").iterdir())
    assert "model.safetensors" in files and not any("loss" in name for name in files)  # no network saved with it
    assert [node.name for node in nodes] == ["student", "peer"]
