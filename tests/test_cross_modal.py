"""Cross-modal distillation: paired rows with one view per model (hf_kd.views, hf_kd.schemes.cross_modal)."""

from __future__ import annotations

import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForSequenceClassification,
    Wav2Vec2PreTrainedModel,
)

from hf_kd import DistillationConfig
from hf_kd.features import run_model
from hf_kd.recipe_support.baselines import train_plainly
from hf_kd.schemes.cross_modal import CrossModalCollator, cross_modal, min_input_length, paired_views
from hf_kd.views import ViewCollator, pad_rows, split_views

CLASSES, SAMPLES, RATE = 3, 800, 8000
TONES = (300.0, 900.0, 2000.0)  # a class's spoken form: a tone of its own pitch


def speech_student(seed: int, stable_layer_norm: bool = False) -> Wav2Vec2ForSequenceClassification:
    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_feat_extract_layers=2,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer" if stable_layer_norm else "group",
        do_stable_layer_norm=stable_layer_norm,
        classifier_proj_size=32,
        num_labels=CLASSES,
        mask_time_prob=0.0,
        layerdrop=0.0,  # (wav2vec 2.0 skips whole layers in training by default: fewer hidden states some steps)
    )
    return Wav2Vec2ForSequenceClassification(config)


def text_teacher(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=CLASSES,
    )
    return BertForSequenceClassification(config)


