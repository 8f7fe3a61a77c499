"""Noisy student: input noise for the student alone (hf_kd.noise), pseudo-labels (threshold, hard/soft, class
balancing) and rounds in which each student becomes the next teacher."""

import json
import logging
import re

import numpy as np
import pytest
import torch
from conftest import VOCAB, classification_data, config, tiny_bert
from datasets import Dataset
from transformers import BertForSequenceClassification

from hf_kd import DistillationTrainer, write_teacher_cache
from hf_kd.data import UNLABELED, add_sample_index
from hf_kd.noise import GaussianNoise, RandomShift, TokenCrop, TokenDropout, TokenMasking
from hf_kd.schemes.noisy_student import noisy_student, pseudo_label
from hf_kd.views import TokenWindows

MASK, PAD = 1, 0


def test_token_masking_masks_attended_unprotected_tokens_at_its_rate_and_nothing_else():
    torch.manual_seed(0)
    input_ids = torch.randint(6, VOCAB, (64, 100))  # 5 only where put below
    input_ids[:, 0] = 5  # a protected token (e.g. [CLS]) in every row
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, 80:] = 0
    labels = torch.arange(64)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    noised = TokenMasking(0.3, MASK, protected_ids=[5])(batch)
    masked = noised["input_ids"].eq(MASK)
    assert not masked[:, 0].any() and not masked[:, 80:].any()
    assert masked[:, 1:80].float().mean().item() == pytest.approx(0.3, abs=0.02)
    unmasked = ~masked
    assert torch.equal(noised["input_ids"][unmasked], input_ids[unmasked])
    assert noised["labels"] is labels and noised["attention_mask"] is attention_mask
    assert torch.equal(batch["input_ids"], input_ids)  # the clean batch is not modified in place


def test_token_dropout_removes_tokens_from_the_attention_and_keeps_one_per_row():
    torch.manual_seed(0)
    input_ids = torch.randint(2, VOCAB, (200, 3))
    noised = TokenDropout(0.9, protected_ids=[])({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
    kept = noised["attention_mask"]
    assert torch.equal(noised["input_ids"], input_ids)
    assert kept.sum(1).min().item() >= 1  # 0.9³ of the rows would otherwise be empty
    assert kept.float().mean().item() < 0.4


CLS, SEP = 2, 3


def test_token_crop_keeps_the_special_ends_and_a_uniform_contiguous_window_of_each_long_row():
    torch.manual_seed(0)
    text = torch.arange(10, 30)  # 20 text tokens, each id its position + 9
    long_row = torch.cat([torch.tensor([CLS]), text, torch.tensor([SEP])])  # 22 tokens
    short_row = torch.tensor([CLS, 40, 41, SEP] + [PAD] * 18)
    input_ids = torch.stack([long_row, short_row]).repeat(200, 1)
    attention_mask = input_ids.ne(PAD).long()
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 5] = 1  # marks the long row's 5th token (id 14) wherever it goes
    labels = torch.arange(400)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "labels": labels,
    }
    cropped = TokenCrop(6, protected_ids=[CLS, SEP, PAD], pad_token_id=PAD)(batch)
    assert cropped["input_ids"].shape == (400, 6) and cropped["labels"] is labels
    starts = []
    for row, ids in enumerate(cropped["input_ids"]):
        if row % 2:  # the short row is kept whole, padded to the batch's new width
            assert ids.tolist() == [CLS, 40, 41, SEP, PAD, PAD]
            assert cropped["attention_mask"][row].tolist() == [1, 1, 1, 1, 0, 0]
            continue
        assert ids[0] == CLS and ids[-1] == SEP and cropped["attention_mask"][row].sum() == 6
        window = ids[1:5]
        assert torch.equal(window, torch.arange(window[0], window[0] + 4))  # four consecutive text tokens
        assert torch.equal(cropped["token_type_ids"][row].eq(1), ids.eq(14))  # cropped like input_ids
        starts.append(int(window[0]) - 10)
    counts = np.bincount(starts, minlength=17)  # 17 possible windows of 4 among 20 tokens, 200 draws
    assert len(counts) == 17 and counts.min() >= 3 and counts.max() <= 25
    assert torch.equal(batch["input_ids"], input_ids)  # the clean batch is not modified in place


