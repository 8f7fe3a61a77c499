"""Ranking: each example is a query with a group of candidates, each scored by a model.

A ranking row holds, per query, its candidates in one or both of two layouts — ``input_ids`` (G token lists, one
query–candidate pair each, for cross-encoders) and ``query_input_ids`` + ``candidate_input_ids`` (the query once,
G candidate token lists, for bi-encoders) — with optional ``labels`` (G relevance grades) and ``teacher_scores``
(G precomputed teacher scores). :class:`RankingCollator` pads the groups into ``B×G(×T)`` tensors with a
``group_mask``; :class:`CrossEncoderRanker` and :class:`BiEncoderRanker` score them as ``logits`` ``B×G``, with
``-inf`` where a query has no candidate (the convention of masked vocabulary entries: softmax losses give them no
weight, ``margin_mse`` skips them). :class:`TeacherScores` is a teacher that reads the precomputed column. The
ranking losses (``margin_mse``, ``listwise_kl``) live in :mod:`hf_kd.losses.ranking`; metrics in
:func:`hf_kd.metrics.ranking_metrics`.
"""

from __future__ import annotations

import os

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .data import list_lengths
from .sentence_embeddings import SentenceEmbeddingModel
from .teachers import PrecomputedPredictions

PAIR_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
BI_COLUMNS = ("query_input_ids", "query_attention_mask", "candidate_input_ids", "candidate_attention_mask")
GROUP_COLUMNS = ("group_mask", "labels", "teacher_scores")
#: The columns a ranking row may set (``group_mask`` is the collator's own).
RANKING_COLUMNS = (*PAIR_COLUMNS, *BI_COLUMNS, "labels", "teacher_scores")
#: Columns holding one token list per candidate.
CANDIDATE_LISTS = ("input_ids", "attention_mask", "token_type_ids", "candidate_input_ids", "candidate_attention_mask")


