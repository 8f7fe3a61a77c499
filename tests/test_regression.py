"""Regression: the two losses against hand-computed values, unlabeled rows as NaN targets (split, counts, the label
loss and its gradients), metrics, and the diabetes recipe end to end."""

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, classification_data, config, launch, tiny_bert
from PIL import Image
from transformers import EvalPrediction

from hf_kd import DistillationTrainer, ModelFeatures, get_loss
from hf_kd.checks import check_regression_targets
from hf_kd.data import split_labeled_transfer
from hf_kd.losses import functional as F
from hf_kd.metrics import regression_metrics
from hf_kd.trainer.batch_loss import check_regression_batch

STUDENT = torch.tensor([[0.5], [2.0], [-1.0], [0.0]])
TEACHER = torch.tensor([[1.0], [1.5], [-1.0], [3.0]])
TARGETS = torch.tensor([0.0, 1.0, float("nan"), 2.0])


def test_regression_mse_is_the_mean_squared_gap_to_the_teacher():
    # rows: 0.25, 0.25, 0, 9 → mean 2.375 (over the 4 rows), sum 9.5
    assert F.regression_mse(STUDENT, TEACHER).item() == pytest.approx(2.375)
    assert F.regression_mse(STUDENT, TEACHER, reduction="sum").item() == pytest.approx(9.5)
    two = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    assert F.regression_mse(*two).item() == pytest.approx((1 + 4) / 2)  # mean over outputs
    with pytest.raises(ValueError, match="differ in shape"):
        F.regression_mse(torch.zeros(2, 1), torch.zeros(2, 2))


def test_teacher_bounded_pays_the_students_error_only_where_it_is_worse_than_the_teachers():
    # student errors 0.25, 1, –, 4; teacher errors 1, 0.25, –, 1
    # row 0: 0.25 + 0 > 1? no → 0; row 1: 1 > 0.25 → 1; row 2: no target → 0; row 3: 4 > 1 → 4
    assert F.teacher_bounded(STUDENT, TEACHER, TARGETS, reduction="sum").item() == pytest.approx(5.0)
    # a margin of 1: row 0 pays too (0.25 + 1 > 1)
    assert F.teacher_bounded(STUDENT, TEACHER, TARGETS, margin=1.0, reduction="sum").item() == pytest.approx(5.25)
    student = STUDENT.clone().requires_grad_()
    F.teacher_bounded(student, TEACHER, TARGETS, reduction="sum").backward()
    # d/dR_s (R_s − y)² = 2(R_s − y) where paid, 0 elsewhere (the unlabeled row's gradient is 0, not NaN)
    assert student.grad.flatten().tolist() == pytest.approx([0.0, 2.0, 0.0, -4.0])


def test_the_losses_refuse_what_they_cannot_compare():
    loss = get_loss("teacher_bounded")
    features = ModelFeatures(logits=STUDENT)
    with pytest.raises(ValueError, match="needs float labels"):
        loss(features, ModelFeatures(logits=TEACHER), labels=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="finite margin >= 0"):
        get_loss("teacher_bounded", margin=-1.0)
    with pytest.raises(ValueError, match="unknown option 'temperature'"):
        get_loss("regression_mse", temperature=2.0)