def test_token_crop_without_an_attention_mask_gives_the_cropped_batch_one():
    input_ids = torch.tensor([[CLS, 10, 11, 12, 13, SEP]])
    cropped = TokenCrop(4, protected_ids=[CLS, SEP])({"input_ids": input_ids})
    assert cropped["attention_mask"].tolist() == [[1, 1, 1, 1]]
    assert cropped["input_ids"].tolist() in [[[CLS, 10, 11, SEP]], [[CLS, 11, 12, SEP]], [[CLS, 12, 13, SEP]]]


def test_token_crop_keeps_left_padding_on_the_left():
    input_ids = torch.tensor([[PAD, PAD, CLS, 10, 11, 12, 13, SEP], [CLS, 20, 21, 22, 23, 24, 25, SEP]])
    cropped = TokenCrop(4, protected_ids=[CLS, SEP])({"input_ids": input_ids, "attention_mask": input_ids.ne(PAD)})
    assert cropped["input_ids"].shape == (2, 4) and cropped["attention_mask"].all()
    for ids, text in zip(cropped["input_ids"], ([10, 11, 12, 13], [20, 21, 22, 23, 24, 25])):
        assert ids[0] == CLS and ids[-1] == SEP and ids[1:3].tolist() in [text[i : i + 2] for i in range(len(text) - 1)]
    cropped = TokenCrop(6, protected_ids=[CLS, SEP])({"input_ids": input_ids, "attention_mask": input_ids.ne(PAD)})
    assert cropped["input_ids"][0].tolist() == [CLS, 10, 11, 12, 13, SEP]  # 6 attended tokens: kept whole
    assert cropped["attention_mask"].all() and cropped["input_ids"].shape == (2, 6)
    input_ids[1, :3] = PAD  # now both rows are left-padded; the short one keeps its padding on the left
    cropped = TokenCrop(6, protected_ids=[CLS, SEP])({"input_ids": input_ids, "attention_mask": input_ids.ne(PAD)})
    assert cropped["input_ids"][1].tolist() == [PAD, 22, 23, 24, 25, SEP]
    assert cropped["attention_mask"][1].tolist() == [0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "length, batch, message",
    [
        (0, None, "TokenCrop needs length >= 1, got 0."),
        (
            4,
            {"input_ids": torch.ones(2, 8, dtype=torch.long), "labels": torch.ones(2, 8, dtype=torch.long)},
            "TokenCrop moves tokens, so it cannot keep per-token labels aligned",
        ),
        (
            2,
            {"input_ids": torch.tensor([[CLS, 10, 11, SEP]])},
            "TokenCrop(length=2) leaves no room for text in a row that starts with 1 and ends with 1 special tokens",
        ),
        (4, {"pixel_values": torch.ones(1, 1, 2, 2)}, "TokenCrop perturbs 'input_ids', which this batch does not have"),
    ],
)
def test_token_crop_refusals(length, batch, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TokenCrop(length, protected_ids=[CLS, SEP])(batch)


def test_token_windows_spread_evenly_from_the_start_to_the_end_of_each_long_row():
    long_row = [CLS, *range(10, 18), SEP]  # 8 text tokens; windows of 2 can start at 0..6
    input_ids = torch.tensor([long_row, [CLS, 40, 41, SEP] + [PAD] * 6])
    token_type_ids = input_ids.eq(14).long()  # marks token 14 wherever it goes
    batch = {"input_ids": input_ids, "attention_mask": input_ids.ne(PAD), "token_type_ids": token_type_ids}
    batch["labels"] = torch.tensor([0, 1])
    views = TokenWindows(4, 3, protected_ids=[CLS, SEP], pad_token_id=PAD)(batch)
    assert [view["input_ids"][0].tolist() for view in views] == [
        [CLS, 10, 11, SEP],
        [CLS, 13, 14, SEP],
        [CLS, 16, 17, SEP],
    ]
    assert [view["token_type_ids"][0].tolist() for view in views] == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert all(view["input_ids"][1].tolist() == [CLS, 40, 41, SEP] for view in views)  # a short row is every view
    assert all(view["labels"] is batch["labels"] for view in views)
    (start,) = TokenWindows(4, 1, protected_ids=[CLS, SEP])(batch)
    assert start["input_ids"][0].tolist() == [CLS, 10, 11, SEP]
    short = {"input_ids": input_ids[1:, :4]}  # no row longer than a window: one view, not three of the same
    (whole,) = TokenWindows(4, 3, protected_ids=[CLS, SEP])(short)
    assert whole["input_ids"].tolist() == [[CLS, 40, 41, SEP]] and whole["attention_mask"].tolist() == [[1, 1, 1, 1]]
    assert repr(TokenWindows(4, 3)) == "TokenWindows(length=4, count=3)"


@pytest.mark.parametrize(
    "length, count, batch, message",
    [
        (0, 2, None, "TokenWindows needs length >= 1 and count >= 1, got length=0, count=2."),
        (4, 0, None, "TokenWindows needs length >= 1 and count >= 1, got length=4, count=0."),
        (4, 2, {"pixel_values": torch.ones(1, 1, 2, 2)}, "TokenWindows cuts 'input_ids', which this batch does not"),
        (
            4,
            2,
            {"input_ids": torch.ones(2, 8, dtype=torch.long), "labels": torch.ones(2, 8, dtype=torch.long)},
            "TokenWindows moves tokens, so it cannot keep per-token labels aligned",
        ),
        (
            2,
            2,
            {"input_ids": torch.tensor([[CLS, 10, 11, SEP]])},
            "TokenWindows(length=2) leaves no room for text in a row that starts with 1 and ends with 1 special",
        ),
    ],
)
def test_token_windows_refusals(length, count, batch, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TokenWindows(length, count, protected_ids=[CLS, SEP])(batch)


def _mean_over_windows(teacher, data, windows):
    batch = {key: torch.tensor(data[key]) for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return torch.stack([teacher(**view).logits.softmax(-1) for view in windows(batch)]).mean(0)


def test_pseudo_labels_from_views_are_the_teachers_mean_probabilities_over_them(tmp_path):
    teacher, data = tiny_bert(seed=1), add_sample_index(classification_data(n=32, length=12))
    windows = TokenWindows(6, 3)  # no special tokens: plain windows at 0, 3 and 6
    mean = _mean_over_windows(teacher, data, windows)
    labelled = pseudo_label(teacher, data, mode="hard", views=windows)
    assert labelled.dataset["labels"] == mean.argmax(-1).tolist()
    assert np.allclose(labelled.confidence, mean.max(-1).values.numpy(), atol=1e-6)
    whole = _teacher_probabilities(teacher, data)  # the views change what the teacher says
    assert not torch.allclose(whole, mean, atol=1e-3)
    cache = write_teacher_cache(teacher, data, str(tmp_path / "cache"), top_k=3, dtype="float32")
    with pytest.raises(ValueError, match="a TeacherCache holds one reading per row; pass the teacher model"):
        pseudo_label(cache, data, views=windows)
    with pytest.raises(ValueError, match="returned no batch to label from"):
        pseudo_label(teacher, data, views=lambda batch: [])


def test_a_round_labels_from_the_views_and_records_them(tmp_path):
    data = classification_data(n=24, length=12)
    train = data.remove_columns("labels").add_column("labels", [*data["labels"][:8], *[UNLABELED] * 16])
    teacher, windows = tiny_bert(seed=1), TokenWindows(6, 2)
    (stage,) = noisy_student(
        teacher,
        lambda k: tiny_bert(seed=10 + k),
        config(tmp_path, max_steps=1),
        train_dataset=train,
        pseudo_labels="hard",
        pseudo_label_views=windows,
    )
    expected = _mean_over_windows(teacher, train.select(range(8, 24)), windows).argmax(-1)
    assert stage.details["views"] == "TokenWindows(length=6, count=2)"
    assert stage.details["rows_per_class"] == np.bincount(expected.numpy(), minlength=3).tolist()


def test_the_scheme_crops_the_students_rows_and_labels_from_windows_with_the_trainers_tokenizer(tmp_path):
    # [CLS] 12 text tokens [SEP]; 8 labeled rows and 16 unlabeled ones.
    from transformers import BertTokenizerFast

    from hf_kd.schemes import run_scheme
    from hf_kd.schemes.noisy_student import NoisyStudentConfig

    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, VOCAB)])
    )
    tokenizer = BertTokenizerFast(str(tmp_path / "vocab.txt"))
    text = torch.randint(5, VOCAB, (24, 12), generator=torch.Generator().manual_seed(0))
    rows = torch.cat([torch.full((24, 1), CLS), text, torch.full((24, 1), SEP)], dim=1)
    labels = [0, 1, 2, 0, 1, 2, 0, 1, *[UNLABELED] * 16]
    train = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": [[1] * 14] * 24, "labels": labels})
    teacher, student_seen = tiny_bert(seed=1), []
    scheme = NoisyStudentConfig(pseudo_labels="hard", input_noise=0.3, crop_length=6, label_windows=2)
    run_scheme(
        scheme,
        config(tmp_path / "out", max_steps=2, per_device_train_batch_size=8),
        teacher=teacher,
        make_student=lambda k: _recorder(tiny_bert(seed=10 + k), student_seen),
        make_noise=lambda p: [TokenMasking(p, MASK, protected_ids=[CLS, SEP])],  # a list, as image recipes give
        train_dataset=train,
        processing_class=tokenizer,
    )
    training = torch.cat(student_seen[:2])  # the two steps' batches (no evaluation set: nothing read after them)
    assert training.shape == (16, 6) and 0.1 < training[:, 1:5].eq(MASK).float().mean() < 0.5  # cropped, then masked
    for window in training:  # [CLS], 4 consecutive text tokens of one row (some masked), [SEP]
        kept = window[1:5].ne(MASK)
        assert window[0] == CLS and window[-1] == SEP
        assert any(text[row].unfold(0, 4, 1)[:, kept].eq(window[1:5][kept]).all(-1).any() for row in range(24))
    windows = TokenWindows.from_tokenizer(tokenizer, 6, 2)
    expected = _mean_over_windows(teacher, train.select(range(8, 24)), windows).argmax(-1)
    summary = json.loads((tmp_path / "out" / "round1" / "model" / "distillation_config.json").read_text())
    assert summary["stage"]["views"] == "TokenWindows(length=6, count=2)"
    assert summary["stage"]["rows_per_class"] == np.bincount(expected.numpy(), minlength=3).tolist()
    assert (summary["scheme"]["crop_length"], summary["scheme"]["label_windows"]) == (6, 2)