class RankingCollator:
    """Pads ranking rows into a batch.

    The batch holds ``input_ids`` ``B×G×T`` (pairs), ``query_input_ids`` ``B×T``, ``candidate_input_ids``
    ``B×G×T``, their attention masks, ``group_mask`` ``B×G`` (real candidates), ``labels`` ``B×G`` (-100 where
    none) and ``teacher_scores`` ``B×G`` (-inf where none). Every row has the same columns (one layout, or both in
    every row). :meth:`check_dataset` applies the same checks to a whole data set before training (the trainer calls
    it on the data sets it is given).

    Args:
        pad_token_id: The tokenizer's pad id.
        group_size: Every query must have exactly this many candidates (an error names the row otherwise); ``None``:
            ragged groups, padded to the batch's largest.

    Raises:
        ValueError: ``group_size`` < 1.
    """

    def __init__(self, pad_token_id: int = 0, group_size: int | None = None):
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1 (or None for ragged groups), got {group_size}.")
        self.pad_token_id, self.group_size = pad_token_id, group_size

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Pad the rows' groups into one batch.

        Args:
            rows: Ranking rows (see the module's docstring for their columns).

        Returns:
            The batch of tensors described above.

        Raises:
            ValueError: a row the collator refuses (see :meth:`check_dataset`), naming it.
        """
        shapes = [_row_shape(row) for row in rows]
        counts = [self._candidates(shape, index, shapes[0]) for index, shape in enumerate(shapes)]
        width = self.group_size or max(counts)
        batch: dict[str, torch.Tensor] = {}
        group_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for index, count in enumerate(counts):
            group_mask[index, :count] = True
        batch["group_mask"] = group_mask
        if "input_ids" in shapes[0]:
            batch.update(self._pad_groups(rows, "input_ids", "attention_mask", width))
            if "token_type_ids" in shapes[0]:
                batch["token_type_ids"] = self._pad_groups(rows, "token_type_ids", None, width)["token_type_ids"]
        if "candidate_input_ids" in shapes[0]:
            batch.update(self._pad_groups(rows, "candidate_input_ids", "candidate_attention_mask", width))
            queries = [list(row["query_input_ids"]) for row in rows]
            length = max(len(query) for query in queries)
            batch["query_input_ids"] = torch.tensor([q + [self.pad_token_id] * (length - len(q)) for q in queries])
            batch["query_attention_mask"] = torch.tensor([[1] * len(q) + [0] * (length - len(q)) for q in queries])
        for column, fill, dtype in (("labels", -100, torch.float32), ("teacher_scores", float("-inf"), torch.float32)):
            if column in shapes[0]:
                values = torch.full((len(rows), width), fill, dtype=dtype)
                for index, row in enumerate(rows):
                    values[index, : counts[index]] = torch.as_tensor(row[column], dtype=dtype)
                batch[column] = values
        return batch

    def check_dataset(self, dataset, losses=()) -> None:
        """Refuse, before training, a data set whose rows the collator would refuse at some step or lay out wrongly.

        Rows with another layout or other columns than row 0, rows that are not grouped or have no candidate, candidate
        counts off ``group_size``, labels or teacher scores not one per candidate, and queries with fewer candidates
        than ``losses`` compare. Lengths are read without decoding the token lists; an iterable data set is checked
        batch by batch instead.

        Args:
            dataset: A ``datasets.Dataset`` or a map-style data set of rows.
            losses: The loss classes (their ``min_group_size``: 2 for ``margin_mse`` and ``listwise_kl``).

        Raises:
            ValueError: the first such row, naming it.
        """
        if not hasattr(dataset, "__len__") or len(dataset) == 0:  # an iterable data set: checked batch by batch
            return
        columns = getattr(dataset, "column_names", None) or list(dataset[0])
        present = [column for column in RANKING_COLUMNS if column in columns]
        lengths = {column: list_lengths(dataset, column) for column in present}
        lists = {column: _column_is_grouped(dataset, column) for column in present if column in CANDIDATE_LISTS}
        shapes = [
            {
                column: (lengths[column][index], lists.get(column, True))
                for column in present
                if lengths[column][index] is not None
            }
            for index in range(len(dataset))
        ]
        need = max((getattr(loss, "min_group_size", 1) for loss in losses), default=1)
        for index, shape in enumerate(shapes):
            count = self._candidates(shape, index, shapes[0])
            if count < need:
                needing = sorted({loss.name for loss in losses if getattr(loss, "min_group_size", 1) > 1})
                raise ValueError(
                    f"ranking row {index} has {count} candidate{'s' if count != 1 else ''}: {needing} compare each "
                    f"query's candidates with each other and need at least {need} per query (a query with fewer adds "
                    "nothing to them). Give every query negatives, or drop the rows with fewer candidates."
                )

    def _candidates(self, shape: dict, index: int, first: dict) -> int:
        """The row's number of candidates, after checking its shape (``{column: (length, grouped)}`` of the
        columns it sets) against the collator's rules and row 0's columns (``first``)."""
        layouts = [column for column in ("input_ids", "candidate_input_ids") if column in shape]
        if not layouts:
            raise ValueError(
                f"ranking row {index} has neither input_ids (query–candidate pairs) nor candidate_input_ids "
                f"(bi-encoder candidates); its columns: {sorted(shape)}."
            )
        if set(shape) != set(first):
            raise ValueError(
                f"ranking row {index} sets {sorted(shape)} but row 0 sets {sorted(first)}: every row of a ranking "
                "data set needs the same columns — one layout (input_ids pairs, or query_input_ids + "
                "candidate_input_ids), or both in every row."
            )
        if "candidate_input_ids" in shape and "query_input_ids" not in shape:
            raise ValueError(f"ranking row {index} has candidate_input_ids but no query_input_ids: give its query.")
        counts = {shape[column][0] for column in layouts}
        if counts == {0}:
            raise ValueError(
                f"ranking row {index} has no candidates (an empty {layouts[0]}): every query needs at least one "
                "candidate to score; drop the row."
            )
        if not all(shape[column][1] for column in layouts):
            raise ValueError(
                f"ranking row {index} is not grouped: input_ids / candidate_input_ids hold one token list per "
                "candidate of the query (a list of lists); see hf_kd.ranking."
            )
        if len(counts) > 1:
            raise ValueError(f"ranking row {index}: its pair and bi-encoder layouts list {sorted(counts)} candidates.")
        (count,) = counts
        if self.group_size is not None and count != self.group_size:
            raise ValueError(
                f"ranking row {index} has {count} candidates but group_size is {self.group_size}: give every query "
                "the same number, or group_size=None to pad ragged groups."
            )
        for column in ("labels", "teacher_scores"):
            if column in shape and shape[column][0] != count:
                raise ValueError(
                    f"ranking row {index}: {shape[column][0]} {column} for {count} candidates; give one per candidate."
                )
        return count

    def _pad_groups(self, rows, key: str, mask_key: str | None, width: int) -> dict[str, torch.Tensor]:
        length = max(len(candidate) for row in rows for candidate in row[key])
        pad = self.pad_token_id if key.endswith("input_ids") else 0
        ids = torch.full((len(rows), width, length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width, length), dtype=torch.long)
        for i, row in enumerate(rows):
            for j, candidate in enumerate(row[key]):
                ids[i, j, : len(candidate)] = torch.as_tensor(candidate, dtype=torch.long)
                mask[i, j, : len(candidate)] = 1
        return {key: ids, **({mask_key: mask} if mask_key else {})}


def _row_shape(row: dict) -> dict[str, tuple[int, bool]]:
    """``{column: (its length, whether it holds lists)}`` for the ranking columns ``row`` sets."""
    shape = {}
    for column in RANKING_COLUMNS:
        value = row.get(column)
        if value is not None:
            lists = column not in CANDIDATE_LISTS or not len(value) or isinstance(value[0], (list, tuple))
            shape[column] = (len(value), lists)
    return shape


def _column_is_grouped(dataset, column: str) -> bool:
    """Whether ``column`` of a data set holds a list of lists per row: its Arrow type for a ``datasets.Dataset``
    (one type for every row), else its first set row's values."""
    if isinstance(dataset, Dataset):
        import pyarrow as pa

        kind = dataset.with_format("arrow")[column].type
        lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
        return any(is_list(kind) for is_list in lists) and any(is_list(kind.value_type) for is_list in lists)
    row = next((row for row in (dataset[index] for index in range(len(dataset))) if row.get(column)), None)
    return row is None or isinstance(row[column][0], (list, tuple))


