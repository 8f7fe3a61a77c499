"""Several teachers: the aggregations' math, adaptive weights that leave a broken teacher, per-teacher feature terms,
one forward per teacher, mixed live and cached teachers, and a 2-process run equal to one process."""

import json
import os
import sys

import pytest
import torch
from conftest import ROOT, classification_data, config, launch, run_two_processes, tiny_bert
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_kd import DistillationTrainer, write_teacher_cache
from hf_kd.data import add_sample_index
from hf_kd.features import SparseDistribution
from hf_kd.losses import functional as F
from hf_kd.teachers.ensemble import AGGREGATIONS, TeacherAggregator

CLASSES = 3


class OracleForSequenceClassification(nn.Module):
    """A teacher that reads the label from the first token (the data puts it there), confidently; ``shift`` makes
    it confidently wrong (the label + shift)."""

    def __init__(self, shift: int = 0):
        super().__init__()
        self.config = PretrainedConfig(num_labels=CLASSES)
        self.scale = nn.Parameter(torch.tensor(6.0))
        self.shift = shift

    def forward(self, input_ids, attention_mask=None, **unused):
        target = (input_ids[:, 0] + self.shift) % CLASSES
        return SequenceClassifierOutput(logits=self.scale * nn.functional.one_hot(target, CLASSES).float())


def label_in_first_token(n=64, labeled=16, seed=0):
    data = classification_data(n=n, seed=seed)
    rows = [[label] + ids[1:] for ids, label in zip(data["input_ids"], data["labels"])]
    labels = [label if index < labeled else -100 for index, label in enumerate(data["labels"])]
    return data.remove_columns(["input_ids", "labels"]).add_column("input_ids", rows).add_column("labels", labels)


def test_every_aggregation_gives_weights_that_sum_to_one_and_combines_as_documented():
    torch.manual_seed(0)
    logits = [torch.randn(6, 5), torch.randn(6, 5)]
    labels = torch.tensor([0, 1, 2, -100, -100, 4])
    tau = 2.0
    probs = [(z / tau).softmax(-1) for z in logits]
    for mode in AGGREGATIONS:
        aggregator = TeacherAggregator(["a", "b"], mode, static_weights=[3.0, 1.0] if mode == "weighted" else None)
        weights = aggregator(logits, labels)
        assert torch.allclose(weights.sum(-1), torch.ones(6)), mode
        combined = aggregator.combine(logits, weights, tau)
        if mode == "mean_logits":
            assert torch.allclose(combined, (logits[0] + logits[1]) / 2)
        else:  # the loss at temperature tau softens the combination into Σ w_k p_k^tau
            expected = weights[:, :1] * probs[0] + weights[:, 1:] * probs[1]
            assert torch.allclose((combined / tau).softmax(-1), expected, atol=1e-6), mode
    adaptive = TeacherAggregator(["a", "b"], "adaptive", weight_temperature=0.5)
    weights = adaptive(logits, labels)
    label_log_probs = torch.stack([z.log_softmax(-1)[torch.arange(6), labels.clamp(min=0)] for z in logits], 1)
    labeled = labels.ne(-100)
    assert torch.allclose(weights[labeled], (label_log_probs[labeled] / 0.5).softmax(-1), atol=1e-6)
    mean_ce = -label_log_probs[labeled].double().mean(0)  # the running estimate after this one batch
    assert torch.allclose(adaptive.ce_sum / adaptive.ce_count, mean_ce)
    assert torch.allclose(weights[~labeled], (-mean_ce / 0.5).softmax(-1).float().expand(2, -1), atol=1e-6)


def sparse_teacher(logits, k, sampled_fillers=0):
    """``logits`` (N×V) kept at their top ``k`` entries with a uniform remainder, as a top-k cache stores them;
    ``sampled_fillers``: that many of the kept entries carry no probability (a sampled cache's zero-count ids)."""
    log_probs = logits.log_softmax(-1)
    top = log_probs.topk(k, dim=-1)
    rest = (1 - top.values.exp().sum(-1)).clamp(min=0)
    fill = (rest / (logits.shape[-1] - k)).log()
    values = top.values.clone()
    if sampled_fillers:
        values[:, -sampled_fillers:] = float("-inf")
    return SparseDistribution(top.indices, values, fill, logits.shape[-1])


