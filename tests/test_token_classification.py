"""Token classification: word/sub-word alignment, distillation positions, long sentences in windows (each word
labeled once, scored in its whole sentence), word-aligned cross-tokenizer KD, entity F1 by seqeval, and a student
that learns from a teacher on unlabeled sentences."""

import random

import numpy as np
import pytest
import torch
from conftest import config
from datasets import Dataset
from transformers import (
    AutoModelForTokenClassification,
    BertConfig,
    BertForTokenClassification,
    BertTokenizerFast,
    EvalPrediction,
    Trainer,
    TrainingArguments,
)

from hf_kd import DistillationTrainer
from hf_kd.cross_tokenizer import CrossTokenizerCollator
from hf_kd.losses import functional as F
from hf_kd.token_classification import add_teacher_words, entity_metrics, tokenize_words, word_tags

TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
LABEL2ID = {tag: index for index, tag in enumerate(TAGS)}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tokenizer(tmp_path, name, vocab):
    path = tmp_path / f"{name}.txt"
    path.write_text("\n".join(SPECIALS + vocab))
    return BertTokenizerFast(str(path))


def test_tags_go_to_the_first_sub_token_or_to_all_of_them(tmp_path):
    tok = tokenizer(tmp_path, "pieces", ["gordon", "brown", "##field", "spoke"])
    rows = Dataset.from_list(
        [
            {"words": ["Gordon", "Brownfield", "spoke"], "tags": ["B-PER", "I-PER", "O"]},
            {"words": ["Brownfield", "spoke"], "tags": None},  # unlabeled: distilled all the same
        ]
    )
    first = tokenize_words(rows, tok, LABEL2ID)
    assert tok.convert_ids_to_tokens(first[0]["input_ids"]) == ["[CLS]", "gordon", "brown", "##field", "spoke", "[SEP]"]
    assert first[0]["labels"] == [-100, 1, 2, -100, 0, -100]
    assert first[0]["distillation_positions"] == [0, 1, 1, 0, 1, 0]
    assert first[1]["labels"] == [-100] * 5 and first[1]["distillation_positions"] == [0, 1, 0, 1, 0]
    every = tokenize_words(rows, tok, LABEL2ID, subtokens="all")
    assert every[0]["labels"] == [-100, 1, 2, 2, 0, -100]
    assert every[0]["distillation_positions"] == [0, 1, 1, 1, 1, 0]
    # a B- tag split over pieces: B on the first, I on the rest
    split = tokenize_words(
        Dataset.from_list([{"words": ["Brownfield"], "tags": ["B-PER"]}]), tok, LABEL2ID, subtokens="all"
    )
    assert split[0]["labels"] == [-100, 1, 2, -100]

    with pytest.raises(ValueError, match="row 0: 2 tags for 3 words"):
        tokenize_words(Dataset.from_list([{"words": ["a", "b", "c"], "tags": ["O", "O"]}]), tok, LABEL2ID)
    with pytest.raises(ValueError, match="tag 'B-LOC' is not in label2id"):
        tokenize_words(Dataset.from_list([{"words": ["spoke"], "tags": ["B-LOC"]}]), tok, LABEL2ID)
    with pytest.raises(ValueError, match="subtokens is one of"):
        tokenize_words(rows, tok, LABEL2ID, subtokens="last")
    with pytest.raises(ValueError, match="tokenize the student's rows with subtokens='first'"):
        add_teacher_words(every, rows, tok)


def test_entity_metrics_match_hand_counts():
    id2label = dict(enumerate(TAGS))
    # true: PER (tokens 0-1) and ORG (token 3); predicted: PER right, ORG missed, a spurious PER at token 2
    labels = np.array([[1, 2, 0, 3, -100]])
    predictions = np.array([[1, 2, 1, 0, 0]])
    logits = np.eye(len(TAGS))[predictions]
    values = entity_metrics(id2label)(EvalPrediction(predictions=logits, label_ids=labels))
    assert values["precision"] == pytest.approx(1 / 2) and values["recall"] == pytest.approx(1 / 2)
    assert values["f1"] == pytest.approx(1 / 2) and values["accuracy"] == pytest.approx(2 / 4)