def test_a_cropped_student_learns_while_its_teacher_reads_the_whole_rows(tmp_path):
    data = classification_data(n=16, length=12)
    trainer, student_seen, teacher_seen = _recorded_run(tmp_path, data, TokenCrop(5))
    clean = torch.tensor(data["input_ids"])
    assert [seen.shape for seen in teacher_seen] == [(16, 12)] * 2 and [seen.shape for seen in student_seen] == [
        (16, 5)
    ] * 2
    for window, row in zip(student_seen[0], teacher_seen[0]):  # each student row is a window of its teacher row
        assert any(torch.equal(window, row[start : start + 5]) for start in range(8))
    assert all(row.tolist() in clean.tolist() for row in teacher_seen[0])
    assert np.isfinite([entry["kl"] for entry in trainer.state.log_history if "kl" in entry]).all()


def test_random_shift_translates_each_image_by_whole_pixels_and_fills_the_border():
    torch.manual_seed(0)
    images = torch.arange(1, 2 * 1 * 4 * 4 + 1, dtype=torch.float32).view(2, 1, 4, 4)
    shifted = RandomShift(1, fill=-1.0)({"pixel_values": images})["pixel_values"]
    for image, result in zip(images, shifted):
        candidates = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):  # by hand: roll, then blank the rows/columns that wrapped around
                expected = torch.roll(image, shifts=(dy, dx), dims=(-2, -1)).clone()
                if dy == 1:
                    expected[:, 0] = -1
                if dy == -1:
                    expected[:, -1] = -1
                if dx == 1:
                    expected[:, :, 0] = -1
                if dx == -1:
                    expected[:, :, -1] = -1
                candidates.append(expected)
        assert any(torch.equal(result, expected) for expected in candidates)