def test_unlabeled_regression_rows_carry_nan_and_the_label_loss_reads_only_the_others(tmp_path):
    data = classification_data(n=16).remove_columns("labels")
    values = torch.linspace(-1, 1, 16)
    data = data.add_column("labels", values.tolist())
    labeled, transfer = split_labeled_transfer(data, 5, seed=0)
    marked = np.asarray(transfer["labels"], dtype=float)
    assert len(labeled) == 5 and np.isnan(marked).sum() == 11
    assert sorted(marked[~np.isnan(marked)].tolist()) == pytest.approx(sorted(labeled["labels"]))

    student = tiny_bert(num_labels=1, seed=1)
    teacher = tiny_bert(num_labels=1, seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, losses="regression_mse", hard_label_weight=1.0),
        train_dataset=transfer,
    )
    assert trainer.regression
    batch = {key: torch.tensor(transfer[:16][key]) for key in ("input_ids", "attention_mask", "labels")}
    counts = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    assert counts.labels.item() == 5 and counts.positions.item() == 16
    loss, outputs = trainer.compute_loss(student, dict(batch), return_outputs=True)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    given = ~torch.isnan(batch["labels"])
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s, t = student(**inputs).logits.squeeze(-1), teacher(**inputs).logits.squeeze(-1)
    expected = ((s - batch["labels"])[given] ** 2).mean() + ((s - t) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_multi_output_regression_marks_unlabeled_rows_and_learns_from_the_given_targets(tmp_path):
    data = classification_data(n=12).remove_columns("labels")
    targets = torch.randn(12, 2, generator=torch.Generator().manual_seed(3))
    data = data.add_column("labels", targets.tolist())
    labeled, transfer = split_labeled_transfer(data, 4, seed=1)
    marked = torch.tensor(transfer["labels"])
    assert marked.shape == (12, 2) and torch.isnan(marked).all(-1).sum() == 8 and not torch.isnan(marked).any(-1).all()
    student = tiny_bert(num_labels=2, seed=1)
    student.config.problem_type = "regression"  # two outputs: transformers would read float labels as multi-label
    teacher = tiny_bert(num_labels=2, seed=2)
    args = config(tmp_path, losses="regression_mse,teacher_bounded", hard_label_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=transfer)
    batch = {key: torch.tensor(transfer[:12][key]) for key in ("input_ids", "attention_mask", "labels")}
    loss = trainer.compute_loss(student, dict(batch))
    given = ~torch.isnan(batch["labels"])
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s, t = student(**inputs).logits, teacher(**inputs).logits
        y = batch["labels"].nan_to_num()
        bounded = F.teacher_bounded(s, t, batch["labels"], reduction="mean")
    expected = ((s - y)[given] ** 2).mean() + ((s - t) ** 2).mean() + bounded
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_distribution_loss_on_a_regression_head_is_refused(tmp_path):
    with pytest.raises(ValueError, match="one-logit head"):
        DistillationTrainer(
            model=tiny_bert(num_labels=1),
            teacher_model=tiny_bert(num_labels=1),
            args=config(tmp_path, losses="kl"),
            train_dataset=classification_data(),
        )


def test_infinite_targets_are_refused_with_their_row_and_nan_still_marks_unlabeled_rows(tmp_path):
    inf, nan = float("inf"), float("nan")
    data = classification_data(n=6).remove_columns("labels")
    marked = data.add_column("labels", [[0.0, 1.0], [nan, nan], [2.0, 0.5], [1.0, 1.0], [nan, nan], [0.5, 0.5]])
    check_regression_targets(marked, "train_dataset", ["labels"])  # NaN: unlabeled rows, accepted
    broken = data.add_column("labels", [[0.0, 1.0], [nan, nan], [2.0, -inf], [1.0, 1.0], [inf, 0.0], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"'labels' of row 2 of eval_dataset is \[2.0, -inf\] \(and 1 more rows\)"):
        check_regression_targets(broken, "eval_dataset", ["labels"])
    student = tiny_bert(num_labels=1, seed=1)
    scalar = data.add_column("label", [0.1, 0.2, nan, 0.4, 0.5, inf])  # the datasets' usual name, also a target
    with pytest.raises(ValueError, match=r"regression target 'label' of row 5 of eval_dataset\['b'\] is inf"):
        DistillationTrainer(
            model=student,
            teacher_model=tiny_bert(num_labels=1, seed=2),
            args=config(tmp_path, losses="regression_mse"),
            train_dataset=data.add_column("label", [0.1] * 6),
            eval_dataset={"a": data.add_column("label", [0.2] * 6), "b": scalar},
        )
    # Batch by batch (a data set the trainer cannot read up front): the data set's row with a sample_index.
    check_regression_batch(torch.tensor([0.5, nan]))
    with pytest.raises(ValueError, match="'labels' of row 9 of the data set is inf"):
        check_regression_batch(torch.tensor([0.5, inf]), sample_index=torch.tensor([7, 9]))
    with pytest.raises(ValueError, match="'labels' of row 1 of this batch is inf"):
        check_regression_batch(torch.tensor([0.5, inf]))


def test_regression_metrics_ignore_unlabeled_rows():
    prediction = EvalPrediction(predictions=np.array([[1.0], [2.0], [5.0]]), label_ids=np.array([0.0, np.nan, 3.0]))
    assert regression_metrics(prediction) == {"mse": pytest.approx((1 + 4) / 2), "mae": pytest.approx(1.5)}


@pytest.mark.slow
def test_regression_recipe_distils_on_diabetes(tmp_path):
    command = [
        sys.executable,
        os.path.join(ROOT, "recipes", "regression.py"),
        "--config",
        "recipes/configs/regression.yaml",
        "--output_dir",
        str(tmp_path),
        "--teacher_steps",
        "200",
        "--max_steps",
        "300",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = launch(command, timeout=900, env=env)
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    teacher, scratch, distilled = results.values()
    assert all(math.isfinite(row["mse"]) for row in results.values())
    assert distilled["mse"] < scratch["mse"]  # the teacher's predictions on the unlabeled rows help
    # The pictures: the quality-latency plane of the table's rows and the logged terms over the steps.
    for picture in ("results.png", "results.svg", "curves.png"):
        assert (tmp_path / picture).stat().st_size > 1000, picture
    with Image.open(tmp_path / "results.png") as image:
        assert image.format == "PNG" and image.size == (750, 450)
    # The reported MSE is the saved student's on the held-out split, re-measured here from the saved files.
    spec = importlib.util.spec_from_file_location("recipe_regression", os.path.join(ROOT, "recipes", "regression.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    student = module.TabularMLPForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    data = module.load_diabetes_dataset(str(tmp_path / "data")).with_format("torch")
    test = data.train_test_split(test_size=0.2, seed=42)["test"][:]
    with torch.no_grad():
        mse = (student(features=test["features"]).logits.squeeze(-1) - test["labels"]).pow(2).mean().item()
    assert distilled["mse"] == pytest.approx(mse, rel=1e-5)
    summary = json.loads((tmp_path / "student" / "distillation_config.json").read_text())
    assert summary["losses"] == [{"name": "regression_mse", "weight": 1.0}] and summary["student_parameters"] == 97