def token_classifier(vocab_size, hidden=32, layers=2, seed=0):
    torch.manual_seed(seed)
    config_ = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(TAGS),
        id2label=dict(enumerate(TAGS)),
        label2id=LABEL2ID,
    )
    return BertForTokenClassification(config_)


PEOPLE, SURNAMES, COMPANIES = ["ann", "bob", "cyd", "dee"], ["smith", "jones"], ["acme", "zeta", "orbit"]
OTHER = ["met", "saw", "the", "team", "from", "today", "and", "with"]


def sentences(n, seed):
    """Synthetic tagged sentences: a first name and maybe a surname is a PER, a company (maybe + inc) an ORG."""
    draw, rows = random.Random(seed), []
    for _ in range(n):
        words, tags = [], []
        for _ in range(draw.randint(3, 7)):
            kind = draw.random()
            if kind < 0.25:
                name = [draw.choice(PEOPLE)] + ([draw.choice(SURNAMES)] if draw.random() < 0.5 else [])
                words += name
                tags += ["B-PER"] + ["I-PER"] * (len(name) - 1)
            elif kind < 0.4:
                company = [draw.choice(COMPANIES)] + (["inc"] if draw.random() < 0.5 else [])
                words += company
                tags += ["B-ORG"] + ["I-ORG"] * (len(company) - 1)
            else:
                words.append(draw.choice(OTHER))
                tags.append("O")
        rows.append({"words": words, "tags": tags})
    return rows


