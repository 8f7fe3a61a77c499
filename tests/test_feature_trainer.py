"""Feature-based distillation through DistillationTrainer: BERT and CNN end to end, projectors, hooks, CRD."""

import os

import pytest
import torch
from conftest import classification_data, config, tiny_bert
from datasets import Dataset
from safetensors.torch import load_file
from transformers import ResNetConfig, ResNetForImageClassification

from hf_kd import DistillationTrainer
from hf_kd.data import add_sample_index
from hf_kd.trainer import LOSS_PARTS_NAME


def tiny_resnet(widths, seed):
    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=widths, depths=[1, 1], num_labels=4)
    return ResNetForImageClassification(config)


def image_data(n=16):
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict(
        {
            "pixel_values": torch.rand(n, 1, 16, 16, generator=generator).tolist(),
            "labels": torch.randint(0, 4, (n,), generator=generator).tolist(),
        }
    )


def test_bert_hidden_and_attention_losses_with_projector_checkpoint_and_resume(tmp_path):
    losses = [
        {"name": "kl", "weight": 1.0},
        {"name": "hidden_mse", "weight": 1.0, "projector": "linear"},
        {"name": "attention_kl", "weight": 1.0},
        {"name": "rkd_distance", "pooling": "cls"},
    ]

    def make(output_dir):
        teacher = tiny_bert(hidden=32, layers=4, heads=4, seed=1)
        student = tiny_bert(hidden=16, layers=2, heads=2, seed=2)
        args = config(
            output_dir, losses=losses, max_steps=4, save_strategy="steps", save_steps=2, hard_label_weight=1.0
        )
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data())

    trainer = make(tmp_path / "a")
    assert trainer.distillation_objective.needs("student") == {"logits", "hidden_states", "attentions"}
    assert trainer.model.config._attn_implementation == "eager"
    assert trainer.teacher_model.config._attn_implementation == "eager"
    projector = trainer.distillation_losses[1].projectors
    assert [p.net.in_features for p in projector] == [16, 16] and [p.net.out_features for p in projector] == [32, 32]
    before = [p.net.weight.detach().clone() for p in projector]
    trainer.train()
    assert all(not torch.equal(b, p.net.weight) for b, p in zip(before, projector))  # projectors train
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert {"kl", "hidden_mse", "attention_kl", "rkd_distance", "ce"} <= set(logs[-1])
    # rkd_distance has no weight in the config: its paper's 25 applies.
    last = logs[-1]
    expected = last["ce"] + last["kl"] + last["hidden_mse"] + last["attention_kl"] + 25 * last["rkd_distance"]
    assert last["loss"] == pytest.approx(expected, rel=1e-3)

    checkpoint = tmp_path / "a" / "checkpoint-2"
    loss_parts = load_file(str(checkpoint / LOSS_PARTS_NAME))  # resumable: projector weights are checkpointed
    assert {"1.projectors.0.net.weight", "1.projectors.1.net.bias"} <= set(loss_parts)
    trainer.save_model(str(tmp_path / "student"))
    saved = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert set(saved) == set(trainer.model.state_dict())  # the student only, never the projectors
    assert set(load_file(str(checkpoint / "model.safetensors"))) == set(saved)

    resumed = make(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, msg=key)
    for key, value in trainer.distillation_losses.state_dict().items():  # the projectors resumed too
        torch.testing.assert_close(resumed.distillation_losses.state_dict()[key], value, msg=key)


def test_cnn_feature_maps_through_hooks(tmp_path):
    teacher, student = tiny_resnet([16, 32], seed=1), tiny_resnet([8, 12], seed=2)
    losses = [
        {"name": "hint", "student_module": "resnet.encoder.stages.1", "teacher_module": "resnet.encoder.stages.1"},
        {"name": "at", "weight": 1000.0},
        {"name": "sp", "source": "module:resnet.encoder.stages.0"},
        {"name": "vid", "student_module": "resnet.encoder.stages.0", "teacher_module": "resnet.encoder.stages.0"},
    ]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=image_data(),
        args=config(tmp_path, losses=losses, max_steps=3),
    )
    assert "module:resnet.encoder.stages.1" in trainer.distillation_objective.needs("teacher")
    conv = trainer.distillation_losses[0].projectors[0].net
    assert isinstance(conv, torch.nn.Conv2d) and (conv.in_channels, conv.out_channels) == (12, 32)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in logs) and {"hint", "at", "sp", "vid"} <= set(logs[-1])
    # Hooks live for one forward only: nothing stays registered on either model.
    for model in (student, teacher):
        assert all(not module._forward_hooks for module in model.modules())