def _grouped(tensor: torch.Tensor | None, name: str, dims: int) -> torch.Tensor:
    if tensor is None or tensor.dim() != dims:
        shape = None if tensor is None else tuple(tensor.shape)
        raise ValueError(
            f"a ranker scores groups of candidates: {name} must be {'B×G×T' if dims == 3 else 'B×T'}, got {shape}. "
            "Lay the batch out with hf_kd.ranking.RankingCollator."
        )
    return tensor


def _label_loss(scores: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Binary cross-entropy of each judged candidate's score against relevant (grade > 0) or not."""
    if labels is None:
        return None
    judged = labels.ne(-100) & ~labels.isnan()
    if not judged.any():
        return None
    return nn.functional.binary_cross_entropy_with_logits(scores[judged].float(), labels[judged].gt(0).float())


class _Ranker(nn.Module):
    def signature_columns(self) -> list[str]:
        """Every ranking column (the Trainer keeps those): a cross-encoder student may learn from a bi-encoder
        teacher, which reads the other layout of the same rows."""
        return [*PAIR_COLUMNS, *BI_COLUMNS, *GROUP_COLUMNS]


class CrossEncoderRanker(_Ranker):
    """A cross-encoder: a ``…ForSequenceClassification`` with one logit scores each query–candidate pair.

    Only the real candidates are run. With ``labels``, its loss is the binary cross-entropy of the judged
    candidates (the reranker's usual training on binary labels).

    Args:
        model: A sequence classifier with ``num_labels=1``.

    Raises:
        ValueError: the model has another number of labels.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(
                f"a cross-encoder scores a pair with one logit: build it with num_labels=1, got "
                f"num_labels={getattr(model.config, 'num_labels', None)}."
            )
        self.model = model  # (no config of its own: the head's num_labels=1 is not a regression target here)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, group_mask=None, labels=None, **_):
        """Score each query's candidates.

        Args:
            input_ids: ``B×G×T``, one query–candidate pair per candidate.
            attention_mask: ``B×G×T``.
            token_type_ids: ``B×G×T``, when the model takes them.
            group_mask: ``B×G``, True on real candidates; ``None``: all are.
            labels: ``B×G`` relevance grades (-100 or NaN: unjudged), for the loss.
            **_: Other batch columns, ignored.

        Returns:
            A ``SequenceClassifierOutput`` with ``logits`` ``B×G`` (-inf where no candidate) and the loss when labels
                are given.

        Raises:
            ValueError: ``input_ids`` is not ``B×G×T``.
        """
        input_ids = _grouped(input_ids, "input_ids", 3)
        group_mask = group_mask if group_mask is not None else torch.ones(input_ids.shape[:2], dtype=torch.bool)
        group_mask = group_mask.to(input_ids.device).bool()
        pairs = {"input_ids": input_ids[group_mask]}
        if attention_mask is not None:
            pairs["attention_mask"] = attention_mask[group_mask]
        if token_type_ids is not None:
            pairs["token_type_ids"] = token_type_ids[group_mask]
        scores = self.model(**pairs).logits.squeeze(-1)
        logits = scores.new_full(group_mask.shape, float("-inf")).masked_scatter(group_mask, scores)
        return SequenceClassifierOutput(loss=_label_loss(logits, labels), logits=logits)

    def save_checkpoint(self, folder: str, processing_class=None) -> None:
        """Save the wrapped model (and the tokenizer) with ``save_pretrained``.

        Args:
            folder: The folder to write.
            processing_class: The tokenizer, or ``None``.
        """
        self.model.save_pretrained(folder)
        if processing_class is not None:
            processing_class.save_pretrained(folder)

    def load_checkpoint(self, folder: str) -> None:
        """Read back the weights :meth:`save_checkpoint` wrote.

        Args:
            folder: The folder :meth:`save_checkpoint` wrote.
        """
        from .checkpoints import load_model_weights

        load_model_weights(self.model, os.path.join(folder, "model.safetensors"))


class BiEncoderRanker(_Ranker):
    """A bi-encoder: a :class:`~hf_kd.sentence_embeddings.SentenceEmbeddingModel` embeds the query and each candidate
    apart.

    Args:
        encoder: The sentence encoder.
        similarity: ``"cosine"`` or ``"dot"``: the score of a query–candidate pair.
        scale: The factor on the similarity (a softmax over cosines needs a sharper scale, as in
            sentence-transformers' MultipleNegativesRankingLoss).

    Raises:
        ValueError: another ``similarity``.
    """

    def __init__(self, encoder: SentenceEmbeddingModel, similarity: str = "cosine", scale: float = 20.0):
        super().__init__()
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity is 'cosine' or 'dot', got {similarity!r}.")
        self.encoder, self.similarity, self.scale = encoder, similarity, scale

    def forward(
        self,
        query_input_ids=None,
        query_attention_mask=None,
        candidate_input_ids=None,
        candidate_attention_mask=None,
        group_mask=None,
        labels=None,
        **_,
    ):
        """Score each query's candidates.

        Args:
            query_input_ids: ``B×T``, each query once.
            query_attention_mask: ``B×T``.
            candidate_input_ids: ``B×G×T``.
            candidate_attention_mask: ``B×G×T``.
            group_mask: ``B×G``, True on real candidates; ``None``: all are.
            labels: ``B×G`` relevance grades (-100 or NaN: unjudged), for the loss.
            **_: Other batch columns, ignored.

        Returns:
            A ``SequenceClassifierOutput`` with ``logits`` ``B×G`` (-inf where no candidate) and the binary
                cross-entropy of the judged candidates when labels are given.

        Raises:
            ValueError: the query or candidate ids are not laid out by :class:`RankingCollator`.
        """
        candidate_input_ids = _grouped(candidate_input_ids, "candidate_input_ids", 3)
        query_input_ids = _grouped(query_input_ids, "query_input_ids", 2)
        group_mask = group_mask if group_mask is not None else torch.ones(candidate_input_ids.shape[:2], dtype=bool)
        group_mask = group_mask.to(candidate_input_ids.device).bool()
        queries = self.encoder(input_ids=query_input_ids, attention_mask=query_attention_mask).embeddings
        mask = None if candidate_attention_mask is None else candidate_attention_mask[group_mask]
        candidates = self.encoder(input_ids=candidate_input_ids[group_mask], attention_mask=mask).embeddings
        query_of = torch.arange(len(queries), device=queries.device)[:, None].expand(group_mask.shape)[group_mask]
        q = queries[query_of]
        if self.similarity == "cosine":
            q, candidates = nn.functional.normalize(q, dim=-1), nn.functional.normalize(candidates, dim=-1)
        scores = (q * candidates).sum(-1) * self.scale
        logits = scores.new_full(group_mask.shape, float("-inf")).masked_scatter(group_mask, scores)
        return SequenceClassifierOutput(loss=_label_loss(logits, labels), logits=logits)

    def save_checkpoint(self, folder: str, processing_class=None) -> None:
        """Save the encoder (and the tokenizer) as its own ``save_checkpoint`` does.

        Args:
            folder: The folder to write.
            processing_class: The tokenizer, or ``None``.
        """
        self.encoder.save_checkpoint(folder, processing_class)

    def load_checkpoint(self, folder: str) -> None:
        """Read back the encoder's weights :meth:`save_checkpoint` wrote.

        Args:
            folder: The folder :meth:`save_checkpoint` wrote.
        """
        self.encoder.load_checkpoint(folder)


class TeacherScores(PrecomputedPredictions):
    """A teacher whose scores were computed beforehand: it returns the batch's ``teacher_scores`` column (``B×G``,
    laid out by :class:`RankingCollator`) as its logits — the precomputed-column source of ranking distillation. The
    column is the teacher's view of the rows (:mod:`hf_kd.views`): the teacher reads it as ``scores``, the student
    never sees it."""

    def __init__(self):
        super().__init__("scores", hint="give the rows one score per candidate")


def score_groups(ranker: nn.Module, dataset, collator: RankingCollator, batch_size: int = 16):
    """Per query of ``dataset``: its candidates' scores and their relevance grades.

    Evaluation mode, no grad; the ranker's training mode is restored afterwards.

    Args:
        ranker: A :class:`CrossEncoderRanker` or :class:`BiEncoderRanker` (or a model with the same forward).
        dataset: Ranking rows.
        collator: Lays the rows out.
        batch_size: Rows per forward pass.

    Returns:
        One ``(scores, grades or None)`` pair of numpy arrays per query, the padding dropped — what
            :func:`hf_kd.metrics.ranking_metrics` reads.
    """
    was_training, device = ranker.training, next(ranker.parameters()).device
    ranker.eval()
    groups = []
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                batch = collator([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
                inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
                logits = ranker(**inputs).logits.float().cpu()
                for index, mask in enumerate(batch["group_mask"]):
                    grades = batch["labels"][index][mask].numpy() if "labels" in batch else None
                    groups.append((logits[index][mask].numpy(), grades))
    finally:
        ranker.train(was_training)
    return groups
