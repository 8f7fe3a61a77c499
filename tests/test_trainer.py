"""DistillationTrainer end to end on tiny models: what it computes, logs, saves and resumes."""

import json
import os

import pytest
import torch
from conftest import classification_data, config, lm_data, seq2seq_data, tiny_bert, tiny_gpt2, tiny_t5, tiny_vit
from datasets import Dataset
from safetensors.torch import load_file
from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

from hf_kd import DistillationTrainer, ModelFeatures, get_loss
from hf_kd.losses import functional as F
from hf_kd.trainer import DISTILLATION_CONFIG_NAME


def teacher_student_kl(trainer, dataset):
    batch = {k: torch.tensor(v) for k, v in dataset[:].items()}
    with torch.no_grad():
        student = trainer.model(**batch).logits
        teacher = trainer.teacher_model(**batch).logits
    return F.forward_kl(student, teacher, temperature=2.0).item()


def test_sequence_classification_student_moves_to_teacher(tmp_path):
    data = classification_data()
    teacher, student = tiny_bert(hidden=32, seed=1), tiny_bert(hidden=16, layers=1, seed=2)
    with torch.no_grad():  # a confident teacher whose predictions depend on the input
        teacher.classifier.weight.mul_(50)
    args = config(tmp_path, max_steps=40, hard_label_weight=0.0, learning_rate=5e-3)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    before = teacher_student_kl(trainer, data)
    teacher_weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    assert teacher_student_kl(trainer, data) < 0.5 * before
    # The teacher never trains.
    assert all(torch.equal(teacher_weights[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_every_term_is_logged_and_summed(tmp_path):
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2),
        teacher_model=tiny_bert(seed=1),
        args=config(tmp_path, losses="kl:1.0,tvd:2.0", hard_label_weight=0.5),
        train_dataset=classification_data(),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all({"ce", "kl", "tvd"} <= set(entry) for entry in logs)
    for entry in logs:
        assert entry["loss"] == pytest.approx(0.5 * entry["ce"] + entry["kl"] + 2.0 * entry["tvd"], rel=1e-3)


def test_convex_alpha_and_unlabeled_batches(tmp_path):
    data = classification_data(n=8)
    teacher, student = tiny_bert(seed=1), tiny_bert(hidden=16, seed=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, alpha=0.25, temperature=3.0), train_dataset=data
    )
    batch = {k: torch.tensor(v) for k, v in data[:].items()}
    total = trainer.compute_loss(student, batch)
    with torch.no_grad():
        out_s, out_t = student(**batch), teacher(**batch)
    kd = F.forward_kl(out_s.logits, out_t.logits, temperature=3.0)
    assert total.item() == pytest.approx(0.75 * out_s.loss.item() + 0.25 * kd.item(), rel=1e-5)
    # Unlabeled rows (-100) are distilled but carry no label loss.
    unlabeled = dict(batch, labels=torch.full((8,), -100))
    assert trainer.compute_loss(student, unlabeled).item() == pytest.approx(0.25 * kd.item(), rel=1e-5)


def test_alpha_zero_trains_on_the_labels_without_running_the_teacher(tmp_path):
    data = classification_data(n=16)
    teacher, student = tiny_bert(seed=1), tiny_bert(hidden=16, seed=2)
    calls = []
    teacher.register_forward_pre_hook(lambda module, args: calls.append(module.training))
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, alpha=0.0), train_dataset=data, eval_dataset=data
    )
    batch = {k: torch.tensor(v) for k, v in data[:8].items()}
    student.train()
    total = trainer.compute_loss(student, batch)
    with torch.no_grad():
        student.eval()  # the tiny BERT has no dropout: train and eval forwards agree
        assert total.item() == pytest.approx(student(**batch).loss.item(), rel=1e-5)
    assert calls == []  # a zero weight needs no teacher outputs (e.g. hard pseudo-labels, CE alone)
    trainer.train()
    assert calls == [] and all("kl" not in entry for entry in trainer.state.log_history if "loss" in entry)
    assert "eval_kl" in trainer.evaluate() and len(calls) > 0  # evaluation still reports the distance to the teacher


def test_image_classification(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "pixel_values": torch.rand(16, 1, 8, 8, generator=generator).tolist(),
            "labels": torch.randint(0, 10, (16,), generator=generator).tolist(),
        }
    )
    trainer = DistillationTrainer(
        model=tiny_vit(hidden=16, layers=1),
        teacher_model=tiny_vit(seed=3),
        args=config(tmp_path, losses="kl:1.0,dkd:0.5"),
        train_dataset=data,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"ce", "kl", "dkd"} <= set(logs[-1]) and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)


