"""Self-distillation through early exits (BYOT): the loss and gradients against the formula (the deepest exit gets no
distillation gradient), exits on BERT, ViT and ResNet through hooks, early stopping at an exit, saving with and
without exits, exact resume, per-exit logs, and the anytime exit report."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import classification_data, config, tiny_bert, tiny_vit
from datasets import Dataset
from transformers import BertForSequenceClassification, ResNetConfig, ResNetForImageClassification

from hf_kd.schemes.self_distillation import (
    EarlyExitModel,
    ExitView,
    SelfDistillationTrainer,
    block_paths,
    exit_report,
    self_distillation,
)


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], num_labels=10)
    return ResNetForImageClassification(config)


def image_data(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {
            "pixel_values": torch.randn(n, 1, 8, 8, generator=generator).tolist(),
            "labels": torch.randint(0, 10, (n,), generator=generator).tolist(),
        }
    ).with_format("torch")


def test_the_deepest_exit_gets_no_distillation_gradient_and_exits_follow_the_formula(tmp_path):
    data = classification_data(n=8)
    early = EarlyExitModel(tiny_bert(layers=3, seed=1), exits_after=[1, 2], hint=True)
    tau, hint_weight = 2.0, 0.5
    trainer = SelfDistillationTrainer(
        early,
        config(tmp_path, losses="kl", temperature=tau, hard_label_weight=1.0),
        hint_weight=hint_weight,
        train_dataset=data,
    )
    batch = {key: torch.tensor(data[:8][key]) for key in ("input_ids", "attention_mask", "labels")}
    total = trainer.compute_loss(trainer.model, dict(batch))
    total.backward()
    head = early.model.classifier
    got = [head.weight.grad.clone(), head.bias.grad.clone()]
    early.zero_grad()

    results = early(**batch)
    final_logits = results["final"][0].logits
    final_features = results["final"][1].hidden_states[-1]
    expected = F.cross_entropy(final_logits, batch["labels"])
    for name in ("exit1", "exit2"):
        logits = results[name][0].logits
        teacher = F.softmax(final_logits.detach() / tau, -1)
        kl = (teacher * (teacher.log() - F.log_softmax(logits / tau, -1))).sum(-1).mean() * tau**2
        hint = F.mse_loss(results[name][1].hidden_states[-1], final_features.detach())
        expected = expected + F.cross_entropy(logits, batch["labels"]) + kl + hint_weight * hint
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    # The model's own head learns from its labels only: the exits read its prediction and features detached.
    own = torch.autograd.grad(
        F.cross_entropy(final_logits, batch["labels"]), [head.weight, head.bias], retain_graph=True
    )
    for g, want in zip(got, own):
        assert torch.allclose(g, want, atol=1e-6)
    # The test can fail: without the detach, exit1's KL would reach the head.
    logits1 = results["exit1"][0].logits
    leaked = (F.softmax(final_logits / tau, -1) * (-F.log_softmax(logits1 / tau, -1))).sum(-1).mean()
    assert torch.autograd.grad(leaked, head.weight, retain_graph=True)[0].abs().sum() > 0


@pytest.mark.parametrize(
    "build, data, paths",
    [
        (lambda: tiny_bert(layers=3), classification_data(n=8), ["bert.encoder.layer.0", "bert.encoder.layer.1"]),
        (lambda: tiny_vit(layers=3), image_data(n=8), ["vit.layers.0", "vit.layers.1"]),
        (tiny_resnet, image_data(n=8), ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]),
    ],
)
def test_exits_attach_by_hooks_and_an_exit_alone_stops_the_model_at_its_block(build, data, paths):
    model = build()
    early = EarlyExitModel(model, exits_after=[1, 2])
    assert list(early.exit_paths.values()) == paths and block_paths(model)[:2] == paths
    batch = {key: torch.as_tensor(data[:8][key]) for key in data.column_names if key != "labels"}
    with torch.no_grad():
        results = early(**batch)
        ran = []
        last_block = model.get_submodule(block_paths(model)[-1])
        handle = last_block.register_forward_hook(lambda *_: ran.append(True))
        alone = early.exit_logits("exit1", batch)
        handle.remove()
    assert ran == []  # the blocks after the exit never ran
    assert torch.allclose(alone, results["exit1"][0].logits, atol=1e-6)
    assert not any(hook for module in model.modules() for hook in module._forward_hooks.values())  # all removed
    view = ExitView(early, "exit1", batch)
    used = sum(p.numel() for p in view.parameters())
    assert used < sum(p.numel() for p in early.parameters()) - sum(p.numel() for p in last_block.parameters()) + 1


def _train(folder, steps, resume=None, save_exits=False, **overrides):
    args = config(
        folder, max_steps=steps, losses="kl", save_strategy="steps", save_steps=3, learning_rate=0.01, **overrides
    )
    early = EarlyExitModel(tiny_bert(layers=3, seed=1), exits_after=[1, 2], bottleneck=8, hint=True)
    trainer = SelfDistillationTrainer(
        early,
        args,
        hint_weight=0.1,
        save_exits=save_exits,
        train_dataset=classification_data(n=24),
        eval_dataset=classification_data(n=16, seed=1),
        compute_metrics=accuracy,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_every_exit_is_logged_and_evaluated_and_resume_is_exact(tmp_path):
    whole = _train(tmp_path / "whole", 6, eval_strategy="steps", eval_steps=3)
    history = whole.state.log_history
    for entry in [entry for entry in history if "loss" in entry]:
        assert {"ce/exit1", "kl/exit1", "hint/exit1", "ce/exit2", "kl/exit2", "hint/exit2", "ce/final"} <= set(entry)
        assert "kl/final" not in entry  # the teacher learns from its labels only
    evaluations = [entry for entry in history if "eval_exit1_accuracy" in entry]
    assert len(evaluations) == 2 and all("eval_final_accuracy" in entry for entry in evaluations)
    assert any("eval_hint/exit2" in entry for entry in history)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert {"model.safetensors", "early_exits.safetensors", "early_exits.json"} <= set(os.listdir(checkpoint))
    resumed = _train(tmp_path / "resumed", 6, resume=str(checkpoint))
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_saving_drops_the_exits_by_default_and_keeps_them_when_asked(tmp_path):
    args = config(tmp_path / "plain", max_steps=3, losses="kl")
    trainer = self_distillation(
        tiny_bert(layers=3, seed=2),
        args,
        exits_after=[1],
        train_dataset=classification_data(n=16),
        eval_dataset=classification_data(n=8, seed=1),
        compute_metrics=accuracy,
    )
    folder = tmp_path / "plain" / "model"
    assert not (folder / "early_exits.json").exists()
    reloaded = BertForSequenceClassification.from_pretrained(folder)
    for a, b in zip(reloaded.state_dict().values(), trainer.student.state_dict().values()):
        assert torch.equal(a, b)
    summary = json.loads((folder / "distillation_config.json").read_text())
    assert summary["stage"]["scheme"] == "self_distillation" and summary["stage"]["exits_saved"] is False
    assert set(summary["stage"]["metrics"]) == {"exit1", "final"}
    assert summary["stage"]["metrics"]["exit1"]["parameters"] < summary["stage"]["metrics"]["final"]["parameters"]
    with pytest.raises(FileNotFoundError, match="holds the model without exits"):
        EarlyExitModel.from_pretrained(str(folder))

    kept = self_distillation(
        tiny_bert(layers=3, seed=2),
        config(tmp_path / "kept", max_steps=3, losses="kl"),
        exits_after=[1, 2],
        exit_bottleneck=8,
        save_exits=True,
        train_dataset=classification_data(n=16),
    )
    early = EarlyExitModel.from_pretrained(str(tmp_path / "kept" / "model"))
    batch = {key: torch.tensor(value) for key, value in classification_data(n=4).to_dict().items() if key != "labels"}
    for member in early.members:
        assert torch.allclose(early.exit_logits(member, batch), kept.early_exit_model.exit_logits(member, batch))


def test_exit_report_charges_each_example_the_exit_it_leaves_at(tmp_path):
    early = EarlyExitModel(tiny_resnet(seed=3), exits_after=[1, 2])
    data = image_data(n=32, seed=4)
    rows = exit_report(early, data, batch_size=16, thresholds=(0.0, 0.3, 1.01))
    assert set(rows) == {"exit1", "exit2", "final", "threshold 0", "threshold 0.3", "threshold 1.01"}
    # Threshold 0: every example leaves at the first exit; above 1: every one reaches the final head.
    assert rows["threshold 0"]["accuracy"] == rows["exit1"]["accuracy"] and rows["threshold 0"]["share exit1"] == 1
    assert (
        rows["threshold 1.01"]["accuracy"] == rows["final"]["accuracy"] and rows["threshold 1.01"]["share final"] == 1
    )
    assert rows["threshold 0"]["ms_per_example"] == pytest.approx(rows["exit1"]["ms_per_example"])
    middle = rows["threshold 0.3"]
    assert sum(middle[f"share {member}"] for member in early.members) == pytest.approx(1.0)
    expected_ms = sum(middle[f"share {member}"] * rows[member]["ms_per_example"] for member in early.members)
    assert middle["ms_per_example"] == pytest.approx(expected_ms, rel=1e-5)
    # Its accuracy by hand: the first exit whose top probability reaches 0.3, else the final head.
    with torch.no_grad():
        inputs = {"pixel_values": data[:32]["pixel_values"]}
        probabilities = [early.exit_logits(member, inputs).softmax(-1) for member in early.members]
    correct = 0
    for row in range(32):
        chosen = next((p for p in probabilities[:-1] if p[row].max() >= 0.3), probabilities[-1])
        correct += int(chosen[row].argmax() == data[:32]["labels"][row])
    assert middle["accuracy"] == pytest.approx(correct / 32)


def test_hint_projectors_no_loss_reads_are_frozen(tmp_path):
    # With hint_weight 0 the projectors of an EarlyExitModel(hint=True) get no gradient; left trainable, DDP would
    # stop on them as unused parameters.
    model = EarlyExitModel(tiny_bert(layers=3), exits_after=[1, 2], hint=True)
    trainer = SelfDistillationTrainer(model, config(tmp_path, max_steps=2), train_dataset=classification_data())
    projectors = [parameter for head in model.exits.values() for parameter in head.project.parameters()]
    assert projectors and not any(parameter.requires_grad for parameter in projectors)
    before = [parameter.detach().clone() for parameter in projectors]
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, projectors))
    # every parameter left trainable takes part in the loss (what DDP checks): one backward reaches them all
    batch = {key: value for key, value in trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))).items()}
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(trainer.model, batch).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_push_to_hub_uploads_what_is_saved_with_save_exits(tmp_path):
    # The push follows save_exits as the save does: here the model with its exits (without them: the row
    # self-distillation-push-exits of the refusal table).
    from conftest import push_to_local_hub

    (commit,) = push_to_local_hub(tmp_path, "self_distillation_push_worker.py", "save_exits").commits
    files = commit["files"]
    assert {"model.safetensors", "config.json", "early_exits.json", "early_exits.safetensors"} <= set(files)
    assert json.loads(files["distillation_config.json"])["stage"]["exits_saved"] is True
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, content in files.items():
        (pulled / name).write_bytes(content)
    from_hub = EarlyExitModel.from_pretrained(str(pulled))
    saved = EarlyExitModel.from_pretrained(str(tmp_path / "out" / "model"))
    batch = {key: torch.tensor(value) for key, value in classification_data(n=4).to_dict().items() if key != "labels"}
    for member in saved.members:
        assert torch.equal(from_hub.exit_logits(member, batch), saved.exit_logits(member, batch))


def test_a_lora_model_with_exits_checkpoints_its_adapter_and_resumes(tmp_path):
    peft = pytest.importorskip("peft")

    def train(folder, steps):
        lora = peft.LoraConfig(
            r=2, target_modules=["query", "value"], init_lora_weights=False, modules_to_save=["classifier"]
        )
        model = peft.get_peft_model(tiny_bert(layers=2, seed=1), lora)
        args = config(folder, max_steps=steps, losses="kl", save_strategy="steps", save_steps=2, learning_rate=0.05)
        return self_distillation(model, args, exits_after=[1], train_dataset=classification_data(n=16))

    whole = train(tmp_path / "whole", 4)
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "whole" / "checkpoint-2")
    # A run killed after its step-2 checkpoint, run again: it resumes there (failed before: no model.safetensors).
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "rerun" / "checkpoint-2")
    resumed = train(tmp_path / "rerun", 4)
    assert resumed.state.global_step == 4
    trained = {k: v for k, v in whole.early_exit_model.named_parameters() if v.requires_grad}
    again = dict(resumed.early_exit_model.named_parameters())
    assert trained and all(torch.allclose(value, again[key], atol=1e-6) for key, value in trained.items())
