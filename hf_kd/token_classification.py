"""Token classification (NER-style recognition): words with tags in, sub-word rows out, entity-level metrics.

:func:`tokenize_words` turns rows of ``words`` (and ``tags``, or none for unlabeled rows) into a tokenizer's
sub-word rows: the word's tag on its first sub-token and -100 on the others (``subtokens="first"``, the convention
of transformers' token-classification example), or on every sub-token (``"all"``); a ``distillation_positions``
column marks the tokens that carry distillation under the same convention — on every row, labeled or not, so
unlabeled text is distilled on every word. :func:`add_teacher_words` adds a teacher's own tokenisation of the same
words (``teacher_*`` columns): the trainer then meets the k-th marked position of each side, i.e. the same word,
so a student and a teacher with different tokenizers distil word by word (``subtokens="first"``).
:func:`entity_metrics` scores predictions with seqeval (entity-level precision, recall and F1 over BIO tags).
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from transformers import EvalPrediction

from .data import DISTILLATION_POSITIONS
from .views import TEACHER_PREFIX

SUBTOKENS = ("first", "all")


def _word_rows(batch, tokenizer, words_column, max_length):
    encoded = tokenizer(batch[words_column], is_split_into_words=True, truncation=True, max_length=max_length)
    if not hasattr(encoded, "word_ids"):
        raise ValueError("tokenize_words needs a fast tokenizer (it reads word_ids to align words and sub-tokens).")
    return encoded


def tokenize_words(
    dataset: Dataset,
    tokenizer,
    label2id: dict[str, int],
    *,
    words_column: str = "words",
    tags_column: str = "tags",
    subtokens: str = "first",
    max_length: int = 128,
) -> Dataset:
    """Sub-word rows (``input_ids``, ``attention_mask``, ``labels``, ``distillation_positions``) of rows holding
    ``words`` (a list of strings) and ``tags`` (a list of tag names, or ``None`` for an unlabeled row)."""
    if subtokens not in SUBTOKENS:
        raise ValueError(f"subtokens is one of {SUBTOKENS}, got {subtokens!r}.")

    def convert(batch):
        encoded = _word_rows(batch, tokenizer, words_column, max_length)
        labels, positions = [], []
        tag_rows = batch[tags_column] if tags_column in batch else [None] * len(batch[words_column])
        for index, tags in enumerate(tag_rows):
            word_ids = encoded.word_ids(index)
            if tags is not None and len(tags) != len(batch[words_column][index]):
                raise ValueError(
                    f"row {index}: {len(tags)} tags for {len(batch[words_column][index])} words; give one per word."
                )
            row_labels, row_positions, previous = [], [], None
            for word in word_ids:
                first = word is not None and word != previous
                marked = word is not None and (first or subtokens == "all")
                row_positions.append(int(marked))
                if not marked or tags is None:
                    row_labels.append(-100)
                else:
                    tag = tags[word]
                    if tag not in label2id:
                        raise ValueError(f"row {index}: tag {tag!r} is not in label2id ({sorted(label2id)}).")
                    if not first and tag.startswith("B-") and f"I-{tag[2:]}" in label2id:
                        tag = f"I-{tag[2:]}"  # a word's later pieces continue its entity
                    row_labels.append(label2id[tag])
                previous = word
            labels.append(row_labels)
            positions.append(row_positions)
        return {**encoded, "labels": labels, DISTILLATION_POSITIONS: positions}

    return dataset.map(convert, batched=True, remove_columns=dataset.column_names)


def add_teacher_words(
    rows: Dataset, words: Dataset, teacher_tokenizer, *, words_column: str = "words", max_length: int = 128
) -> Dataset:
    """``rows`` (from :func:`tokenize_words` over ``words``) plus the teacher's tokenisation of the same words:
    ``teacher_input_ids``, ``teacher_attention_mask`` and ``teacher_distillation_positions`` (the first sub-token of
    every word). Batch them with :class:`hf_kd.cross_tokenizer.CrossTokenizerCollator`."""
    if len(rows) != len(words):
        raise ValueError(f"add_teacher_words: {len(rows)} tokenised rows for {len(words)} rows of words.")
    for index, (marked, row_words) in enumerate(zip(rows[DISTILLATION_POSITIONS], words[words_column])):
        if sum(marked) > len(row_words):
            raise ValueError(
                f"add_teacher_words meets the two tokenisations word by word: row {index} marks {sum(marked)} "
                f"positions for {len(row_words)} words; tokenize the student's rows with subtokens='first'."
            )
    teacher = tokenize_words(
        words.select_columns([words_column]),
        teacher_tokenizer,
        {},
        words_column=words_column,
        tags_column="",
        max_length=max_length,
    )
    for column in ("input_ids", "attention_mask", DISTILLATION_POSITIONS):
        rows = rows.add_column(TEACHER_PREFIX + column, teacher[column])
    return rows


def word_tags(predictions: np.ndarray, labels: np.ndarray, id2label: dict[int, str]):
    """``(predicted tags, true tags)``: one list per row over its labeled positions (the first sub-tokens)."""
    predicted, true = [], []
    for row_predictions, row_labels in zip(predictions, labels):
        keep = row_labels != -100
        predicted.append([id2label[int(value)] for value in row_predictions[keep]])
        true.append([id2label[int(value)] for value in row_labels[keep]])
    return predicted, true


def entity_metrics(id2label: dict[int, str]):
    """A ``compute_metrics`` for token classifiers: entity-level ``f1``, ``precision`` and ``recall`` (seqeval,
    micro-averaged over entity types, BIO tags) and the tag ``accuracy`` over labeled tokens."""
    try:
        from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    except ImportError as error:
        raise ImportError("entity metrics need seqeval: pip install seqeval (or hf_kd[recipes]).") from error
    id2label = {int(key): value for key, value in id2label.items()}

    def compute(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predicted, true = word_tags(np.asarray(logits).argmax(-1), np.asarray(eval_pred.label_ids), id2label)
        return {
            "f1": float(f1_score(true, predicted, zero_division=0)),
            "precision": float(precision_score(true, predicted, zero_division=0)),
            "recall": float(recall_score(true, predicted, zero_division=0)),
            "accuracy": float(accuracy_score(true, predicted)),
        }

    return compute
