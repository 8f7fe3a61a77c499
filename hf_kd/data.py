"""Data helpers for distillation set-ups."""

from __future__ import annotations

import numpy as np
from datasets import Dataset

UNLABELED = -100
#: Column holding each example's row in the training set, for losses with per-example memory (CRD).
SAMPLE_INDEX = "sample_index"
# A token-level row's positions that carry distillation (1/0 per token), when the labels' convention decides them
# rather than the attention mask: e.g. the first sub-token of every word (hf_kd.token_classification). Not a model
# input; with different tokenizers the k-th marked position of each side meet.
DISTILLATION_POSITIONS = "distillation_positions"


def model_inputs(inputs: dict) -> dict:
    """``inputs`` without the columns that only decide distillation positions (no model takes them).

    Args:
        inputs: A batch.

    Returns:
        A new dict without the ``distillation_positions`` column.
    """
    return {key: value for key, value in inputs.items() if key != DISTILLATION_POSITIONS}


def add_sample_index(dataset: Dataset) -> Dataset:
    """``dataset`` with a ``sample_index`` column numbering its rows 0..N−1 (what ``crd`` needs).

    Args:
        dataset: A data set (an existing ``sample_index`` column is replaced).

    Returns:
        The data set with the column.
    """
    if SAMPLE_INDEX in dataset.column_names:
        dataset = dataset.remove_columns(SAMPLE_INDEX)
    return dataset.add_column(SAMPLE_INDEX, list(range(len(dataset))))


def list_lengths(dataset, column: str) -> list[int | None]:
    """Each row's length of the list in ``column``.

    Read from the Arrow column of a ``datasets.Dataset`` without decoding its values; other map-style data sets row
    by row.

    Args:
        dataset: A ``datasets.Dataset`` or a map-style data set of dict rows.
        column: The column holding lists.

    Returns:
        One length per row, ``None`` where the row has no list.
    """
    if isinstance(dataset, Dataset):
        import pyarrow.compute as pc

        return pc.list_value_length(dataset.with_format("arrow")[column]).to_pylist()
    values = (dataset[index].get(column) for index in range(len(dataset)))
    return [None if value is None else len(value) for value in values]


def split_labeled_transfer(
    dataset: Dataset, num_labeled: int, label_column: str = "labels", seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Split ``dataset`` into a labeled part and an unlabeled transfer part.

    The labeled part keeps ``num_labeled`` examples, stratified by class (as equal per class as the data allows;
    drawn at random for regression targets). The transfer part is the whole dataset with the labels of every
    non-labeled example set to -100 (NaN for float regression targets): the student's label loss ignores them while
    distillation uses all of them, the usual semi-supervised KD set-up in which the teacher's knowledge matters most.

    Args:
        dataset: The data set.
        num_labeled: How many examples keep their labels.
        label_column: The label column.
        seed: Seeds the draw.

    Returns:
        ``(labeled, transfer)``.

    Raises:
        ValueError: ``num_labeled`` outside [1, len(dataset)].
    """
    labels = np.asarray(dataset[label_column])
    if not 0 < num_labeled <= len(labels):
        raise ValueError(f"num_labeled must be in [1, {len(labels)}], got {num_labeled}.")
    rng = np.random.default_rng(seed)
    if np.issubdtype(labels.dtype, np.floating):  # regression targets: a random draw, NaN marks the rest
        chosen = np.sort(rng.permutation(len(labels))[:num_labeled])
        keep = np.zeros(len(labels), dtype=bool)
        keep[chosen] = True
        marked = np.where(keep.reshape(-1, *[1] * (labels.ndim - 1)), labels, np.nan).tolist()
        transfer = dataset.remove_columns(label_column).add_column(label_column, marked)
        return dataset.select(chosen.tolist()), transfer.cast(dataset.features)
    classes = np.unique(labels)
    per_class = {cls: rng.permutation(np.flatnonzero(labels == cls)).tolist() for cls in classes}
    chosen: list[int] = []
    while len(chosen) < num_labeled:  # round-robin over classes: stratified, exact count
        for cls in classes:
            if per_class[cls] and len(chosen) < num_labeled:
                chosen.append(per_class[cls].pop())
    keep = np.zeros(len(labels), dtype=bool)
    keep[chosen] = True
    labeled = dataset.select(sorted(chosen))
    transfer_labels = np.where(keep, labels, UNLABELED).tolist()
    transfer = dataset.remove_columns(label_column).add_column(label_column, transfer_labels)
    return labeled, transfer


def train_bpe_tokenizer(
    texts, vocab_size: int, *, eos_token: str = "<|endoftext|>", pad_token: str | None = None, unk_token=None
):
    """A byte-level BPE tokenizer trained on ``texts`` (offline, seconds for a few MB).

    Special tokens come first: ``pad_token`` (id 0 when given), ``eos_token``, ``unk_token``; without ``pad_token``
    the eos token pads.

    Args:
        texts: An iterable of strings.
        vocab_size: The vocabulary size to train to.
        eos_token: The end-of-text token.
        pad_token: The padding token; ``None``: the eos token pads.
        unk_token: The unknown token, or ``None`` for none.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [token for token in (pad_token, eos_token, unk_token) if token is not None]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos_token, pad_token=pad_token or eos_token, unk_token=unk_token
    )
