"""Teacher and student with different tokenizers: a clear error by default, ULD over aligned positions."""

import pytest
import torch
from conftest import config, tiny_gpt2
from datasets import Dataset
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from hf_kd import DistillationTrainer
from hf_kd.cross_tokenizer import CrossTokenizerCollator, add_teacher_tokenization, aligned_positions
from hf_kd.losses import functional as F


def tokenizer(words, split_digits=False):
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]", *words])}, "[UNK]"))
    splitters = [pre_tokenizers.WhitespaceSplit()]
    if split_digits:
        splitters.append(pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


STUDENT_TOKENIZER = tokenizer([f"w{i}" for i in range(40)])  # one token per word
TEACHER_TOKENIZER = tokenizer(["w", *map(str, range(10))], split_digits=True)  # "w12" -> w, 1, 2


def paired_rows():
    texts = Dataset.from_dict(
        {
            "prompt": ["w1 w2", "w13 w4 w5", "w7", "w30 w31"],
            "completion": ["w3 w14 w15", "w6", "w8 w9 w10 w11", "w32 w3"],
        }
    )
    return add_teacher_tokenization(texts, STUDENT_TOKENIZER, TEACHER_TOKENIZER, max_length=16)


def test_uld_against_a_hand_computed_value():
    student = torch.tensor([[0.7, 0.2, 0.1]]).log()
    teacher = torch.tensor([[0.5, 0.5]]).log()
    # sorted: (0.7, 0.2, 0.1) vs (0.5, 0.5, 0): |0.2| + |0.3| + |0.1|
    assert F.uld(student, teacher).item() == pytest.approx(0.6)
    shuffled = student[:, [2, 0, 1]]
    assert F.uld(shuffled, teacher).item() == pytest.approx(0.6)  # token identity does not matter
    assert F.uld(student, student[:, [1, 2, 0]]).item() == pytest.approx(0.0, abs=1e-7)


def test_positions_align_in_order_up_to_the_shorter_side():
    student = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    teacher = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    keep_s, keep_t = aligned_positions(student, teacher)
    assert keep_s.long().tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert keep_t.long().tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]]


def test_rows_carry_both_tokenizations():
    rows = paired_rows()
    row = rows[1]  # "w13 w4 w5" + "w6": the teacher splits w13 into w, 1, 3
    assert STUDENT_TOKENIZER.convert_ids_to_tokens(row["input_ids"]) == ["w13", "w4", "w5", "w6", "[EOS]"]
    assert row["labels"] == [-100, -100, -100, *row["input_ids"][3:]]
    teacher_tokens = TEACHER_TOKENIZER.convert_ids_to_tokens(row["teacher_input_ids"])
    assert teacher_tokens == ["w", "1", "3", "w", "4", "w", "5", "w", "6", "[EOS]"]
    assert row["teacher_labels"][:7] == [-100] * 7
    batch = CrossTokenizerCollator(0, 0)([rows[0], rows[1]])
    assert batch["teacher_labels"].shape == batch["teacher_input_ids"].shape
    assert batch["labels"][1, -1] == -100 and batch["attention_mask"][1, -1] == 0


def test_training_across_tokenizers_with_uld(tmp_path):
    rows = paired_rows()
    student, teacher = tiny_gpt2(vocab=43, seed=2), tiny_gpt2(vocab=14, hidden=48, seed=1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=rows,
        data_collator=CrossTokenizerCollator(0, 0),
        args=config(
            tmp_path, losses="uld", hard_label_weight=0.0, temperature=1.0, max_steps=3, per_device_train_batch_size=4
        ),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = trainer.compute_loss(student, batch)
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
        keep_s, keep_t = aligned_positions(batch["labels"][:, 1:] != -100, batch["teacher_labels"][:, 1:] != -100)
        expected = F.uld(s[keep_s], t[:, :-1][keep_t], reduction="sum") / keep_s.sum()
    torch.testing.assert_close(loss, expected)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["uld"])) for e in trainer.state.log_history if "uld" in e)


def test_different_vocabularies_fail_at_start_and_name_the_options(tmp_path):
    with pytest.raises(ValueError, match=r"64 entries and the teacher's 80.*losses='uld'.*generate_teacher_outputs"):
        DistillationTrainer(model=tiny_gpt2(), teacher_model=tiny_gpt2(vocab=80), args=config(tmp_path))
    rows = paired_rows()
    trainer = DistillationTrainer(
        model=tiny_gpt2(vocab=43),
        teacher_model=tiny_gpt2(vocab=43),
        train_dataset=rows,
        data_collator=CrossTokenizerCollator(0, 0),
        args=config(tmp_path, losses="kl"),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with pytest.raises(ValueError, match=r"teacher_input_ids .* \['kl'\] cannot compare"):
        trainer.compute_loss(trainer.model, batch)


def test_on_policy_across_tokenizers_is_refused(tmp_path):
    trainer = DistillationTrainer(
        model=tiny_gpt2(vocab=43),
        teacher_model=tiny_gpt2(vocab=14),
        train_dataset=paired_rows(),
        data_collator=CrossTokenizerCollator(0, 0),
        args=config(tmp_path, losses="uld", on_policy_fraction=1.0, max_steps=1),
    )
    with pytest.raises(ValueError, match="on-policy distillation with a teacher.s own view"):
        trainer.train()
