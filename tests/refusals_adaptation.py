"""Domain-adaptation options of the losses refused where they cannot apply (issue 29): ``confidence_threshold`` and
``class_balance``."""

from __future__ import annotations

import torch
from conftest import classification_data, config, tiny_bert
from refusal_cases import Case

from hf_kd import DistillationTrainer, ModelFeatures
from hf_kd.losses import get_loss


def _trainer(tmp_path, losses):
    return DistillationTrainer(
        model=tiny_bert(hidden=16, seed=1),
        teacher_model=tiny_bert(seed=2),
        args=config(tmp_path / "out", losses=losses),
        train_dataset=classification_data(n=8),
    )


def _one_logit_threshold(tmp_path):
    scores = ModelFeatures(logits=torch.randn(4, 1))
    return get_loss("logit_mse", confidence_threshold=0.9)(scores, scores)


def _class_balance_on_multilabel_rows(tmp_path):
    logits = ModelFeatures(logits=torch.randn(4, 3))
    return get_loss("class_balance")(logits, ModelFeatures(), labels=torch.zeros(4, 3))


CASES = [
    Case(
        "confidence-threshold-range",
        '`losses="kl:1:confidence_threshold=1.5"`',
        lambda p: _trainer(p, "kl:1:confidence_threshold=1.5"),
        ValueError,
        "confidence_threshold of loss 'kl' must be a probability in (0, 1)",
    ),
    Case(
        "confidence-threshold-feature-loss",
        '`losses="hidden_mse:1:confidence_threshold=0.9"` (reads no teacher probabilities)',
        lambda p: config(p, losses="hidden_mse:1:confidence_threshold=0.9"),
        ValueError,
        "loss 'hidden_mse' does not take confidence_threshold",
    ),
    Case(
        "confidence-threshold-one-logit",
        "`logit_mse` with `confidence_threshold=0.9` on a one-logit head",
        _one_logit_threshold,
        ValueError,
        "the teacher has one logit per position",
    ),
    Case(
        "class-balance-rows",
        '`losses="class_balance:0.005:rows=target"`',
        lambda p: _trainer(p, "class_balance:0.005:rows=target"),
        ValueError,
        "class_balance rows must be 'unlabeled' or 'all'",
    ),
    Case(
        "class-balance-label-shape",
        "`class_balance` (rows `unlabeled`) with multi-label `labels` of shape (4, 3)",
        _class_balance_on_multilabel_rows,
        ValueError,
        "needs one label per position",
    ),
]