def test_gaussian_noise_has_its_standard_deviation():
    torch.manual_seed(0)
    values = torch.zeros(100, 1, 8, 8)
    noised = GaussianNoise(0.5)({"pixel_values": values})["pixel_values"]
    assert noised.std().item() == pytest.approx(0.5, rel=0.05) and values.abs().sum() == 0


def _recorder(model, seen):
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    return model


def _recorded_run(tmp_path, data, noise, **kwargs):
    """Two steps of a student under ``noise``, recording the input ids each model reads."""
    student_seen, teacher_seen = [], []
    student, teacher = _recorder(tiny_bert(hidden=16, seed=2), student_seen), _recorder(tiny_bert(seed=1), teacher_seen)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=2, per_device_train_batch_size=16),
        train_dataset=data,
        student_noise=noise,
        **kwargs,
    )
    trainer.train()
    return trainer, student_seen, teacher_seen


def test_noise_reaches_the_student_only_and_never_evaluation(tmp_path):
    data = classification_data(n=16)
    trainer, student_seen, teacher_seen = _recorded_run(tmp_path, data, [TokenMasking(0.5, MASK)], eval_dataset=data)
    clean = torch.tensor(data["input_ids"])
    assert len(student_seen) == len(teacher_seen) == 2
    for noisy, seen in zip(student_seen, teacher_seen):
        rows = [clean.tolist().index(row) for row in seen.tolist()]  # the teacher saw clean rows of the data
        assert noisy.eq(MASK).float().mean() > 0.3  # ~half the tokens masked for the student
        kept = noisy.ne(MASK)
        assert torch.equal(noisy[kept], clean[rows][kept])  # ...of the same rows
    student_seen.clear()
    trainer.evaluate()
    assert all(not row.eq(MASK).any() or clean.eq(MASK).any() for row in student_seen)
    assert sum(row.eq(MASK).sum().item() for row in student_seen) == clean.eq(MASK).sum().item()