def test_causal_lm_token_level_shift_and_mask(tmp_path):
    data = lm_data(n=4)
    teacher, student = tiny_gpt2(seed=1), tiny_gpt2(hidden=16, layers=1, seed=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, alpha=1.0), train_dataset=data
    )
    assert trainer.token_level
    batch = {k: torch.tensor(v) for k, v in data[:].items()}
    with torch.no_grad():
        loss = trainer.compute_loss(student, batch).item()
        s, t = student(**batch).logits, teacher(**batch).logits
    # Reference: logits at t predict token t + 1, so they are scored where labels[t + 1] != -100.
    values, count = 0.0, 0
    for row in range(4):
        for position in range(batch["input_ids"].shape[1] - 1):
            if batch["labels"][row, position + 1] != -100:
                values += F.forward_kl(s[row, position], t[row, position], temperature=2.0).item()
                count += 1
    assert loss == pytest.approx(values / count, rel=1e-5)


def _train_weights(tmp_path, batch_size, accumulation, name):
    data = lm_data(n=16)
    trainer = DistillationTrainer(
        model=tiny_gpt2(hidden=16, layers=1, seed=2),
        teacher_model=tiny_gpt2(seed=1),
        train_dataset=data,
        args=config(
            tmp_path / name,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            losses="kl,tvd",
        ),
    )
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer.state.log_history


@pytest.mark.parametrize(("batch_size", "accumulation"), [(2, 4), (4, 2)])
def test_gradient_accumulation_matches_full_batch(tmp_path, batch_size, accumulation):
    # Rows carry different numbers of supervised tokens, so averaging per micro-batch would differ.
    full, full_logs = _train_weights(tmp_path, 8, 1, "full")
    accumulated, accumulated_logs = _train_weights(tmp_path, batch_size, accumulation, "accumulated")
    for key in full:
        torch.testing.assert_close(accumulated[key], full[key], rtol=1e-4, atol=1e-5)
    for full_entry, accumulated_entry in zip(full_logs[:2], accumulated_logs[:2]):
        for key in ("loss", "ce", "kl", "tvd"):
            assert accumulated_entry[key] == pytest.approx(full_entry[key], rel=1e-4)


def test_logit_only_losses_request_no_hidden_states(tmp_path):
    seen = []
    teacher, student = tiny_bert(seed=1), tiny_bert(hidden=16, seed=2)
    for model in (teacher, student):
        model.register_forward_hook(lambda module, args, kwargs, out: seen.append((kwargs, out)), with_kwargs=True)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, max_steps=1), train_dataset=classification_data(n=8)
    )
    trainer.train()
    assert len(seen) == 2
    for kwargs, out in seen:
        assert not kwargs.get("output_hidden_states") and not kwargs.get("output_attentions")
        assert out.hidden_states is None and out.attentions is None


def test_checkpoints_hold_the_student_only_and_resume_reproduces(tmp_path):
    data = classification_data()

    def make(output_dir):
        return DistillationTrainer(
            model=tiny_bert(hidden=16, layers=1, seed=2),
            teacher_model=tiny_bert(hidden=48, layers=3, seed=1),
            args=config(output_dir, max_steps=6, save_strategy="steps", save_steps=3),
            train_dataset=data,
        )

    uninterrupted = make(tmp_path / "a")
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved = load_file(str(checkpoint / "model.safetensors"))
    student_state = uninterrupted.model.state_dict()
    assert set(saved) == set(student_state)
    assert all(saved[k].shape == student_state[k].shape for k in saved)
    assert sum(v.numel() for v in saved.values()) < sum(p.numel() for p in uninterrupted.teacher_model.parameters())

    resumed = make(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)
    # The per-term logs after resuming match the uninterrupted run's.
    first = {e["step"]: e for e in uninterrupted.state.log_history if "kl" in e}
    second = {e["step"]: e for e in resumed.state.log_history if "kl" in e}
    for step in (4, 5, 6):
        assert second[step]["kl"] == pytest.approx(first[step]["kl"], rel=1e-4)
        assert second[step]["ce"] == pytest.approx(first[step]["ce"], rel=1e-4)


