"""Metrics that need no network: plain numpy, or an ``evaluate`` module loaded from a local path.

``evaluate.load("accuracy")`` fetches its script from the Hub, so it fails offline (and the ``evaluate``
package is in maintenance mode). :func:`classification_metrics` covers the common case; :func:`get_compute_metrics`
also accepts a local ``evaluate`` module path or any callable.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from transformers import EvalPrediction


def _predictions(eval_pred: EvalPrediction) -> tuple[np.ndarray, np.ndarray]:
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = np.asarray(eval_pred.label_ids)
    predictions = np.asarray(logits).argmax(-1)
    keep = labels != -100
    return predictions[keep], labels[keep]


def classification_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-F1 of argmax predictions (positions labelled -100 are ignored).

    Args:
        eval_pred: The Trainer's predictions (logits, or a tuple whose first entry they are) and labels.

    Returns:
        ``{"accuracy", "macro_f1"}``; NaN when no position is labelled.
    """
    predictions, labels = _predictions(eval_pred)
    if labels.size == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    f1_scores = []
    for cls in np.union1d(labels, predictions):
        true_positive = np.sum((predictions == cls) & (labels == cls))
        denominator = np.sum(predictions == cls) + np.sum(labels == cls)
        f1_scores.append(2 * true_positive / denominator if denominator else 0.0)
    return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1_scores))}


def regression_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """Mean squared and mean absolute error of the predictions.

    One or several outputs; NaN targets (the unlabeled rows) are ignored.

    Args:
        eval_pred: The Trainer's predictions and targets.

    Returns:
        ``{"mse", "mae"}``; NaN when no target is given.
    """
    predictions = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = np.asarray(eval_pred.label_ids, dtype=np.float64)
    predictions = np.asarray(predictions, dtype=np.float64).reshape(labels.shape)
    given = ~np.isnan(labels)
    if not given.any():
        return {"mse": float("nan"), "mae": float("nan")}
    errors = predictions[given] - labels[given]
    return {"mse": float(np.mean(errors**2)), "mae": float(np.mean(np.abs(errors)))}


RETRIEVAL_METRICS = ("mrr@10", "recall@10", "ndcg@10")


# Our names → ir-measures' (RR is the reciprocal rank, whose mean over queries is the MRR).
_IR_MEASURES = {"mrr": "RR", "recall": "R", "ndcg": "nDCG", "precision": "P", "map": "AP"}


def retrieval_metrics(
    scores: dict[str, dict[str, float]],
    relevant: dict[str, dict[str, int]],
    metrics: tuple[str, ...] = RETRIEVAL_METRICS,
) -> dict[str, float]:
    """Ranking quality, averaged over queries, by ir-measures (trec_eval's definitions; ``pip install ir-measures``).

    Args:
        scores: ``scores[query][document]``, a model's score of a candidate.
        relevant: ``relevant[query][document]``, a relevance grade (≥ 1: relevant).
        metrics: ``mrr@k``, ``recall@k``, ``ndcg@k``, ``precision@k``, ``map@k``.

    Returns:
        Each metric by name.

    Raises:
        ImportError: ir-measures is not installed.
        ValueError: a metric name of another form, or queries with grades but no scores.
    """
    try:
        import ir_measures
    except ImportError as error:
        raise ImportError("ranking metrics need ir-measures: pip install ir-measures (or hf_kd[recipes]).") from error
    measures = {}
    for name in metrics:
        kind, _, cutoff = name.partition("@")
        if kind not in _IR_MEASURES or not cutoff.isdigit():
            raise ValueError(
                f"retrieval metrics look like mrr@10 ({', '.join(_IR_MEASURES)} @ a cutoff), got {name!r}."
            )
        measures[name] = ir_measures.parse_measure(f"{_IR_MEASURES[kind]}@{cutoff}")
    missing = sorted(set(relevant) - set(scores))
    if missing:  # trec_eval would skip them silently and report a mean over the others
        raise ValueError(f"{len(missing)} queries have relevance grades but no scores, e.g. {missing[:3]}.")
    values = ir_measures.calc_aggregate(list(measures.values()), relevant, scores)
    return {name: float(values[measure]) for name, measure in measures.items()}