@pytest.mark.parametrize("mode", ["mean_probs", "weighted", "adaptive", "best"])
def test_sparse_teachers_mix_without_their_dense_form_to_the_dense_mixture(mode):
    # Three cached teachers of different widths whose kept ids overlap (repeats across teachers): one with
    # zero-probability fillers, one whose kept entries hold all its probability (no remainder: fill -inf).
    torch.manual_seed(0)
    vocab, count, tau = 40, 12, 2.0
    base = torch.randn(count, vocab) * 3
    first = sparse_teacher(base + 0.3 * torch.randn(count, vocab), 6)
    second = sparse_teacher(base + 0.3 * torch.randn(count, vocab), 4, sampled_fillers=1)
    top = base.log_softmax(-1).topk(8, dim=-1)
    whole = SparseDistribution(top.indices, top.values.log_softmax(-1), torch.full((count,), -torch.inf), vocab)
    teachers = [first, second, whole]
    labels = torch.tensor([0, 3, -100, 5, -100, 7, 1, -100, 2, 9, -100, 4])
    static_weights = [3.0, 1.0, 2.0] if mode == "weighted" else None
    aggregator = TeacherAggregator(["a", "b", "c"], mode, static_weights=static_weights)
    dense_aggregator = TeacherAggregator(["a", "b", "c"], mode, static_weights=static_weights)
    weights = aggregator(teachers, labels)
    dense = [teacher.dense() for teacher in teachers]
    assert torch.allclose(weights, dense_aggregator(dense, labels), atol=1e-6)  # the same evidence either way
    mixed = aggregator.combine(teachers, weights, tau)
    assert isinstance(mixed, SparseDistribution) and mixed.ids.shape == (count, 18)
    assert all(len(set(row)) == 18 for row in mixed.ids.tolist())  # repeats replaced by fresh distinct ids
    assert mixed.ids.max() < vocab
    expected = (dense_aggregator.combine(dense, weights, tau) / tau).softmax(-1)
    assert torch.allclose((mixed.dense() / tau).softmax(-1), expected, atol=1e-6)
    student = torch.randn(count, vocab, requires_grad=True)
    for function in (F.sparse_forward_kl, F.sparse_soft_ce):
        reference = {F.sparse_forward_kl: F.forward_kl, F.sparse_soft_ce: F.soft_ce}[function]
        value = function(student, mixed, temperature=tau)
        target = reference(student, expected.log() * tau, temperature=tau)
        assert value.item() == pytest.approx(target.item(), rel=1e-5)
        (gradient,) = torch.autograd.grad(value, student)
        (target_gradient,) = torch.autograd.grad(target, student)
        assert torch.allclose(gradient, target_gradient, atol=1e-6)


def test_sparse_teachers_wider_than_the_vocabulary_are_mixed_densely():
    torch.manual_seed(1)
    logits = [torch.randn(4, 6), torch.randn(4, 6)]
    teachers = [sparse_teacher(z, 4) for z in logits]
    aggregator = TeacherAggregator(["a", "b"], "mean_probs")
    mixed = aggregator.combine(teachers, aggregator(teachers, None), 1.0)  # 4 + 4 kept ids > 6 classes
    assert isinstance(mixed, torch.Tensor)
    expected = (teachers[0].dense().exp() + teachers[1].dense().exp()) / 2
    assert torch.allclose(mixed.softmax(-1), expected, atol=1e-6)


def test_best_takes_the_teacher_that_is_right_with_the_highest_confidence():
    right_unsure = torch.tensor([[2.0, 1.5, 0.0]])  # argmax 0 = the label, p(label) ≈ 0.55
    wrong_but_generous = torch.tensor([[2.0, 2.1, -9.0]])  # argmax 1, p(label) ≈ 0.47 — wrong
    weights = TeacherAggregator(["a", "b"], "best")([right_unsure, wrong_but_generous], torch.tensor([0]))
    assert weights.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("labeled", [16, 4])  # a quarter of the rows labeled, and hardly any
def test_adaptive_weights_leave_a_confidently_wrong_teacher(tmp_path, labeled):
    teachers = {"oracle": OracleForSequenceClassification(), "permuted": OracleForSequenceClassification(shift=1)}
    logged = {}
    for mode in ("mean_probs", "adaptive"):
        args = config(tmp_path / mode, teacher_aggregation=mode, max_steps=8, logging_steps=1)
        trainer = DistillationTrainer(
            model=tiny_bert(hidden=16, seed=2),
            teacher_model=teachers,
            args=args,
            train_dataset=label_in_first_token(labeled=labeled),
        )
        trainer.train()
        logged[mode] = [entry["teacher_weight/permuted"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged["mean_probs"] == [0.5] * 8
    assert sum(logged["adaptive"]) / 8 < 0.1  # as confident as the oracle, but wrong on the labels
    assert max(logged["adaptive"][1:]) < 0.05  # from the second step, unlabeled rows follow the labels seen


def test_each_teacher_gets_its_own_feature_term_projector_and_layer_map(tmp_path):
    wide, narrow = tiny_bert(hidden=32, layers=4, seed=1), tiny_bert(hidden=24, layers=3, seed=3)
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, layers=2, seed=2),
        teacher_model={"wide": wide, "narrow": narrow},
        args=config(tmp_path, losses="kl,hidden_mse:1:projector=linear,hint:1:teacher=narrow"),
        train_dataset=classification_data(),
    )
    terms = {term.name: term for term in trainer.distillation_objective.terms}
    assert list(terms) == ["kl", "hidden_mse/wide", "hidden_mse/narrow", "hint/narrow"]
    assert terms["kl"].teacher == "ensemble"
    wide_loss, narrow_loss = terms["hidden_mse/wide"].loss, terms["hidden_mse/narrow"].loss
    assert wide_loss._pairs == [(1, 2), (2, 4)] and narrow_loss._pairs == [(1, 1), (2, 3)]  # uniform, per teacher
    assert [p.net.out_features for p in wide_loss.projectors] == [32, 32]
    assert [p.net.out_features for p in narrow_loss.projectors] == [24, 24]
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    assert {"kl", "hidden_mse/wide", "hidden_mse/narrow", "hint/narrow", "teacher_weight/wide"} <= last.keys()
    summary = trainer.distillation_summary()
    assert list(summary["teachers"]) == ["wide", "narrow"] and summary["teacher_aggregation"] == "mean_probs"
    assert list(trainer.compare_with_teacher(classification_data(n=8))) == ["wide", "narrow", "student"]