def test_resuming_from_a_checkpoint_of_another_set_up_is_refused_naming_the_differences(tmp_path):
    data = classification_data()

    def make(losses, steps=2):
        return DistillationTrainer(
            model=tiny_bert(hidden=16, layers=1, seed=2),
            teacher_model=tiny_bert(hidden=48, layers=3, seed=1),
            args=config(tmp_path, max_steps=steps, save_strategy="steps", save_steps=2, losses=losses),
            train_dataset=data,
        )

    make("kl").train()
    with open(tmp_path / "checkpoint-2" / "hf_kd_run_setup.json") as handle:
        recorded = json.load(handle)
    assert recorded["losses"] == [{"name": "kl", "weight": 1.0}] and recorded["terms"] == [["kl", "teacher", 1.0]]
    assert recorded["teachers"]["teacher"]["teacher_class"] == "BertForSequenceClassification"
    resumed = make("kl", steps=4)
    resumed.train(resume_from_checkpoint=True)  # the same set-up resumes: steps 3 and 4 only
    assert [entry["step"] for entry in resumed.state.log_history if "kl" in entry] == [1, 2, 3, 4]
    with pytest.raises(ValueError) as refused:
        make("jsd", steps=6).train(resume_from_checkpoint=True)
    assert str(refused.value) == (
        f"{tmp_path / 'checkpoint-4'} was saved by a run with another set-up (losses: [{{'name': 'kl', 'weight': "
        "1.0}] → [{'name': 'jsd', 'weight': 1.0}]; terms: [['kl', 'teacher', 1.0]] → [['jsd', 'teacher', 1.0]]): "
        "resuming from it would continue that run, not "
        f"this one. Remove the checkpoint-N folders of {tmp_path} (or give another output_dir) to start this run "
        "afresh."
    )


def test_a_finished_run_resumed_at_max_steps_mid_epoch_trains_no_further_step(tmp_path):
    def make():  # 32 rows of 8: 4 steps an epoch, so step 2 ends mid-epoch
        return DistillationTrainer(
            model=tiny_bert(hidden=16, layers=1, seed=2),
            teacher_model=tiny_bert(hidden=48, layers=3, seed=1),
            args=config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
            train_dataset=classification_data(),
        )

    finished = make()
    finished.train()
    again = make()
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 2 and not (tmp_path / "checkpoint-3").exists()
    for key, value in finished.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value)


def test_save_model_writes_student_and_distillation_config(tmp_path):
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2),
        teacher_model=tiny_bert(seed=1),
        args=config(tmp_path, losses="kl:1.0,logit_mse:0.2", temperature=4.0),
        train_dataset=classification_data(n=8),
    )
    trainer.save_model(str(tmp_path / "student"))
    files = set(os.listdir(tmp_path / "student"))
    assert {"model.safetensors", "config.json", DISTILLATION_CONFIG_NAME} <= files
    summary = json.loads((tmp_path / "student" / DISTILLATION_CONFIG_NAME).read_text())
    assert summary["temperature"] == 4.0
    assert summary["losses"] == [{"name": "kl", "weight": 1.0}, {"name": "logit_mse", "weight": 0.2}]
    assert summary["teacher_parameters"] > summary["student_parameters"]
    assert summary["engine"] == "1 process (cpu)"


def test_teacher_from_path_in_bfloat16(tmp_path):
    tiny_bert(seed=1).save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2),
        args=config(
            tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher"), teacher_dtype="bfloat16", max_steps=2
        ),
        train_dataset=classification_data(n=16),
    )
    assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16
    trainer.train()
    assert next(trainer.model.parameters()).dtype == torch.float32


def test_peft_lora_student(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert(hidden=32, seed=2)
    student = peft.get_peft_model(
        base,
        peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_bert(seed=1),
        args=config(tmp_path, max_steps=3),
        train_dataset=classification_data(),
    )
    frozen = {k: v.clone() for k, v in student.named_parameters() if not v.requires_grad}
    lora_before = {k: v.clone() for k, v in student.named_parameters() if "lora_B" in k}
    trainer.train()
    assert any(not torch.equal(v, dict(student.named_parameters())[k]) for k, v in lora_before.items())
    assert all(torch.equal(v, dict(student.named_parameters())[k]) for k, v in frozen.items())
    trainer.save_model(str(tmp_path / "adapter"))
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "adapter")


def test_eval_logs_terms_and_metrics(tmp_path):
    from hf_kd.metrics import classification_metrics

    data = classification_data()
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2),
        teacher_model=tiny_bert(seed=1),
        args=config(tmp_path, per_device_eval_batch_size=8),
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=classification_metrics,
    )
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_ce", "eval_kl", "eval_accuracy", "eval_macro_f1"} <= set(metrics)
    # Nothing set: the default convex mix 0.1·CE + 0.9·KL (DEFAULT_ALPHA).
    assert metrics["eval_loss"] == pytest.approx(0.1 * metrics["eval_ce"] + 0.9 * metrics["eval_kl"], rel=1e-3)


