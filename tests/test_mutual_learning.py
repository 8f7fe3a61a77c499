"""Deep mutual learning: each peer's loss and gradients against the formula written out, gradient isolation,
the ensemble variant, per-peer logs and evaluation, saving every peer with its card, exact resume, two processes
against one, and the refusals."""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, classification_data, config, launch, lm_data, run_two_processes, tiny_bert, tiny_gpt2
from transformers import BertForSequenceClassification

from hf_kd.schemes.mutual_learning import MutualLearningTrainer, mutual_learning


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def batch_of(rows):
    return {key: torch.tensor(rows[key]) for key in ("input_ids", "attention_mask", "labels")}


def reference_losses(peers, batch, tau, towards="peers"):
    """Each peer's CE + τ²·KL(teacher ‖ peer) by hand: the teacher is each other peer (averaged), or the mean of
    their softened probabilities; other peers' predictions detached."""
    logits = [peer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits for peer in peers]
    losses = []
    for k, z in enumerate(logits):
        others = [o.detach() for j, o in enumerate(logits) if j != k]
        log_p = F.log_softmax(z / tau, -1)
        if towards == "ensemble":
            teachers = [torch.stack([F.softmax(o / tau, -1) for o in others]).mean(0)]
        else:
            teachers = [F.softmax(o / tau, -1) for o in others]
        kl = sum((q * (q.log() - log_p)).sum(-1).mean() for q in teachers) / len(teachers) * tau**2
        losses.append((F.cross_entropy(z, batch["labels"]), kl))
    return losses


@pytest.mark.parametrize("towards", ["peers", "ensemble"])
def test_each_peer_learns_from_the_others_detached_predictions_only(tmp_path, towards):
    data = classification_data(n=8)
    peers = [tiny_bert(hidden=16, seed=1), tiny_bert(hidden=32, seed=2), tiny_bert(hidden=16, layers=1, seed=3)]
    trainer = MutualLearningTrainer(
        peers,
        config(tmp_path, losses="kl", temperature=2.0, hard_label_weight=1.0),
        towards=towards,
        train_dataset=data,
    )
    batch = batch_of(data[:8])
    total = trainer.compute_loss(trainer.model, dict(batch))
    total.backward()
    got = {name: [p.grad.clone() for p in peer.parameters()] for name, peer in zip(trainer.peers, peers)}
    for peer in peers:
        peer.zero_grad()

    expected = reference_losses(peers, batch, tau=2.0, towards=towards)
    assert total.item() == pytest.approx(sum(ce.item() + kl.item() for ce, kl in expected), rel=1e-5)
    for k, (name, peer) in enumerate(zip(trainer.peers, peers)):
        ce, kl = expected[k]
        # Peer k's gradients are those of its own loss alone: the other peers' losses read it detached.
        own = torch.autograd.grad(ce + kl, list(peer.parameters()))
        for g, want in zip(got[name], own):
            assert torch.allclose(g, want, atol=1e-6, rtol=1e-4)
    # The test can fail: peer 1's distillation term does depend on peer 0, so without the detach peer 0's
    # gradients would carry it.
    z0, z1 = (peer(input_ids=batch["input_ids"]).logits for peer in peers[:2])
    undetached = (F.softmax(z0 / 2, -1) * (F.log_softmax(z0 / 2, -1) - F.log_softmax(z1 / 2, -1))).sum(-1).mean()
    assert any(g.abs().sum() > 0 for g in torch.autograd.grad(undetached, list(peers[0].parameters())))


def test_every_peer_is_logged_evaluated_saved_with_its_card_and_the_best_marked(tmp_path):
    args = config(tmp_path, max_steps=6, losses="kl", eval_strategy="steps", eval_steps=3, learning_rate=0.01)
    peers = [tiny_bert(hidden=16, seed=1), tiny_bert(hidden=32, seed=2)]
    stages = mutual_learning(
        peers,
        args,
        train_dataset=classification_data(n=32),
        eval_dataset=classification_data(n=16, seed=1),
        compute_metrics=accuracy,
    )
    history = stages[0].trainer.state.log_history
    train_logs = [entry for entry in history if "loss" in entry]
    for name in ("peer0", "peer1"):
        assert all(f"ce/{name}" in entry and f"kl/{name}" in entry for entry in train_logs)
        assert any(f"eval_ce/{name}" in entry and f"eval_kl/{name}" in entry for entry in history)
        assert any(f"eval_{name}_accuracy" in entry for entry in history)
    assert any("eval_accuracy" in entry for entry in history)  # the cohort's mean prediction

    rows = {stage.name: stage.metrics["accuracy"] for stage in stages}
    best = max(rows, key=rows.get)
    assert [stage.details["best"] for stage in stages] == [name == best for name in rows]
    for stage, peer in zip(stages, peers):
        folder = os.path.join(tmp_path, stage.name)
        reloaded = BertForSequenceClassification.from_pretrained(folder)
        for a, b in zip(reloaded.state_dict().values(), peer.state_dict().values()):
            assert torch.equal(a, b)
        summary = json.loads(open(os.path.join(folder, "distillation_config.json")).read())
        assert summary["stage"] == {
            "scheme": "mutual_learning",
            "peer": stage.name,
            "peers": ["peer0", "peer1"],
            "towards": "peers",
            "best_peer": best,
        }
        assert summary["metrics"]["accuracy"] == rows[stage.name]
        assert summary["student_parameters"] == sum(p.numel() for p in peer.parameters())
        card = open(os.path.join(folder, "README.md")).read()
        assert f"{stage.name} (this model)" in card and "deep mutual learning" in card
    assert not os.path.exists(os.path.join(tmp_path, "model.safetensors"))  # no merged cohort file