def test_k_teachers_cost_k_forwards_per_micro_batch(tmp_path):
    teachers = [tiny_bert(seed=seed) for seed in (1, 3, 4)]
    calls = [0, 0, 0]
    for index, teacher in enumerate(teachers):
        teacher.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    args = config(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2), teacher_model=teachers, args=args, train_dataset=classification_data()
    ).train()
    assert calls == [4, 4, 4]  # 2 steps × 2 micro-batches, once per teacher


def test_a_cached_teacher_in_the_ensemble_equals_its_live_model(tmp_path):
    data = add_sample_index(classification_data(n=16))
    live_a, live_b = tiny_bert(seed=1), tiny_bert(seed=3)
    cache = write_teacher_cache(live_b, data, str(tmp_path / "cache"), top_k=CLASSES, dtype="float32", progress=False)
    values = {}
    for name, b in (("live", live_b), ("cached", cache)):
        trainer = DistillationTrainer(
            model=tiny_bert(hidden=16, seed=2),
            teacher_model={"a": live_a, "b": b},
            args=config(tmp_path / name, losses="kl,soft_ce"),
            train_dataset=data,
        )
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.compute_loss(trainer.model, batch)
        values[name] = trainer.term_log.reduce("train")
    for key in ("kl", "soft_ce"):
        assert values["cached"][key] == pytest.approx(values["live"][key], abs=1e-6)


def test_teacher_names_and_named_losses_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"name the teachers \['c'\], which are not among the teachers \['a', 'b'\]"):
        DistillationTrainer(
            model=tiny_bert(hidden=16, seed=2),
            teacher_model={"a": tiny_bert(seed=1), "b": tiny_bert(seed=3)},
            args=config(tmp_path, losses="kl:1:teacher=c"),
            train_dataset=classification_data(),
        )
    with pytest.raises(ValueError, match="teacher names must be non-empty strings without '/'"):
        DistillationTrainer(
            model=tiny_bert(hidden=16, seed=2),
            teacher_model={"a/b": tiny_bert(seed=1)},
            args=config(tmp_path),
            train_dataset=classification_data(),
        )
    with pytest.raises(ValueError, match="teacher_weights apply to teacher_aggregation='weighted'"):
        config(tmp_path, teacher_weights=[1.0, 2.0])


def test_adaptive_reliability_checkpoints_with_the_loss_parts(tmp_path):
    teachers = {"oracle": OracleForSequenceClassification(), "permuted": OracleForSequenceClassification(shift=1)}

    def make(folder):
        args = config(folder, teacher_aggregation="adaptive", max_steps=2)
        return DistillationTrainer(
            model=tiny_bert(hidden=16, seed=2), teacher_model=teachers, args=args, train_dataset=label_in_first_token()
        )

    trained = make(tmp_path / "a")
    trained.train()
    trained.loss_parts.save(str(tmp_path / "parts"))
    fresh = make(tmp_path / "b")
    assert fresh.loss_parts.aggregator.ce_count.item() == 0
    fresh.loss_parts.load(str(tmp_path / "parts"))
    assert torch.equal(fresh.loss_parts.aggregator.ce_sum, trained.loss_parts.aggregator.ce_sum)
    assert fresh.loss_parts.aggregator.ce_count.item() == trained.loss_parts.aggregator.ce_count.item() > 0


def test_adaptive_ensemble_on_two_processes_equals_one_process(tmp_path):
    worker = os.path.join(ROOT, "tests", "distributed", "sparse_labels_worker.py")
    run_two_processes(worker, tmp_path / "two", 2, "adaptive", timeout=300)
    launch([sys.executable, worker, tmp_path / "one", 4, "adaptive"], timeout=300, check=True)
    two, one = (json.loads((tmp_path / run / "log.json").read_text()) for run in ("two", "one"))
    assert len(one) == len(two) == 16 and "teacher_weight/weak" in one[-1]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=2e-6), key