def test_padded_batches_through_a_collator(tmp_path):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(), pad_token="[PAD]")
    texts = ["a b c", "a b", "c c c c c", "b"] * 4
    data = Dataset.from_dict({"text": texts, "labels": [0, 1, 2, 1] * 4}).map(
        lambda row: tokenizer(row["text"]), remove_columns=["text"]
    )
    student, teacher = tiny_bert(hidden=16, seed=2), tiny_bert(seed=1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=2),
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["attention_mask"].eq(0).any()  # the collator padded the shorter rows
    trainer.compute_loss(trainer.model, batch)
    padded = trainer.term_log.reduce("train")["kl"]
    # Padding must not change what is distilled: the same term from every row run alone, unpadded.
    kl = get_loss("kl", temperature=2.0)
    expected = 0.0
    with torch.no_grad():
        for row in range(len(batch["input_ids"])):
            length = int(batch["attention_mask"][row].sum())
            alone = {key: batch[key][row : row + 1, :length] for key in ("input_ids", "attention_mask")}
            s, t = ModelFeatures(logits=student(**alone).logits), ModelFeatures(logits=teacher(**alone).logits)
            expected += kl(s, t).item() / len(batch["input_ids"])
    assert padded == pytest.approx(expected, abs=1e-5)
    trainer.train()
    assert [entry["kl"] > 0 for entry in trainer.state.log_history if "kl" in entry] == [True, True]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no teacher"),
        ({"teacher_model": 3}, "nn.Module or a path"),
    ],
)
def test_trainer_errors(tmp_path, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DistillationTrainer(model=tiny_bert(), args=config(tmp_path), **kwargs)


def test_args_must_be_a_distillation_config(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="DistillationConfig"):
        DistillationTrainer(model=tiny_bert(), teacher_model=tiny_bert(), args=TrainingArguments(str(tmp_path)))


def test_seq2seq_token_level_kd_on_decoder_logits(tmp_path):
    data = seq2seq_data()
    student, teacher = tiny_t5(16, 1, seed=2), tiny_t5(32, 2, seed=1)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=data, args=config(tmp_path, alpha=1.0, max_steps=2)
    )
    assert trainer.token_level and not trainer.shift_labels  # decoder logits align with labels, no shift
    batch = {k: torch.tensor(v) for k, v in data[:].items()}
    with torch.no_grad():
        loss = trainer.compute_loss(student, batch).item()
        s, t = student(**batch).logits, teacher(**batch).logits  # both decode the right-shifted labels
    mask = batch["labels"] != -100
    assert loss == pytest.approx(F.forward_kl(s[mask], t[mask], temperature=2.0).item(), rel=1e-5)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["kl"])) for e in trainer.state.log_history if "kl" in e)


def test_a_whisper_student_given_labels_only_decodes_what_its_forward_would(tmp_path):
    """Whisper has no prepare_decoder_input_ids_from_labels: the decoder inputs are its forward's own shift."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    def whisper(seed):
        torch.manual_seed(seed)
        return WhisperForConditionalGeneration(
            WhisperConfig(
                vocab_size=64, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                max_source_positions=16, max_target_positions=16, pad_token_id=0, decoder_start_token_id=1,
                eos_token_id=2, bos_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
            )
        )  # fmt: skip

    student, teacher = whisper(0), whisper(1)
    features = torch.randn(2, 8, 32)
    labels = torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100]])
    args = config(tmp_path, losses="kl", temperature=1.0, hard_label_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    total = trainer.compute_loss(student, {"input_features": features, "labels": labels})
    with torch.no_grad():
        own = student(input_features=features, labels=labels)  # its forward shifts the labels itself
        decoder_input_ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 2]])
        teacher_logits = teacher(input_features=features, decoder_input_ids=decoder_input_ids).logits
    q, log_p = teacher_logits.softmax(-1), own.logits.log_softmax(-1)
    kl = (q * (q.log() - log_p)).sum(-1)[labels != -100].mean()
    assert total.item() == pytest.approx(own.loss.item() + kl.item(), rel=1e-4)


def test_the_student_leaves_training_and_is_saved_with_its_own_key_value_cache(tmp_path):
    # transformers' Trainer sets config.use_cache = args.use_cache (False) on the model it trains; a checkpoint, the
    # saved student and the model after train() keep the student's own setting (True), so they generate with a cache.
    student = tiny_gpt2(seed=2)
    assert student.config.use_cache is True
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_gpt2(seed=1),
        args=config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=lm_data(n=8),
    )
    assert student.config.use_cache is False  # the Trainer's training setting, left alone while training
    trainer.train()
    assert student.config.use_cache is True
    trainer.save_model(str(tmp_path / "student"))
    for folder in ("student", "checkpoint-2"):
        assert json.loads((tmp_path / folder / "config.json").read_text())["use_cache"] is True, folder