def test_unlabeled_rows_are_distilled_on_every_word_with_the_first_sub_token_convention(tmp_path):
    tok = tokenizer(tmp_path, "words", ["ann", "bo", "##b", *OTHER])
    rows = Dataset.from_list([{"words": ["ann", "bob", "met", "the"], "tags": None}] * 4)
    data = tokenize_words(rows, tok, LABEL2ID)
    student, teacher = token_classifier(len(tok), seed=1), token_classifier(len(tok), seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path / "run", losses="kl", per_device_train_batch_size=4, hard_label_weight=1.0),
        train_dataset=data,
        data_collator=CrossTokenizerCollator(tok.pad_token_id, tok.pad_token_id),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(student, batch)
    marked = batch["distillation_positions"].bool()  # [CLS] ann bo ##b met the [SEP]: 4 words, not ##b
    assert marked[0].tolist() == [False, True, True, False, True, True, False]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.forward_kl(student_logits[marked], teacher_logits[marked], temperature=trainer.args.temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_different_tokenizers_meet_word_by_word(tmp_path):
    whole = tokenizer(tmp_path, "whole", [*PEOPLE, *COMPANIES, *OTHER])
    pieces = tokenizer(tmp_path, "pieces", ["a", "b", "c", "d", "##n", "##o", "##b", "##y", "##d", "##e", *OTHER])
    words = Dataset.from_list([{"words": ["ann", "met", "bob", "today"], "tags": None}] * 2)
    rows = add_teacher_words(tokenize_words(words, pieces, LABEL2ID), words, whole)
    assert pieces.convert_ids_to_tokens(rows[0]["input_ids"])[:6] == ["[CLS]", "a", "##n", "##n", "met", "b"]
    student, teacher = token_classifier(len(pieces), seed=1), token_classifier(len(whole), seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path / "run", losses="kl", per_device_train_batch_size=2, hard_label_weight=1.0),
        train_dataset=rows,
        data_collator=CrossTokenizerCollator(pieces.pad_token_id, whole.pad_token_id),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(student, batch)
    s_mask, t_mask = batch["distillation_positions"].bool(), batch["teacher_distillation_positions"].bool()
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert s_mask.sum() == t_mask.sum() == 8  # 4 words per row on both sides
    expected = F.forward_kl(s_logits[s_mask], t_logits[t_mask], temperature=trainer.args.temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_student_with_few_labels_learns_entities_from_the_teacher(tmp_path):
    tok = tokenizer(tmp_path, "words", [*PEOPLE, *SURNAMES, *COMPANIES, "inc", *OTHER])
    collator = CrossTokenizerCollator(tok.pad_token_id, tok.pad_token_id)
    train = sentences(240, seed=0)
    test = tokenize_words(Dataset.from_list(sentences(60, seed=1)), tok, LABEL2ID)
    metrics = entity_metrics(dict(enumerate(TAGS)))

    def f1(model):
        arguments = TrainingArguments(str(tmp_path / "eval"), use_cpu=True, report_to=[], per_device_eval_batch_size=32)
        output = Trainer(model=model, args=arguments, data_collator=collator).predict(test)
        return metrics(EvalPrediction(predictions=output.predictions, label_ids=output.label_ids))["f1"]

    from hf_kd.recipe_support.baselines import train_plainly

    teacher = token_classifier(len(tok), seed=0)
    train_plainly(
        teacher,
        config(tmp_path / "t", max_steps=120, learning_rate=3e-3),
        tokenize_words(Dataset.from_list(train), tok, LABEL2ID),
        output_dir=str(tmp_path / "t"),
        data_collator=collator,
    )
    # The few labeled sentences never name cyd, dee or orbit: only the teacher knows them, from all the labels.
    unseen = {"cyd", "dee", "orbit"}
    labeled_rows = [row for row in train if not unseen & set(row["words"])][:8]
    few = labeled_rows + [{**row, "tags": None} for row in train if row not in labeled_rows]
    scratch = token_classifier(len(tok), hidden=16, layers=1, seed=3)
    labeled = tokenize_words(Dataset.from_list(labeled_rows), tok, LABEL2ID)
    train_plainly(
        scratch,
        config(tmp_path / "s", max_steps=120, learning_rate=3e-3),
        labeled,
        output_dir=str(tmp_path / "s"),
        data_collator=collator,
    )
    student = token_classifier(len(tok), hidden=16, layers=1, seed=3)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path / "d", losses="kl", max_steps=120, learning_rate=3e-3),
        train_dataset=tokenize_words(Dataset.from_list(few), tok, LABEL2ID),
        data_collator=collator,
    )
    trainer.train()
    teacher_f1, scratch_f1, distilled_f1 = f1(teacher), f1(scratch), f1(trainer.student)
    assert teacher_f1 > 0.9
    assert distilled_f1 > scratch_f1 + 0.1, (teacher_f1, scratch_f1, distilled_f1)


