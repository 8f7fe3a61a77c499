"""Refusal-table rows of token classification: long sentences in windows, every word's tag kept and scored once."""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from refusal_cases import Case
from transformers import BertTokenizerFast, EvalPrediction

from hf_kd.token_classification import add_teacher_words, entity_metrics, tokenize_words

TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
LABEL2ID = {tag: index for index, tag in enumerate(TAGS)}


def _wordpiece(tmp_path, vocab=("ann", "smith", "acme", "met", "the", "bro", "##wn"), name="ner_vocab"):
    path = tmp_path / f"{name}.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab]))
    return BertTokenizerFast(str(path))


def _long_sentence(n=50):
    """``n`` words cycling through a PER, an ORG and plain words, so that entities fall across windows."""
    cycle = [("ann", "B-PER"), ("smith", "I-PER"), ("met", "O"), ("acme", "B-ORG"), ("the", "O")]
    return [cycle[i % len(cycle)][0] for i in range(n)], [cycle[i % len(cycle)][1] for i in range(n)]


def _fifty_words_in_sixteen_tokens(tmp_path):
    words, tags = _long_sentence()
    return tags, tokenize_words(
        Dataset.from_list([{"words": words, "tags": tags}]), _wordpiece(tmp_path), LABEL2ID, max_length=16
    )


def _check_every_tag_once(result, _):
    tags, windows = result
    assert len(windows) > 1  # 50 words do not fit 16 tokens: several windows, not one truncated row
    labeled = sorted(
        (word, label)
        for window in windows
        for word, label in zip(window["word_ids"], window["labels"])
        if label != -100
    )
    assert [word for word, _ in labeled] == list(range(50))  # every word exactly once
    assert [TAGS[label] for _, label in labeled] == tags


def _scored_whole(tmp_path):
    words, tags = _long_sentence()
    windows = tokenize_words(
        Dataset.from_list([{"words": words, "tags": tags}]), _wordpiece(tmp_path), LABEL2ID, max_length=16, stride=4
    )
    labels = np.full((len(windows), 16), -100)
    for row, window in enumerate(windows):
        labels[row, : len(window["labels"])] = window["labels"]
    logits = np.eye(len(TAGS))[np.where(labels == -100, 0, labels)]  # predicts every tag right
    return entity_metrics(dict(enumerate(TAGS)), windows=windows)(EvalPrediction(predictions=logits, label_ids=labels))


def _check_scored_whole(values, _):
    # 10 PERs and 10 ORGs, all right: a window edge splitting "ann smith" into two entities would cost precision
    assert values["f1"] == values["precision"] == values["recall"] == values["accuracy"] == 1.0


def _word_cut_by_every_window(tmp_path):
    words = ["brown"] * 12  # two pieces each; no overlap cuts a word at every window's edge
    return tokenize_words(
        Dataset.from_list([{"words": words, "tags": ["O"] * 12}]),
        _wordpiece(tmp_path),
        {"O": 0},
        max_length=7,
        stride=0,
    )


def _teacher_window_too_long(tmp_path):
    words = Dataset.from_list([{"words": ["ann", "met", "acme", "the", "ann"], "tags": None}])
    rows = tokenize_words(words, _wordpiece(tmp_path), LABEL2ID)
    letters = _wordpiece(tmp_path, ["a", "m", "t", "##n", "##e", "##t", "##c", "##m", "##h"], name="letters")
    return add_teacher_words(rows, words, letters, max_length=8)


CASES = [
    Case(
        "ner-long-sentence-windows",
        "`tokenize_words` with 50 tagged words and `max_length=16`",
        _fifty_words_in_sixteen_tokens,
        check=_check_every_tag_once,
    ),
    Case(
        "ner-windows-scored-whole",
        "`entity_metrics(id2label, windows=rows)` over a 50-word sentence in windows of 16 tokens",
        _scored_whole,
        check=_check_scored_whole,
    ),
    Case(
        "ner-stride-too-large",
        "`tokenize_words(..., max_length=16, stride=14)`",
        lambda p: tokenize_words(
            Dataset.from_list([{"words": ["ann"], "tags": ["B-PER"]}]),
            _wordpiece(p),
            LABEL2ID,
            max_length=16,
            stride=14,
        ),
        ValueError,
        "stride is the overlap of a long sentence's windows",
    ),
    Case(
        "ner-word-cut-by-every-window",
        "`tokenize_words(..., max_length=7, stride=0)` with words of two sub-tokens",
        _word_cut_by_every_window,
        ValueError,
        "cut by every window",
    ),
    Case(
        "ner-word-without-sub-tokens",
        "`tokenize_words` with a word the tokenizer turns into no token (a zero-width space)",
        lambda p: tokenize_words(
            Dataset.from_list([{"words": ["ann", "\u200b"], "tags": ["B-PER", "O"]}]), _wordpiece(p), LABEL2ID
        ),
        ValueError,
        "no sub-token in this tokenizer",
    ),
    Case(
        "ner-teacher-window-too-long",
        "`add_teacher_words(..., max_length=8)` with a teacher that needs more tokens for a window's words",
        _teacher_window_too_long,
        ValueError,
        "the teacher's tokens of window 0",
    ),
    Case(
        "ner-metrics-other-windows",
        "`entity_metrics(id2label, windows=rows)` scoring predictions of other rows",
        lambda p: entity_metrics(dict(enumerate(TAGS)), windows=_fifty_words_in_sixteen_tokens(p)[1])(
            EvalPrediction(predictions=np.zeros((2, 16, len(TAGS))), label_ids=np.zeros((2, 16), dtype=int))
        ),
        ValueError,
        "was built for the 5 windows",
    ),
    Case(
        "ner-teacher-words-hand-made-rows",
        "`add_teacher_words` on rows not made by `tokenize_words`",
        lambda p: add_teacher_words(
            Dataset.from_list([{"input_ids": [2, 5, 3], "distillation_positions": [0, 1, 0]}]),
            Dataset.from_list([{"words": ["ann"]}]),
            _wordpiece(p),
        ),
        ValueError,
        "tokenize the student's rows with tokenize_words",
    ),
]