def ranking_metrics(groups, metrics: tuple[str, ...] = ("mrr@10", "ndcg@10")) -> dict[str, float]:
    """:func:`retrieval_metrics` of queries given as ``(scores, grades)`` pairs.

    Args:
        groups: One ``(scores, grades)`` pair per query, one score and one relevance grade per candidate (as
            :func:`hf_kd.ranking.score_groups` returns them).
        metrics: The metric names (see :func:`retrieval_metrics`).

    Returns:
        Each metric by name.

    Raises:
        ValueError: a query without one grade per score.
    """
    scores, relevant = {}, {}
    for index, (values, grades) in enumerate(groups):
        if grades is None or len(values) != len(grades):
            raise ValueError(f"query {index}: ranking metrics need one relevance grade per candidate score.")
        scores[f"q{index}"] = {f"c{j}": float(value) for j, value in enumerate(values)}
        relevant[f"q{index}"] = {f"c{j}": int(grade) for j, grade in enumerate(grades) if grade > 0}
    return retrieval_metrics(scores, relevant, metrics)


def ranking_compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """MRR@10 and nDCG@10 for a Trainer evaluating a ranker.

    Args:
        eval_pred: Predictions and labels ``B×G``; the candidates of a query are its entries with a label (the
            collator and the Trainer pad with -100).

    Returns:
        ``{"mrr@10", "ndcg@10"}``.
    """
    predictions = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    predictions, labels = np.asarray(predictions), np.asarray(eval_pred.label_ids)
    groups = [(row[grades != -100], grades[grades != -100]) for row, grades in zip(predictions, labels)]
    return ranking_metrics(groups)


def nearest_neighbours(
    queries: np.ndarray, documents: np.ndarray, query_ids: list[str], document_ids: list[str], k: int = 100
) -> dict[str, dict[str, float]]:
    """Each query's ``k`` most similar documents by cosine similarity, the run that :func:`retrieval_metrics` scores.

    Args:
        queries: Query embeddings, one per row.
        documents: Document embeddings, one per row.
        query_ids: The queries' ids, in row order.
        document_ids: The documents' ids, in row order.
        k: Documents kept per query (at most all of them).

    Returns:
        ``{query: {document: cosine}}``.
    """
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(min=1e-12)
    d = documents / np.linalg.norm(documents, axis=1, keepdims=True).clip(min=1e-12)
    similarity = q @ d.T
    k = min(k, len(document_ids))
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    return {query: {document_ids[j]: float(similarity[i, j]) for j in top[i]} for i, query in enumerate(query_ids)}


def get_compute_metrics(metric: str | Callable | None = "accuracy") -> Callable | None:
    """A ``compute_metrics`` for ``Trainer``.

    Args:
        metric: ``"accuracy"`` → :func:`classification_metrics`; ``"mse"`` → :func:`regression_metrics`; ``"mrr"`` →
            :func:`ranking_compute_metrics`; a path to a local ``evaluate`` module (folder or script) → that module
            applied to argmax predictions; a callable is returned as is; ``None`` → no metrics.

    Returns:
        The function, or ``None``.

    Raises:
        ValueError: a string that is none of the names and no existing path.
    """
    if metric is None or callable(metric):
        return metric
    if metric == "accuracy":
        return classification_metrics
    if metric == "mse":
        return regression_metrics
    if metric == "mrr":
        return ranking_compute_metrics
    if os.path.exists(metric):
        import evaluate

        module = evaluate.load(metric)

        def compute(eval_pred: EvalPrediction) -> dict[str, float]:
            predictions, labels = _predictions(eval_pred)
            return module.compute(predictions=predictions, references=labels)

        return compute
    raise ValueError(
        f"metric {metric!r} is neither 'accuracy', 'mse' nor a local evaluate module path; evaluate.load() of a Hub "
        "metric needs the network, so give the path of a local copy of its script."
    )