def test_token_classification_recipe_distils_minilm_on_silver_tagged_bbc_sentences(tmp_path):
    import json

    from test_recipes import run_recipe

    run_recipe(
        "token_classification.py",
        "--config",
        "recipes/configs/token_classification.yaml",
        "--output_dir",
        str(tmp_path),
        "--max_articles",
        "40",
        "--num_labeled_articles",
        "3",
        "--teacher_steps",
        "3",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--eval_sentences",
        "40",
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 3
    for row in results.values():
        assert {"f1", "precision", "recall", "parameters"} <= set(row) and 0 <= row["f1"] <= 1
    tagged = [json.loads(line) for line in (tmp_path / "data" / "bbc_ner_40.jsonl").read_text().splitlines()]
    assert all(len(row["words"]) == len(row["tags"]) for row in tagged)
    assert any(tag.endswith(("-PERSON", "-ORG", "-GPE")) for row in tagged for tag in row["tags"])  # real entities
    student = AutoModelForTokenClassification.from_pretrained(tmp_path / "student")
    assert student.config.id2label[0] == "O" and student.config.num_hidden_layers == 2


def _labeled_words(window, column="labels", empty=-100):
    return [word for word, value in zip(window["word_ids"], window[column]) if value != empty]


def test_a_long_sentence_becomes_windows_that_label_every_word_once_where_it_has_most_context(tmp_path):
    tok = tokenizer(tmp_path, "words", ["ann", "smith", "acme", "met", "the", "brown", "##field"])
    cycle = [("ann", "B-PER"), ("smith", "I-PER"), ("met", "O"), ("acme", "B-ORG"), ("the", "O")]
    words, tags = [cycle[i % 5][0] for i in range(50)], [cycle[i % 5][1] for i in range(50)]
    rows = Dataset.from_list([{"words": words, "tags": tags}, {"words": ["ann", "met"], "tags": None}])
    windows = tokenize_words(rows, tok, LABEL2ID, max_length=16, stride=4)
    # 14 tokens a window besides [CLS] and [SEP], 4 repeated: words 0-13, 10-23, 20-33, 30-43, 40-49, then row 1
    assert windows["sentence_index"] == [0] * 5 + [1]
    assert [[word for word in window if word >= 0] for window in windows["word_ids"][:5]] == [
        list(range(start, min(start + 14, 50))) for start in (0, 10, 20, 30, 40)
    ]
    assert windows[0]["word_ids"][0] == windows[0]["word_ids"][-1] == -1  # the special tokens
    # an overlap's words go to the window where they are more central: 10, 11 to the first, 12, 13 to the second
    labeled = [_labeled_words(window) for window in windows]
    assert labeled[:5] == [
        list(range(start, stop)) for start, stop in [(0, 12), (12, 22), (22, 32), (32, 42), (42, 50)]
    ]
    assert [TAGS[label] for window in windows for label in window["labels"] if label != -100] == tags
    assert [_labeled_words(window, "distillation_positions", 0) for window in windows][:5] == labeled[:5]
    assert labeled[5] == [] and _labeled_words(windows[5], "distillation_positions", 0) == [0, 1]  # unlabeled
    # a row that fits one window is the row it was without windows
    assert windows[5]["input_ids"] == tok(["ann", "met"], is_split_into_words=True)["input_ids"]

    # every piece of a word ("all"), in one window: 12 words of 2 pieces, windows of 8 tokens repeating 3
    pieces = Dataset.from_list([{"words": ["Brownfield"] * 12, "tags": ["B-PER"] + ["O"] * 11}])
    every = tokenize_words(pieces, tok, LABEL2ID, subtokens="all", max_length=10, stride=3)
    assert len(every) > 1
    spans = {}
    for index, window in enumerate(every):
        for word, label in zip(window["word_ids"], window["labels"]):
            if label != -100:
                spans.setdefault(word, []).append((index, TAGS[label]))
    assert sorted(spans) == list(range(12))
    assert all(len(tagged) == 2 and tagged[0][0] == tagged[1][0] for tagged in spans.values())  # whole, once
    assert [tag for _, tag in spans[0]] == ["B-PER", "I-PER"] and [tag for _, tag in spans[5]] == ["O", "O"]


def test_window_predictions_are_joined_back_into_whole_sentences(tmp_path):
    tok = tokenizer(tmp_path, "words", ["ann", "smith", "acme", "met", "the"])
    words = ["met", "the", "acme", "the", "ann", "smith", "met", "the", "acme", "ann", "smith", "met"]
    tags = ["O", "O", "B-ORG", "O", "B-PER", "I-PER", "O", "O", "B-ORG", "B-PER", "I-PER", "O"]
    guess = ["O", "O", "O", "O", "B-PER", "I-PER", "O", "O", "B-ORG", "B-PER", "I-PER", "B-ORG"]  # by hand
    rows = Dataset.from_list([{"words": words, "tags": tags}, {"words": ["ann", "met"], "tags": ["B-PER", "O"]}])
    windows = tokenize_words(rows, tok, LABEL2ID, max_length=8, stride=2)
    # windows of words 0-5, 4-9, 8-11; "ann smith" (4, 5) is labeled across the first two windows' edge
    assert [_labeled_words(window) for window in windows] == [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11], [0, 1]]
    width = max(len(window["labels"]) for window in windows)
    labels = np.full((len(windows), width), -100)
    predictions = np.full((len(windows), width), LABEL2ID["B-ORG"])  # unlabeled positions: ignored, whatever they say
    sentence_guess = {0: guess, 1: ["B-PER", "O"]}
    for row, window in enumerate(windows):
        labels[row, : len(window["labels"])] = window["labels"]
        for position, (word, label) in enumerate(zip(window["word_ids"], window["labels"])):
            if label != -100:
                predictions[row, position] = LABEL2ID[sentence_guess[window["sentence_index"]][word]]
    assert word_tags(predictions, labels, dict(enumerate(TAGS)), windows) == (
        [guess, ["B-PER", "O"]],
        [tags, ["B-PER", "O"]],
    )
    logits = np.eye(len(TAGS))[predictions]
    whole = entity_metrics(dict(enumerate(TAGS)), windows=windows)(EvalPrediction(logits, labels))
    # 5 true entities, 5 predicted, 4 right (the ORG of word 2 missed, a spurious ORG at word 11); 12 of 14 tags
    assert whole["precision"] == pytest.approx(4 / 5) and whole["recall"] == pytest.approx(4 / 5)
    assert whole["f1"] == pytest.approx(4 / 5) and whole["accuracy"] == pytest.approx(12 / 14)
    # window by window, "ann smith" would count as two entities
    by_window = entity_metrics(dict(enumerate(TAGS)))(EvalPrediction(logits, labels))
    assert by_window["f1"] == pytest.approx(5 / 6)