def _train(folder, steps, resume=None):
    peers = [tiny_bert(hidden=16, seed=1), tiny_bert(hidden=32, layers=1, seed=4)]
    args = config(folder, max_steps=steps, losses="kl", save_strategy="steps", save_steps=3, learning_rate=0.05)
    trainer = MutualLearningTrainer(peers, args, train_dataset=classification_data(n=24))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_restores_every_peer_and_ends_where_an_uninterrupted_run_does(tmp_path):
    whole = _train(tmp_path / "whole", 6)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert sorted(os.listdir(checkpoint / "peer0")) == ["config.json", "distillation_config.json", "model.safetensors"]
    resumed = _train(tmp_path / "resumed", 6, resume=str(checkpoint))
    fresh = _train(tmp_path / "fresh", 3)  # from scratch, not from the checkpoint: far from the whole run
    assert not torch.allclose(fresh.peers["peer0"].classifier.weight, whole.peers["peer0"].classifier.weight)
    for name in whole.peers:
        for a, b in zip(whole.peers[name].parameters(), resumed.peers[name].parameters()):
            assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"whole/peer0 has no model.safetensors: it is not a checkpoint of peer 'peer0'"
    ):
        _train(tmp_path / "other", 6, resume=str(tmp_path / "whole"))


def test_lora_peers_checkpoint_their_adapters_and_resume_where_an_uninterrupted_run_ends(tmp_path):
    peft = pytest.importorskip("peft")

    def train(folder, steps, resume=None):
        lora = peft.LoraConfig(
            r=2, target_modules=["query", "value"], init_lora_weights=False, modules_to_save=["classifier"]
        )
        peers = [peft.get_peft_model(tiny_bert(hidden=16, seed=k), lora) for k in (1, 2)]
        args = config(folder, max_steps=steps, losses="kl", save_strategy="steps", save_steps=2, learning_rate=0.05)
        trainer = MutualLearningTrainer(peers, args, train_dataset=classification_data(n=16))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = train(tmp_path / "whole", 4)
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "whole" / "checkpoint-2" / "peer0")
    resumed = train(tmp_path / "resumed", 4, resume=str(tmp_path / "whole" / "checkpoint-2"))  # failed before
    for name in whole.peers:
        trained = {key: value for key, value in whole.peers[name].named_parameters() if value.requires_grad}
        again = dict(resumed.peers[name].named_parameters())
        assert trained and all(torch.allclose(value, again[key], atol=1e-6) for key, value in trained.items())


def test_causal_lm_peers_with_tied_embeddings_checkpoint_and_resume(tmp_path):
    def train(folder, steps, resume=None):
        peers = [tiny_gpt2(hidden=16, seed=1), tiny_gpt2(hidden=32, seed=2)]
        args = config(folder, max_steps=steps, losses="kl", save_strategy="steps", save_steps=2)
        trainer = MutualLearningTrainer(peers, args, train_dataset=lm_data(n=16))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = train(tmp_path / "whole", 4)
    resumed = train(tmp_path / "resumed", 4, resume=str(tmp_path / "whole" / "checkpoint-2"))
    for name in whole.peers:
        for a, b in zip(whole.peers[name].parameters(), resumed.peers[name].parameters()):
            assert torch.allclose(a, b, atol=1e-6)
    logs = [entry for entry in whole.state.log_history if "loss" in entry]
    assert all(entry["kl/peer0"] > 0 and entry["ce/peer1"] > 0 for entry in logs)


def test_two_processes_match_one_process(tmp_path):
    worker = os.path.join(ROOT, "tests", "distributed", "mutual_learning_worker.py")
    run_two_processes(worker, tmp_path / "two", 4, timeout=300)
    launch(
        [sys.executable, worker, tmp_path / "one", 8],
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
    )
    one, two = (torch.load(tmp_path / run / "result.pt", weights_only=False) for run in ("one", "two"))
    one_logs = [entry for entry in one["logs"] if "loss" in entry]
    two_logs = [entry for entry in two["logs"] if "loss" in entry]
    assert len(one_logs) == len(two_logs) == 4
    for a, b in zip(one_logs, two_logs):
        for key in ("loss", "ce/peer0", "ce/peer1", "kl/peer0", "kl/peer1"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=2e-6), key  # logs keep 6 decimals
    for name in ("peer0", "peer1"):
        for a, b in zip(one["parameters"][name], two["parameters"][name]):
            assert torch.allclose(a, b, atol=1e-5)


def test_towards_names_a_known_variant(tmp_path):
    with pytest.raises(ValueError, match="towards must be one of"):
        MutualLearningTrainer([tiny_bert(), tiny_bert()], config(tmp_path), towards="teacher")


def test_peer_names_are_checked_like_teacher_names(tmp_path):
    with pytest.raises(ValueError, match="peer names must be non-empty strings without '/'"):
        MutualLearningTrainer({"a/b": tiny_bert(), "c": tiny_bert()}, config(tmp_path))
    with pytest.raises(TypeError, match="peers must be a list or dict of models"):
        MutualLearningTrainer(tiny_bert(), config(tmp_path))