def test_a_cached_teacher_accepts_noised_students_and_equals_the_live_teacher(tmp_path):
    teacher = tiny_bert(seed=1)
    data = add_sample_index(classification_data(n=16))
    cache = write_teacher_cache(teacher, data, str(tmp_path / "cache"), top_k=3, dtype="float32")
    losses = []
    for name, source in (("live", teacher), ("cached", cache)):
        trainer = DistillationTrainer(
            model=tiny_bert(hidden=16, seed=2),
            teacher_model=source,
            args=config(tmp_path / name, max_steps=3),
            train_dataset=data,
            student_noise=TokenMasking(0.3, MASK),
        )
        torch.manual_seed(7)
        trainer.train()
        losses.append([entry["kl"] for entry in trainer.state.log_history if "kl" in entry])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and len(losses[0]) == 3


def _teacher_probabilities(teacher, data):
    with torch.no_grad():
        logits = teacher(
            input_ids=torch.tensor(data["input_ids"]), attention_mask=torch.tensor(data["attention_mask"])
        ).logits
    return logits.softmax(-1)


def test_pseudo_labels_respect_the_threshold_and_hard_labels_are_the_teachers_class():
    teacher, data = tiny_bert(seed=1), add_sample_index(classification_data(n=64))
    probabilities = _teacher_probabilities(teacher, data)
    confidence = probabilities.max(-1).values
    threshold = float(confidence.median())
    hard = pseudo_label(teacher, data, mode="hard", threshold=threshold)
    expected = torch.nonzero(confidence >= threshold).flatten().tolist()
    assert hard.dataset["sample_index"] == expected and 0 < len(expected) < 64
    assert hard.dataset["labels"] == probabilities.argmax(-1)[expected].tolist()
    assert hard.confidence.min() >= threshold
    soft = pseudo_label(teacher, data, mode="soft", threshold=threshold)
    assert soft.dataset["sample_index"] == expected and set(soft.dataset["labels"]) == {UNLABELED}


