"""Helpers the recipes stand on: the labeled/transfer split, offline metrics and the results table."""

import numpy as np
import pytest
import torch
from conftest import classification_data, config, tiny_bert
from datasets import Dataset
from transformers import EvalPrediction

from hf_kd.data import split_labeled_transfer
from hf_kd.evaluation import evaluate_model, markdown_table
from hf_kd.metrics import classification_metrics, get_compute_metrics


def test_split_labeled_transfer_is_stratified_and_hides_labels():
    data = Dataset.from_dict({"x": list(range(30)), "labels": [0] * 10 + [1] * 10 + [2] * 10})
    labeled, transfer = split_labeled_transfer(data, num_labeled=7, seed=1)
    counts = np.bincount(labeled["labels"])
    assert len(labeled) == 7 and counts.max() - counts.min() <= 1
    assert len(transfer) == 30 and sum(label != -100 for label in transfer["labels"]) == 7
    kept = {x for x, label in zip(transfer["x"], transfer["labels"]) if label != -100}
    assert kept == set(labeled["x"])
    with pytest.raises(ValueError, match="num_labeled"):
        split_labeled_transfer(data, num_labeled=0)


def test_classification_metrics_by_hand():
    logits = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = np.array([0, 1, 1, -100])
    metrics = classification_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    # class 0: precision 1/2, recall 1 → F1 2/3; class 1: precision 1, recall 1/2 → F1 2/3.
    assert metrics["macro_f1"] == pytest.approx(2 / 3)


def test_get_compute_metrics_forms(tmp_path):
    assert get_compute_metrics("accuracy") is classification_metrics
    assert get_compute_metrics(None) is None
    assert get_compute_metrics(len) is len
    with pytest.raises(ValueError, match="local evaluate module path"):
        get_compute_metrics("glue")


def test_local_evaluate_module(tmp_path):
    script = tmp_path / "exact_match_rate.py"
    script.write_text(
        "import datasets\nimport evaluate\n"
        "class ExactMatchRate(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        return evaluate.MetricInfo(description='', citation='', inputs_description='',\n"
        "            features=datasets.Features({'predictions': datasets.Value('int64'),\n"
        "                                        'references': datasets.Value('int64')}))\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'rate': sum(p == r for p, r in zip(predictions, references)) / len(references)}\n"
    )
    compute = get_compute_metrics(str(script))
    result = compute(EvalPrediction(predictions=np.array([[1.0, 0.0], [0.0, 1.0]]), label_ids=np.array([0, 0])))
    assert result == {"rate": 0.5}


def test_evaluate_model_and_table():
    row = evaluate_model(
        tiny_bert(), classification_data(n=16), compute_metrics=classification_metrics, batch_size=8, use_cpu=True
    )
    assert {"accuracy", "macro_f1", "parameters", "ms_per_example"} <= set(row)
    table = markdown_table(
        {"teacher": {"accuracy": 0.975, "parameters": 22_720_000}, "student": {"accuracy": 0.5, "parameters": 4_200}},
        ["accuracy", "parameters"],
    )
    assert table.splitlines()[2] == "| teacher | 97.5% | 22.72M |"
    assert table.splitlines()[3] == "| student | 50.0% | 4.2k |"


def test_bpe_tokenizer_trained_offline_puts_special_tokens_first():
    from hf_kd.data import train_bpe_tokenizer

    texts = ["the cat sat on the mat", "the dog sat on the log"] * 20
    tokenizer = train_bpe_tokenizer(texts, 300, eos_token="</s>", pad_token="<pad>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenizer("the cat sat")["input_ids"]
    assert tokenizer.decode(ids) == "the cat sat" and len(ids) < len("the cat sat")
    gpt_style = train_bpe_tokenizer(texts, 300)
    assert gpt_style.pad_token == gpt_style.eos_token == "<|endoftext|>"


def test_baselines_use_the_students_steps_and_save_the_teacher(tmp_path):
    from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_teacher

    epochs = config(tmp_path, max_steps=-1, num_train_epochs=2, per_device_train_batch_size=8)
    assert optimizer_steps(epochs, 30) == 8  # ceil(2 × 30 / 8)
    assert optimizer_steps(config(tmp_path, max_steps=5), 30) == 5
    args = plain_args(config(tmp_path, push_to_hub=False), 3)
    assert (args.max_steps, args.save_strategy, args.push_to_hub) == (3, "no", False)
    teacher = tiny_bert(seed=1)
    before = teacher.classifier.weight.clone()
    train_teacher(teacher, args, classification_data(), steps=2)
    assert not torch.equal(teacher.classifier.weight, before)
    assert (tmp_path / "teacher" / "model.safetensors").exists()