def test_crd_reads_sample_indices_and_explains_when_missing(tmp_path):
    def make(data):
        return DistillationTrainer(
            model=tiny_bert(hidden=16, seed=2),
            teacher_model=tiny_bert(seed=1),
            train_dataset=data,
            args=config(tmp_path, losses="kl,crd:0.8:num_negatives=8:pooling=cls", max_steps=2),
        )

    with pytest.raises(ValueError, match="add_sample_index"):
        make(classification_data()).train()
    data = add_sample_index(classification_data())
    trainer = make(data)
    memory = trainer.distillation_losses[1].teacher_memory
    assert memory.shape == (len(data), 128)
    before = memory.clone()
    trainer.train()
    assert (memory != before).any(1).sum() == 16  # 2 steps × 8 rows were written back
    trained = memory.clone()
    metrics = trainer.evaluate(classification_data(n=8))  # held-out rows: no sample_index, in-batch negatives
    assert metrics["eval_crd"] > 0 and torch.equal(memory, trained)  # evaluation never writes the banks


def test_layer_map_past_the_depth_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"pair \[5, 1\] is out of range: the student has layers 0..2"):
        DistillationTrainer(
            model=tiny_bert(seed=2),
            teacher_model=tiny_bert(layers=3, seed=1),
            train_dataset=classification_data(),
            args=config(tmp_path, losses=[{"name": "hidden_mse", "layer_map": [[5, 1]]}]),
        )


def test_width_mismatch_fails_at_construction_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="16 wide and the teacher's 32; set the loss option projector='linear'"):
        DistillationTrainer(
            model=tiny_bert(hidden=16, seed=2),
            teacher_model=tiny_bert(seed=1),
            train_dataset=classification_data(),
            args=config(tmp_path, losses="hidden_mse"),
        )


def test_learned_losses_need_a_train_dataset(tmp_path):
    with pytest.raises(ValueError, match="pass train_dataset"):
        DistillationTrainer(
            model=tiny_bert(seed=2), teacher_model=tiny_bert(seed=1), args=config(tmp_path, losses="vid")
        )


def test_unknown_module_path_lists_real_ones(tmp_path):
    losses = [{"name": "hint", "student_module": "bert.nope", "teacher_module": "bert.pooler"}]
    with pytest.raises(ValueError, match="has no submodule 'bert.nope'.*paths look like"):
        DistillationTrainer(
            model=tiny_bert(seed=2),
            teacher_model=tiny_bert(seed=1),
            train_dataset=classification_data(),
            args=config(tmp_path, losses=losses),
        )


def test_checkpoint_student_loads_without_loss_parts(tmp_path):
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2),
        teacher_model=tiny_bert(seed=1),
        train_dataset=classification_data(),
        args=config(tmp_path, losses="hint,kl", max_steps=1),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    from transformers import BertForSequenceClassification

    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "out"))
    assert set(reloaded.state_dict()) == set(trainer.model.state_dict())
    assert "distillation_config.json" in os.listdir(tmp_path / "out")


def test_bf16_autocast_with_a_bf16_teacher_and_feature_losses(tmp_path):
    losses = "kl,hidden_mse:1.0:projector=linear,attention_kl,rkd_distance,vid,infonce"
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2),
        teacher_model=tiny_bert(seed=1),
        train_dataset=classification_data(),
        args=config(tmp_path, max_steps=2, bf16=True, teacher_dtype="bfloat16", losses=losses),
    )
    trainer.train()
    assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16
    assert next(trainer.model.parameters()).dtype == torch.float32  # master weights stay fp32
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(
        torch.isfinite(torch.tensor([e[k] for k in ("loss", "kl", "hidden_mse", "vid", "infonce")])).all() for e in logs
    )


def test_engines_owning_the_optimizer_refuse_fp16_with_learned_loss_parts(tmp_path, monkeypatch):
    # DeepSpeed / FSDP: the projector gets its own optimizer, outside the engine's fp16 loss scaling.
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, layers=2, heads=2, seed=2),
        teacher_model=tiny_bert(hidden=32, layers=4, heads=4, seed=1),
        args=config(tmp_path, losses=[{"name": "hidden_mse", "projector": "linear"}]),
        train_dataset=classification_data(),
    )
    assert trainer.loss_parameters() and trainer.loss_parts.optimizer is None  # one device: a group of the student's
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    monkeypatch.setattr(trainer.args, "fp16", True)
    with pytest.raises(ValueError, match="use bf16"):
        trainer.loss_parts.setup(trainer, trainer.distillation_objective.terms)
