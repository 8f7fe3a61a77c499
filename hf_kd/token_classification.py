"""Token classification (NER-style recognition): words with tags in, sub-word rows out, entity-level metrics.

:func:`tokenize_words` turns rows of ``words`` (and ``tags``, or none for unlabeled rows) into a tokenizer's
sub-word rows: the word's tag on its first sub-token and -100 on the others (``subtokens="first"``, the convention
of transformers' token-classification example), or on every sub-token (``"all"``); a ``distillation_positions``
column marks the tokens that carry distillation under the same convention — on every row, labeled or not, so
unlabeled text is distilled on every word. A sentence longer than ``max_length`` becomes several overlapping
windows (the tokenizer's ``return_overflowing_tokens`` with ``stride``, as in transformers' token-classification
pipeline); each word is labeled and distilled in exactly one of them, the one where it has the most context, and
the rows say where they come from (``sentence_index``, ``word_ids``). :func:`add_teacher_words` adds a teacher's own
tokenisation of each window's words (``teacher_*`` columns): the trainer then meets the k-th marked position of each
side, i.e. the same word, so a student and a teacher with different tokenizers distil word by word
(``subtokens="first"``). :func:`entity_metrics` scores predictions with seqeval (entity-level precision, recall and
F1 over BIO tags), over whole sentences joined back from their windows.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from transformers import EvalPrediction

from .data import DISTILLATION_POSITIONS
from .views import add_teacher_view

SUBTOKENS = ("first", "all")
#: The row of the words a window was cut from.
SENTENCE_INDEX = "sentence_index"
#: Per token of a window: the index of its word in the sentence, -1 for the tokenizer's special tokens.
WORD_IDS = "word_ids"


def _check_fast(tokenizer, caller: str):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{caller} needs a fast tokenizer (it reads word_ids to align words and sub-tokens); got "
            f"{type(tokenizer).__name__}: load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )


def _check_tags(index: int, words: list, tags: list | None, label2id: dict[str, int]):
    if tags is None:
        return
    if len(tags) != len(words):
        raise ValueError(f"row {index}: {len(tags)} tags for {len(words)} words; give one per word.")
    for tag in tags:
        if tag not in label2id:
            raise ValueError(f"row {index}: tag {tag!r} is not in label2id ({sorted(label2id)}).")


def _labeling_windows(encoded, windows: list[int], pieces, index: int, words: list, *, max_length, stride, room):
    """For each word of one sentence, the window (an index into ``encoded``) that labels it: among the windows that
    hold all of its sub-tokens, the one where it has the most context — the most tokens on its shorter side, as
    SQuAD's ``_check_is_max_context`` — the earlier one on ties. A word at a window's edge sees one side only; in
    the window where it is most central it is trained and predicted with both."""
    best: dict[int, tuple[int, int]] = {}  # word -> (context, window)
    for window in windows:
        word_ids = encoded.word_ids(window)
        content = [position for position, word in enumerate(word_ids) if word is not None]
        if not content:
            continue
        spans: dict[int, list[int]] = {}
        for position in content:
            spans.setdefault(word_ids[position], [position, position])[1] = position
        for word, (first, last) in spans.items():
            if last - first + 1 < pieces[word]:
                continue  # the window's edge cuts this word
            context = min(first - content[0], content[-1] - last)
            if word not in best or context > best[word][0]:
                best[word] = (context, window)
    empty = [word for word in range(len(words)) if pieces[word] == 0]
    if empty:
        raise ValueError(
            f"row {index}: {len(empty)} word(s) have no sub-token in this tokenizer (word {empty[0]}: "
            f"{words[empty[0]]!r}), so their tags could be neither trained nor scored; drop or replace them."
        )
    cut = [word for word in range(len(words)) if word not in best]
    if cut:
        longest = max(pieces[word] for word in cut)
        advice = (
            f"raise stride (the windows' overlap) to at least {longest}, or max_length"
            if longest < room
            else f"raise max_length: a window holds {room} tokens of words"
        )
        raise ValueError(
            f"row {index}: {len(cut)} of its {len(words)} words are cut by every window of max_length={max_length} "
            f"with stride={stride} (a cut word has up to {longest} sub-tokens), so their tags would be lost; {advice}."
        )
    return {word: window for word, (_, window) in best.items()}


def tokenize_words(
    dataset: Dataset,
    tokenizer,
    label2id: dict[str, int],
    *,
    words_column: str = "words",
    tags_column: str = "tags",
    subtokens: str = "first",
    max_length: int = 128,
    stride: int | None = None,
) -> Dataset:
    """Sub-word rows of rows holding words and (optionally) their tags.

    A sentence of more than ``max_length`` tokens becomes consecutive windows of ``max_length`` tokens, each
    repeating the last ``stride`` tokens of the one before. Every word is labeled (and distilled) in exactly one
    window, the one where it has the most context, so no tag is lost or counted twice; a word that no window holds
    whole, or that has no sub-token, is refused. Score the windows with ``entity_metrics(id2label, windows=rows)``,
    which joins each sentence back.

    Args:
        dataset: Rows with a list of words and a list of tag names (``None``, or no tags column: unlabeled).
        tokenizer: A fast tokenizer (its word ids map tokens to words).
        label2id: Tag name → class id.
        words_column: The words column.
        tags_column: The tags column.
        subtokens: ``"first"``: a word's tag on its first sub-token and -100 on the others; ``"all"``: on every
            sub-token (a ``B-`` tag continues as ``I-``). The distilled positions follow the same convention.
        max_length: Tokens per window, special tokens included.
        stride: Tokens a window repeats of the one before; default: a quarter of the tokens a window holds besides
            the special tokens.

    Returns:
        Rows of ``input_ids``, ``attention_mask``, ``labels``, ``distillation_positions``, ``sentence_index`` and
            ``word_ids`` (the input columns removed).

    Raises:
        ValueError: an unknown ``subtokens``, a slow tokenizer, a ``max_length`` or ``stride`` that leaves no room, a
            row whose tags are not one per word or hold a tag not in ``label2id``, or a word no window holds whole.
    """
    if subtokens not in SUBTOKENS:
        raise ValueError(f"subtokens is one of {SUBTOKENS}, got {subtokens!r}.")
    _check_fast(tokenizer, "tokenize_words")
    room = max_length - tokenizer.num_special_tokens_to_add()
    if room < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for words beside the tokenizer's "
            f"{tokenizer.num_special_tokens_to_add()} special tokens; raise it."
        )
    stride = room // 4 if stride is None else stride
    if not 0 <= stride < room:
        raise ValueError(
            f"stride is the overlap of a long sentence's windows, in tokens: from 0 to {room - 1} (max_length="
            f"{max_length} less {max_length - room} special tokens, less one); got stride={stride}. Lower it or "
            "raise max_length."
        )

    def convert(batch, indices):
        sentences = batch[words_column]
        tag_rows = batch[tags_column] if tags_column in batch else [None] * len(sentences)
        for index, words, tags in zip(indices, sentences, tag_rows):
            _check_tags(index, words, tags, label2id)
        encoded = tokenizer(
            sentences,
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
        )
        # each word's number of sub-tokens, to tell a word a window holds whole from one its edge cuts
        untruncated = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False)
        source = encoded.pop("overflow_to_sample_mapping")
        windows_of: dict[int, list[int]] = {}
        for window, row in enumerate(source):
            windows_of.setdefault(row, []).append(window)
        labeling: dict[int, dict[int, int]] = {}
        for row, windows in windows_of.items():
            pieces = np.bincount(
                [word for word in untruncated.word_ids(row) if word is not None], minlength=len(sentences[row])
            )
            labeling[row] = _labeling_windows(
                encoded, windows, pieces, indices[row], sentences[row], max_length=max_length, stride=stride, room=room
            )
        labels, positions, word_columns = [], [], []
        for window, row in enumerate(source):
            tags, labeled_here = tag_rows[row], labeling[row]
            word_ids = encoded.word_ids(window)
            row_labels, row_positions, previous = [], [], None
            for word in word_ids:
                here = word is not None and labeled_here[word] == window
                first = here and word != previous  # the window holds the whole word: its first piece is here
                marked = here and (first or subtokens == "all")
                row_positions.append(int(marked))
                if not marked or tags is None:
                    row_labels.append(-100)
                else:
                    tag = tags[word]
                    if not first and tag.startswith("B-") and f"I-{tag[2:]}" in label2id:
                        tag = f"I-{tag[2:]}"  # a word's later pieces continue its entity
                    row_labels.append(label2id[tag])
                previous = word
            labels.append(row_labels)
            positions.append(row_positions)
            word_columns.append([-1 if word is None else word for word in word_ids])
        return {
            **encoded,
            "labels": labels,
            DISTILLATION_POSITIONS: positions,
            SENTENCE_INDEX: [indices[row] for row in source],
            WORD_IDS: word_columns,
        }

    return dataset.map(convert, batched=True, with_indices=True, remove_columns=dataset.column_names)


def add_teacher_words(
    rows: Dataset, words: Dataset, teacher_tokenizer, *, words_column: str = "words", max_length: int = 128
) -> Dataset:
    """``rows`` plus the teacher's tokenisation of each row's window.

    Adds ``teacher_input_ids`` and ``teacher_attention_mask`` of the words the student's window holds, and
    ``teacher_distillation_positions`` on the first sub-token of each word the student's window marks, so that the
    k-th marked position of both sides is the same word. Batch them with
    :class:`hf_kd.cross_tokenizer.CrossTokenizerCollator`.

    Args:
        rows: The student's rows, from :func:`tokenize_words` over ``words`` with ``subtokens="first"``.
        words: The rows of words they were tokenised from.
        teacher_tokenizer: The teacher's fast tokenizer.
        words_column: The words column of ``words``.
        max_length: The teacher's tokens per window.

    Returns:
        ``rows`` with the ``teacher_*`` columns.

    Raises:
        ValueError: rows not made by :func:`tokenize_words`, a slow tokenizer, words that do not match the rows, rows
            marking several sub-tokens of a word, or a window whose marked words the teacher's ``max_length`` cuts.
    """
    missing = [
        column for column in (SENTENCE_INDEX, WORD_IDS, DISTILLATION_POSITIONS) if column not in rows.column_names
    ]
    if missing:
        raise ValueError(
            f"add_teacher_words reads which words each row holds, and the rows have no {missing} column; tokenize "
            "the student's rows with tokenize_words."
        )
    _check_fast(teacher_tokenizer, "add_teacher_words")
    sentences = words[words_column]
    spans, starts, marked_words = [], [], []
    for index, (sentence, word_ids, marked) in enumerate(
        zip(rows[SENTENCE_INDEX], rows[WORD_IDS], rows[DISTILLATION_POSITIONS])
    ):
        held = [word for word in word_ids if word >= 0]
        if sentence >= len(sentences) or (held and max(held) >= len(sentences[sentence])):
            raise ValueError(
                f"add_teacher_words: row {index} holds words of row {sentence} of the words, which the {len(sentences)}"
                " rows given do not have; give the words the student's rows were tokenised from."
            )
        chosen = [word for word, mark in zip(word_ids, marked) if mark]
        if len(chosen) != len(set(chosen)):
            raise ValueError(
                f"add_teacher_words meets the two tokenisations word by word: row {index} marks {len(chosen)} "
                f"positions for {len(set(chosen))} words; tokenize the student's rows with subtokens='first'."
            )
        start = min(held, default=0)
        spans.append(sentences[sentence][start : max(held, default=-1) + 1])
        starts.append(start)
        marked_words.append(set(chosen))
    encoded = teacher_tokenizer(spans, is_split_into_words=True, truncation=True, max_length=max_length)
    positions = []
    for index, (start, chosen) in enumerate(zip(starts, marked_words)):
        row, previous = [], None
        for word in encoded.word_ids(index):
            row.append(int(word is not None and word != previous and start + word in chosen))
            previous = word
        if sum(row) != len(chosen):
            raise ValueError(
                f"add_teacher_words: the teacher's tokens of window {index} ({len(spans[index])} words) keep "
                f"{sum(row)} of the {len(chosen)} words it distils within max_length={max_length}; raise max_length "
                "(or tokenize the student's rows with a smaller max_length)."
            )
        positions.append(row)
    view = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        DISTILLATION_POSITIONS: positions,
    }
    return add_teacher_view(rows, view)


def word_tags(predictions: np.ndarray, labels: np.ndarray, id2label: dict[int, str], windows=None):
    """The predicted and the true tags, one list per sentence over its labeled positions (the first sub-tokens).

    Args:
        predictions: Predicted class ids ``rows × T``.
        labels: True class ids ``rows × T`` (-100 where unlabeled).
        id2label: Class id → tag name.
        windows: ``None``: each row is a sentence. Else the rows of :func:`tokenize_words` that were predicted, in
            order (or their ``sentence_index`` and ``word_ids`` columns): a sentence's windows are joined back in word
            order, each word where it was labeled.

    Returns:
        ``(predicted tags, true tags)``.

    Raises:
        ValueError: ``windows`` has another number of rows than ``labels``.
    """
    if windows is None:
        sentences = range(len(labels))
        word_ids = [range(len(row)) for row in labels]
    else:
        sentences, word_ids = windows[SENTENCE_INDEX], windows[WORD_IDS]
        if len(sentences) != len(labels):
            raise ValueError(
                f"entity_metrics was built for the {len(sentences)} windows given as windows= and is scoring "
                f"{len(labels)} rows; build it with the rows being evaluated."
            )
    joined: dict[int, list] = {}  # sentence -> (word, window, position, predicted id, true id) of labeled positions
    for window, (sentence, row_words, row_predictions, row_labels) in enumerate(
        zip(sentences, word_ids, predictions, labels)
    ):
        tokens = joined.setdefault(sentence, [])
        for position in np.flatnonzero(row_labels != -100):
            tokens.append((row_words[position], window, position, row_predictions[position], row_labels[position]))
    predicted, true = [], []
    for tokens in joined.values():
        tokens.sort()
        predicted.append([id2label[int(token[3])] for token in tokens])
        true.append([id2label[int(token[4])] for token in tokens])
    return predicted, true


def entity_metrics(id2label: dict[int, str], windows: Dataset | None = None):
    """A ``compute_metrics`` for token classifiers.

    Entity-level ``f1``, ``precision`` and ``recall`` (seqeval, micro-averaged over entity types, BIO tags) and the
    tag ``accuracy`` over labeled tokens.

    Args:
        id2label: Class id → tag name.
        windows: The evaluated rows of :func:`tokenize_words`, when a sentence may span several windows: the sentence
            is then scored whole (an entity across a window's edge is one entity), not window by window.

    Returns:
        The ``compute_metrics`` function.

    Raises:
        ImportError: seqeval is not installed.
        ValueError: ``windows`` lacks the ``sentence_index`` or ``word_ids`` column.
    """
    try:
        from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    except ImportError as error:
        raise ImportError("entity metrics need seqeval: pip install seqeval (or hf_kd[recipes]).") from error
    id2label = {int(key): value for key, value in id2label.items()}
    if windows is not None:
        missing = [column for column in (SENTENCE_INDEX, WORD_IDS) if column not in windows.column_names]
        if missing:
            raise ValueError(
                f"entity_metrics(windows=...) joins a sentence's windows by their {missing} column(s), which the "
                "rows given lack; pass the rows of tokenize_words being evaluated."
            )
        windows = {column: windows[column] for column in (SENTENCE_INDEX, WORD_IDS)}  # read once, not per call

    def compute(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = np.asarray(logits).argmax(-1)
        predicted, true = word_tags(predictions, np.asarray(eval_pred.label_ids), id2label, windows)
        return {
            "f1": float(f1_score(true, predicted, zero_division=0)),
            "precision": float(precision_score(true, predicted, zero_division=0)),
            "recall": float(recall_score(true, predicted, zero_division=0)),
            "accuracy": float(accuracy_score(true, predicted)),
        }

    return compute
