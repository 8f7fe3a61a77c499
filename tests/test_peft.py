"""PEFT students: a LoRA adapter on the teacher's own base as student (one copy of the base), saved as an adapter."""

import copy
import json
import os

import pytest
import torch
from conftest import config, lm_data, tiny_gpt2

from hf_kd import DistillationTrainer
from hf_kd.teachers import AdapterBaseTeacher

peft = pytest.importorskip("peft")


def lora_student(base):
    # init_lora_weights=False: the adapter changes the outputs from the first step, so teacher ≠ student.
    lora = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    return peft.get_peft_model(base, lora)


def test_the_base_with_adapters_off_is_the_teacher(tmp_path):
    data = lm_data(n=16)
    base = tiny_gpt2(hidden=32, seed=1)
    probe = {
        "input_ids": torch.tensor(data["input_ids"][:4]),
        "attention_mask": torch.tensor(data["attention_mask"][:4]),
    }
    with torch.no_grad():
        base_logits = base(**probe).logits
    base_parameters = sum(p.numel() for p in base.parameters())
    student = lora_student(base)
    frozen = {name: p.clone() for name, p in student.named_parameters() if not p.requires_grad}
    teacher = AdapterBaseTeacher(student)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=3, learning_rate=1e-2),
        train_dataset=data,
    )
    assert trainer.teacher_model is None and teacher.student is student  # no second copy of the base
    with torch.no_grad():
        assert not torch.allclose(student(**probe).logits, base_logits)
    trainer.train()
    torch.testing.assert_close(teacher(probe, frozenset({"logits"})).logits, base_logits)
    parameters = dict(student.named_parameters())
    assert all(torch.equal(parameters[name], value) for name, value in frozen.items())
    assert student.training  # the teacher pass put the student back in train mode
    summary = trainer.distillation_summary()
    assert summary["teacher_class"] == "GPT2LMHeadModel (the student's base, adapters off)"
    assert summary["teacher_parameters"] == base_parameters


def test_chunked_loss_from_the_adapter_base_equals_the_plain_one(tmp_path):
    data = lm_data(n=8)
    values = []
    for chunk_size in (None, 5):
        student = lora_student(tiny_gpt2(hidden=32, seed=1))
        trainer = DistillationTrainer(
            model=student,
            teacher_model=AdapterBaseTeacher(student),
            args=config(tmp_path, chunk_size=chunk_size, losses="kl,jsd"),
            train_dataset=data,
        )
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        student.train()
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
        values.append((loss.detach(), grads))
    torch.testing.assert_close(values[0][0], values[1][0])
    for a, b in zip(values[0][1], values[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lora_student_saves_and_reloads_as_an_adapter(tmp_path):
    data = lm_data(n=16)
    base = tiny_gpt2(hidden=32, seed=1)
    pristine = copy.deepcopy(base)
    student = lora_student(base)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=AdapterBaseTeacher(student),
        args=config(tmp_path, max_steps=2),
        train_dataset=data,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_model.safetensors", "adapter_config.json", "distillation_config.json"} <= files
    assert "model.safetensors" not in files  # the adapter only, not the base
    summary = json.loads((tmp_path / "adapter" / "distillation_config.json").read_text())
    assert summary["adapter"]["type"] == "LORA"
    assert summary["adapter"]["parameters"] == sum(p.numel() for p in student.parameters() if p.requires_grad)
    reloaded = peft.PeftModel.from_pretrained(pristine, str(tmp_path / "adapter"))
    probe = torch.tensor(data["input_ids"][:2])
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, student(input_ids=probe).logits)
    trainer.create_model_card(output_dir=str(tmp_path / "adapter"))
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "LORA adapter" in card and "PeftModel.from_pretrained" in card and "library_name: peft" in card


def test_adapter_base_teacher_needs_a_peft_student():
    with pytest.raises(ValueError, match="needs a PEFT student"):
        AdapterBaseTeacher(tiny_gpt2())