def test_a_teacher_with_its_own_tokenizer_meets_the_student_word_by_word_in_every_window(tmp_path):
    whole = tokenizer(tmp_path, "whole", [*PEOPLE, *COMPANIES, *OTHER])
    pieces = tokenizer(tmp_path, "pieces", ["a", "b", "c", "d", "##n", "##o", "##b", "##y", "##d", "##e", *OTHER])
    sentence = ["ann", "met", "bob", "today", "with", "cyd", "and", "dee", "from", "the", "team"] * 2
    words = Dataset.from_list([{"words": sentence, "tags": None}, {"words": ["bob", "saw", "ann"], "tags": None}])
    student_rows = tokenize_words(words, pieces, LABEL2ID, max_length=12, stride=4)
    rows = add_teacher_words(student_rows, words, whole)
    assert len(rows) > 3  # the long sentence in several windows, one teacher row per window
    for window in rows:
        student_words = _labeled_words(window, "distillation_positions", 0)
        teacher_tokens = [
            token
            for token, marked in zip(
                whole.convert_ids_to_tokens(window["teacher_input_ids"]), window["teacher_distillation_positions"]
            )
            if marked
        ]
        assert teacher_tokens == [words[window["sentence_index"]]["words"][word] for word in student_words]
    long_windows = rows.filter(lambda row: row["sentence_index"] == 0)
    distilled = [word for window in long_windows for word in _labeled_words(window, "distillation_positions", 0)]
    assert sorted(distilled) == list(range(22))  # each word of the long sentence once

    student, teacher = token_classifier(len(pieces), seed=1), token_classifier(len(whole), seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path / "run", losses="kl", per_device_train_batch_size=len(rows), hard_label_weight=1.0),
        train_dataset=rows,
        data_collator=CrossTokenizerCollator(pieces.pad_token_id, whole.pad_token_id),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(student, batch)
    s_mask, t_mask = batch["distillation_positions"].bool(), batch["teacher_distillation_positions"].bool()
    assert s_mask.sum(1).tolist() == t_mask.sum(1).tolist()
    assert int(s_mask.sum()) == 22 + 3  # every word of both sentences, once
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.forward_kl(s_logits[s_mask], t_logits[t_mask], temperature=trainer.args.temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