def paired_rows(count: int, seed: int, labeled: int | None = None) -> Dataset:
    """Class c: the text has token 3 + c among filler tokens; the audio is a noisy tone of pitch TONES[c]."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, CLASSES, count)
    time = np.arange(SAMPLES) / RATE
    audio, text = [], []
    for cls in classes:
        wave = np.sin(2 * math.pi * TONES[cls] * time + rng.uniform(0, 2 * math.pi)) + 0.3 * rng.normal(size=SAMPLES)
        audio.append(wave.astype(np.float32).tolist())
        tokens = rng.integers(6, 16, 5).tolist()
        tokens[rng.integers(0, 5)] = 3 + int(cls)
        text.append([1, *tokens, 2])
    labels = classes.tolist()
    if labeled is not None:
        labels = [label if index < labeled else -100 for index, label in enumerate(labels)]
    student = Dataset.from_dict({"input_values": audio, "labels": labels})
    return paired_views(student, Dataset.from_dict({"input_ids": text, "attention_mask": [[1] * 7] * count}))


def trained_text_teacher() -> BertForSequenceClassification:
    teacher = text_teacher()
    rows = paired_rows(96, seed=5)
    ids, labels = torch.tensor(rows["teacher_input_ids"]), torch.tensor(rows["labels"])
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(60):
        loss = teacher(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.eval()
    return teacher


def audio_accuracy(student, rows: Dataset) -> float:
    student.eval()
    with torch.no_grad():
        logits = student(input_values=torch.tensor(rows["input_values"])).logits
    return (logits.argmax(-1) == torch.tensor(rows["labels"])).float().mean().item()


def config(tmp_path, steps: int, **overrides) -> DistillationConfig:
    options = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        losses="kl",
        temperature=1.0,
        alpha=0.5,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        logging_steps=10,
    )
    return DistillationConfig(**{**options, **overrides})


def test_each_model_reads_its_own_view_only(tmp_path):
    student, teacher = speech_student(seed=1), text_teacher()
    seen = {"student": [], "teacher": []}
    for side, model in (("student", student), ("teacher", teacher)):
        model.register_forward_pre_hook(
            lambda _module, args, kwargs, side=side: seen[side].append(sorted(kwargs)), with_kwargs=True
        )
    trainer = cross_modal(student, teacher, config(tmp_path, steps=2), train_dataset=paired_rows(32, seed=0))
    trainer.train()
    assert seen["student"] and seen["teacher"]
    for keys in seen["student"]:
        assert "input_values" in keys and not any("input_ids" in key or key.startswith("teacher_") for key in keys)
    for keys in seen["teacher"]:
        assert "input_ids" in keys and "input_values" not in keys and "labels" not in keys


def test_a_speech_student_distilled_from_a_text_teacher_beats_the_same_student_from_scratch(tmp_path):
    teacher = trained_text_teacher()
    held_out = paired_rows(90, seed=9)
    teacher_accuracy = teacher(input_ids=torch.tensor(held_out["teacher_input_ids"])).logits.argmax(-1) == torch.tensor(
        held_out["labels"]
    )
    assert teacher_accuracy.float().mean() > 0.9
    few = paired_rows(192, seed=1, labeled=6)  # 6 labeled clips; the teacher reads the text of all 192
    scratch = speech_student(seed=2)  # the same steps on the 6 labeled clips alone
    labeled = few.select(range(6)).select_columns(["input_values", "labels"])
    train_plainly(scratch, config(tmp_path, steps=60), labeled, output_dir=str(tmp_path / "scratch"))
    distilled = speech_student(seed=2)
    cross_modal(distilled, teacher, config(tmp_path / "distilled", steps=60), train_dataset=few).train()
    scratch_accuracy, distilled_accuracy = audio_accuracy(scratch, held_out), audio_accuracy(distilled, held_out)
    assert distilled_accuracy >= 0.8 and distilled_accuracy > scratch_accuracy + 0.15, (
        scratch_accuracy,
        distilled_accuracy,
    )


def test_relation_losses_compare_pooled_embeddings_across_modalities(tmp_path):
    teacher = trained_text_teacher()
    losses = [{"name": "kl"}, {"name": "rkd_distance", "source": "hidden_states:-1", "pooling": "mean"}]
    trainer = cross_modal(
        speech_student(seed=3),
        teacher,
        config(tmp_path, steps=3, losses=losses, logging_steps=1),
        train_dataset=paired_rows(32, 0),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rkd_distance" in entry]
    assert logged and all(math.isfinite(entry["rkd_distance"]) for entry in logged)


def test_a_speech_encoders_states_are_pooled_over_its_frames_not_its_samples():
    student = speech_student(seed=4, stable_layer_norm=True)
    audio = torch.randn(2, SAMPLES)
    mask = torch.ones(2, SAMPLES, dtype=torch.long)
    mask[1, SAMPLES // 2 :] = 0
    _, features = run_model(student, {"input_values": audio, "attention_mask": mask}, frozenset({"hidden_states"}))
    frames = features.hidden_states[-1].shape[1]
    assert features.attention_mask.shape == (2, frames)
    expected = student._get_feat_extract_output_lengths(torch.tensor([SAMPLES, SAMPLES // 2]))
    assert features.attention_mask.sum(1).tolist() == expected.tolist()


def test_the_collator_pads_each_view_with_its_own_processor():
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, padding_value=0.0, do_normalize=False)
    rows = [
        {"input_values": [0.5] * 10, "labels": 1, "teacher_input_ids": [1, 5, 2], "teacher_attention_mask": [1, 1, 1]},
        {"input_values": [0.5] * 6, "labels": 0, "teacher_input_ids": [1, 2], "teacher_attention_mask": [1, 1]},
    ]
    batch = ViewCollator(lambda r: dict(extractor.pad(r, return_tensors="pt")), lambda r: pad_rows(r, pad_id=0))(rows)
    assert batch["input_values"].shape == (2, 10) and batch["input_values"][1, 6:].abs().sum() == 0
    assert batch["teacher_input_ids"].tolist() == [[1, 5, 2], [1, 2, 0]]
    assert batch["teacher_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]
    student, teacher = split_views(batch)
    assert set(student) == {"input_values", "labels"} and set(teacher) == {"input_ids", "attention_mask"}


def test_bad_paired_data_is_refused_with_the_reason():  # (more in test_bad_inputs.py, listed in docs/refusals.md)
    with pytest.raises(ValueError, match="1 rows in 'input_ids' for the student's 2"):
        paired_views(Dataset.from_dict({"input_values": [[0.0], [0.0]]}), Dataset.from_dict({"input_ids": [[1]]}))
    with pytest.raises(TypeError, match="the teacher's processor must have a pad method"):
        CrossModalCollator(Wav2Vec2FeatureExtractor(), object())


def test_the_shortest_audio_is_one_frame_of_the_students_feature_encoder(tmp_path):
    student = speech_student(seed=1)
    assert min_input_length(student) == 45  # kernels (10, 8), strides (5, 4): (8 - 1)·5 + 10
    assert student._get_feat_extract_output_lengths(torch.tensor([44, 45, 64, 65])).tolist() == [0, 1, 1, 2]
    base = SimpleNamespace(config=Wav2Vec2Config())  # wav2vec 2.0 base: 400 samples, 25 ms at 16 kHz
    assert min_input_length(base) == 400
    assert Wav2Vec2PreTrainedModel._get_feat_extract_output_lengths(base, torch.tensor([399, 400])).tolist() == [0, 1]
    assert min_input_length(text_teacher()) is None
    rows = paired_rows(8, seed=0)
    audio = [wave[:45] for wave in rows["input_values"]]  # every row exactly one frame long: accepted, and trains
    exact = rows.remove_columns("input_values").add_column("input_values", audio)
    trainer = cross_modal(student, text_teacher(), config(tmp_path, steps=1, logging_steps=1), train_dataset=exact)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    audio[2], audio[6] = audio[2][:44], []
    short = rows.remove_columns("input_values").add_column("input_values", audio)
    with pytest.raises(
        ValueError, match=r"row 2 of eval_dataset\['a'\] has 44 samples in 'input_values' \(and 1 more rows\)"
    ):
        cross_modal(student, text_teacher(), config(tmp_path, steps=1), train_dataset=exact, eval_dataset={"a": short})


def test_a_lora_speech_student_learns_from_a_text_teacher(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["projector", "classifier"])
    student = peft.get_peft_model(speech_student(seed=1), lora)
    frozen = {name: p.detach().clone() for name, p in student.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in student.named_parameters() if "lora_B" in name}
    trainer = cross_modal(
        student, text_teacher(), config(tmp_path, steps=3, logging_steps=1), train_dataset=paired_rows(32, 0)
    )
    trainer.train()
    losses = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert len(losses) == 3 and all(math.isfinite(value) for value in losses)
    parameters = dict(student.named_parameters())
    assert all(torch.equal(parameters[name], value) for name, value in frozen.items())  # the base stays as it was
    assert all(not torch.equal(parameters[name], value) for name, value in adapters.items())  # lora_B left 0
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_config.json").exists()
    assert not (tmp_path / "saved" / "model.safetensors").exists()  # the adapter, not a copy of the base


# ---- the recipe ----


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make install adds it)")
def test_cross_modal_speech_recipe_distils_a_text_teacher_into_a_speech_student(tmp_path):
    from test_recipes import run_recipe

    output = run_recipe(
        "cross_modal_speech.py",
        *("--config", "recipes/configs/cross_modal_speech.yaml", "--output_dir", str(tmp_path)),
        *("--num_headlines", "40", "--num_labeled", "10", "--max_steps", "3", "--teacher_steps", "2"),
        *("--per_device_train_batch_size", "4", "--logging_steps", "1"),
    )
    assert "speech student distilled (10 labeled + 86 clips)" in output
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {
        "teacher (MiniLM on the text)",
        "speech student from scratch (10 labeled clips)",
        "speech student distilled (10 labeled + 86 clips)",
    }
    distilled = results["speech student distilled (10 labeled + 86 clips)"]
    assert 0 <= distilled["accuracy"] <= 1 and 0 <= distilled["accuracy_new_voices"] <= 1
    cached = sorted(name.rsplit("-", 1)[0] for name in os.listdir(tmp_path / "data" / "speech"))  # less the digest
    assert cached == sorted(f"{voice}-190wpm-40" for voice in ("en-us", "en-us+f2", "en-gb+f1", "en-gb", "en-us+f4"))
    student = Wav2Vec2ForSequenceClassification.from_pretrained(tmp_path / "student")
    assert student.config.num_labels == 5 and not (tmp_path / "student" / "tokenizer.json").exists()