def test_class_balancing_keeps_the_most_confident_rows_of_large_classes_and_repeats_small_ones():
    teacher, data = tiny_bert(seed=1), add_sample_index(classification_data(n=64))
    probabilities = _teacher_probabilities(teacher, data)
    confidence, classes = probabilities.max(-1)
    labelled = pseudo_label(teacher, data, mode="hard", balance=10)
    counts = np.bincount(labelled.dataset["labels"], minlength=3)
    present = np.bincount(classes.numpy(), minlength=3) > 0
    assert (counts[present] == 10).all() and (counts[~present] == 0).all()
    for cls in np.flatnonzero(present):
        rows = [i for i, c in zip(labelled.dataset["sample_index"], labelled.dataset["labels"]) if c == cls]
        members = torch.nonzero(classes == cls).flatten()
        if len(members) >= 10:  # the 10 most confident of the class
            top = members[confidence[members].argsort(descending=True)[:10]].tolist()
            assert sorted(rows) == sorted(top)
        else:  # every member, repeated most confident first
            assert set(rows) == set(members.tolist())


def test_a_class_without_any_kept_pseudo_label_is_named_in_a_warning(caplog):
    teacher, data = tiny_bert(seed=1), add_sample_index(classification_data(n=64))
    confidence, classes = _teacher_probabilities(teacher, data).max(-1)
    present = classes.unique().tolist()
    # the threshold just above the most confident row of the class the teacher is least sure of: that class loses
    # every row, the others keep theirs
    tops = {cls: float(confidence[classes == cls].max()) for cls in present}
    unsure = min(tops, key=tops.get)
    threshold = (tops[unsure] + min(top for cls, top in tops.items() if cls != unsure)) / 2
    absent = sorted(set(range(3)) - set(present) | {unsure})
    with caplog.at_level(logging.WARNING):
        labelled = pseudo_label(teacher, data, mode="hard", threshold=threshold, balance=True)
    assert unsure not in labelled.dataset["labels"] and len(labelled.dataset) > 0
    assert f"no kept unlabeled row has class {', '.join(map(str, absent))} (confidence threshold {threshold})" in (
        caplog.text
    )


def test_rounds_chain_teachers_record_pseudo_labels_and_reload(tmp_path):
    data = classification_data(n=32)
    labels = [label if index < 8 else UNLABELED for index, label in enumerate(data["labels"])]
    train = data.remove_columns("labels").add_column("labels", labels)
    teacher = tiny_bert(seed=1)
    students = []

    def make_student(round_number):
        students.append(tiny_bert(hidden=32, layers=2, seed=10 + round_number))
        return students[-1]

    def run(rounds, **kwargs):  # the chain in tmp_path, hard pseudo-labels, masking and dropout
        return noisy_student(
            teacher,
            make_student,
            config(tmp_path, max_steps=2),
            train_dataset=train,
            rounds=rounds,
            pseudo_label_threshold=0.0,
            pseudo_labels="hard",
            student_noise=TokenMasking(0.2, MASK),
            student_dropout=0.1,
            **kwargs,
        )

    reloaded = []

    def load(folder):
        reloaded.append(folder)
        return BertForSequenceClassification.from_pretrained(folder)

    stages = run(2, eval_dataset=data)
    assert [stage.name for stage in stages] == ["round1", "round2"]
    assert all(
        module.p == 0.1 for student in students for module in student.modules() if isinstance(module, torch.nn.Dropout)
    )
    with open(f"{stages[1].model_folder}/distillation_config.json") as handle:
        second = json.load(handle)
    assert [entry["stage"] for entry in second["lineage"]] == ["teacher", "round1"]
    assert second["lineage"][1]["kept_rows"] == 24 and second["stage"]["unlabeled_rows"] == 24
    assert sum(second["stage"]["rows_per_class"]) == 24 and second["stage"]["pseudo_labels"] == "hard"
    # Round 2's pseudo-labels come from round 1's student: its classes on the unlabeled rows.
    round1 = stages[0].model.eval()
    expected = _teacher_probabilities(round1, train.select(range(8, 32))).argmax(-1)
    assert second["stage"]["rows_per_class"] == np.bincount(expected.numpy(), minlength=3).tolist()
    again = run(2, load_student=load)
    assert len(reloaded) == 2 and again[1].details["kept_rows"] == 24
    # A third round on the same folder reuses the two finished ones: how many rounds follow does not change them.
    reloaded.clear()
    longer = run(3, load_student=load)
    assert [stage.name for stage in longer] == ["round1", "round2", "round3"] and len(reloaded) == 2
    assert longer[2].trainer is not None and longer[0].trainer is None and longer[1].trainer is None
    # Records written before the stage count was left out still hold it: they are reused all the same.
    summary = f"{stages[0].model_folder}/distillation_config.json"
    with open(summary) as handle:
        saved = json.load(handle)
    assert "rounds" not in saved["setup"]["scheme"]
    saved["setup"]["scheme"]["rounds"] = 2
    with open(summary, "w") as handle:
        json.dump(saved, handle)
    reloaded.clear()
    run(3, load_student=load)
    assert len(reloaded) == 3
    # The same folder asked for soft pseudo-labels: the finished rounds were trained otherwise and are not reused.
    with pytest.raises(ValueError, match=r"stage 'round1' finished in an earlier run .* under another set-up: scheme"):
        noisy_student(teacher, make_student, config(tmp_path, max_steps=2), train_dataset=train, rounds=2)


def test_a_checkpoint_resumes_under_more_rounds_but_not_under_other_settings(tmp_path):
    from hf_kd.checkpoints import check_run_setup, write_run_setup
    from hf_kd.schemes.noisy_student import NoisyStudentConfig

    checkpoint = str(tmp_path / "checkpoint-2")
    old_record = {"losses": "kl", "scheme": NoisyStudentConfig(rounds=2).to_dict()}  # as written before: with rounds
    write_run_setup(checkpoint, old_record)
    check_run_setup(checkpoint, {"losses": "kl", "scheme": NoisyStudentConfig(rounds=3).setup()}, "rounds")
    with pytest.raises(ValueError, match=r"another set-up \(scheme: .*'pseudo_labels': 'soft'.* → .*'hard'"):
        check_run_setup(
            checkpoint, {"losses": "kl", "scheme": NoisyStudentConfig(rounds=3, pseudo_labels="hard").setup()}, "rounds"
        )


def test_the_card_shows_the_lineage_with_each_stages_metrics(tmp_path):
    lineage = [
        {"stage": "teacher", "class": "BertForSequenceClassification", "parameters": 52_000},
        {
            "stage": "round1",
            "class": "BertForSequenceClassification",
            "parameters": 60_500,
            "metrics": {"eval_accuracy": 0.8125, "eval_runtime": 0.5, "eval_kl": 0.123456},
        },
    ]
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2),
        teacher_model=tiny_bert(seed=1),
        args=config(tmp_path),
        train_dataset=classification_data(),
    )
    trainer.lineage, trainer.stage_metrics = lineage, {"eval_accuracy": 0.875}
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "## Lineage" in card
    assert "| teacher | `BertForSequenceClassification` | 52.0k | – |" in card
    assert "| round1 | `BertForSequenceClassification` | 60.5k | eval_accuracy 0.8125, eval_kl 0.1235 |" in card
    student = sum(p.numel() for p in trainer.model.parameters()) / 1e3
    assert f"| this student | `BertForSequenceClassification` | {student:.1f}k | eval_accuracy 0.875 |" in card
