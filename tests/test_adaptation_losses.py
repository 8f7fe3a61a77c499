"""Domain-adaptation options of the losses (French et al. 2018, self-ensembling): ``confidence_threshold`` on every
response loss, and the ``class_balance`` loss, against hand computations."""

import math

import pytest
import torch
from conftest import classification_data, config, lm_data, tiny_bert, tiny_gpt2

from hf_kd import DistillationTrainer, ModelFeatures
from hf_kd.config import parse_losses
from hf_kd.features import SparseDistribution
from hf_kd.losses import available_losses, functional, get_loss, resolve_loss_class
from hf_kd.losses.response import ResponseLoss, teacher_confident

# Teacher rows with known top-class probabilities: 0.98, 0.5, 0.97, 0.4 (softmax of log-probabilities).
TEACHER_PROBABILITIES = torch.tensor(
    [[0.98, 0.01, 0.01], [0.5, 0.3, 0.2], [0.015, 0.97, 0.015], [0.3, 0.3, 0.4]], dtype=torch.float64
)
TEACHER = TEACHER_PROBABILITIES.log()
STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.3, 0.1, -0.2], [2.0, 0.0, 1.0]], dtype=torch.float64)
# At 0.968 (French et al.'s 0.96837722 rounded), rows 0 and 2 are kept.
KEPT = torch.tensor([True, False, True, False])

RESPONSE_IDS = [name for name in available_losses() if issubclass(resolve_loss_class(name), ResponseLoss)]


def features(logits):
    return ModelFeatures(logits=logits)


def test_confident_positions_keep_exactly_the_rows_at_or_above_the_threshold():
    assert functional.confident_positions(TEACHER, 0.968).tolist() == KEPT.tolist()
    assert functional.confident_positions(TEACHER, 0.45).tolist() == [True, True, True, False]
    assert functional.confident_positions(TEACHER, 0.99).tolist() == [False] * 4
    # Token-level logits: a bool per position.
    assert functional.confident_positions(TEACHER.reshape(2, 2, 3), 0.968).tolist() == [[True, False], [True, False]]


def test_kl_with_a_threshold_is_the_hand_sum_over_the_confident_rows_and_leaves_the_others_untouched():
    student = STUDENT.clone().requires_grad_()
    value = get_loss("kl", confidence_threshold=0.968)(features(student), features(TEACHER))
    p_s = torch.softmax(STUDENT, -1)
    by_hand = sum(
        sum(float(t) * math.log(float(t) / float(s)) for t, s in zip(TEACHER_PROBABILITIES[row], p_s[row]))
        for row in (0, 2)
    )
    assert value.item() == pytest.approx(by_hand, rel=1e-10)
    value.backward()
    # ∂KL(p_T ‖ p_S)/∂z_S = p_S − p_T on the kept rows, exactly 0 on the others.
    expected = torch.where(KEPT[:, None], p_s - TEACHER_PROBABILITIES, torch.zeros_like(p_s))
    torch.testing.assert_close(student.grad, expected)
    assert (student.grad[~KEPT] == 0).all()


def test_the_threshold_narrows_the_given_mask():
    mask = torch.tensor([False, True, True, True])
    value = get_loss("prob_mse", confidence_threshold=0.968)(features(STUDENT), features(TEACHER), mask=mask)
    by_hand = ((torch.softmax(STUDENT[2], -1) - TEACHER_PROBABILITIES[2]) ** 2).mean()  # row 2 alone
    assert value.item() == pytest.approx(by_hand.item(), rel=1e-10)


@pytest.mark.parametrize("name", RESPONSE_IDS)
def test_every_response_loss_takes_the_threshold_as_a_mask_of_the_confident_rows(name):
    """The thresholded value and gradients are the loss's own on the rows the hand computation keeps."""
    labels = torch.tensor([1, -100, 0, 2])
    student = STUDENT.clone().requires_grad_()
    thresholded = get_loss(name, confidence_threshold=0.968)(features(student), features(TEACHER), labels=labels)
    thresholded.backward()
    reference_student = STUDENT.clone().requires_grad_()
    reference = get_loss(name)(features(reference_student), features(TEACHER), mask=KEPT, labels=labels)
    reference.backward()
    assert thresholded.item() == pytest.approx(reference.item(), rel=1e-10)
    assert thresholded.item() != 0.0
    torch.testing.assert_close(student.grad, reference_student.grad)
    assert (student.grad[~KEPT] == 0).all() and (student.grad[KEPT] != 0).any()


def test_the_threshold_reads_a_cached_teachers_top_k_rows():
    top = TEACHER_PROBABILITIES.topk(2, dim=-1)
    rest = (1 - top.values.sum(-1)).log()  # the one remaining class holds the rest
    sparse = SparseDistribution(top.indices, top.values.log(), rest, vocab_size=3)
    assert teacher_confident(ModelFeatures(sparse_logits=sparse), 0.968).tolist() == KEPT.tolist()
    student = STUDENT.clone().requires_grad_()
    value = get_loss("kl", confidence_threshold=0.968)(features(student), ModelFeatures(sparse_logits=sparse))
    dense = get_loss("kl")(features(STUDENT), features(TEACHER), mask=KEPT)
    assert value.item() == pytest.approx(dense.item(), rel=1e-9)


def test_the_threshold_parses_from_the_compact_form_and_shows_in_the_repr():
    (spec,) = parse_losses("prob_mse:3:confidence_threshold=0.968")
    assert (spec.weight, spec.options) == (3.0, {"confidence_threshold": 0.968})
    assert "confidence_threshold=0.968" in repr(get_loss(spec.name, **spec.options))


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, -0.1, "high"])
def test_a_threshold_outside_zero_one_is_refused(threshold):
    with pytest.raises(ValueError, match=r"confidence_threshold of loss 'kl' must be a probability in \(0, 1\)"):
        get_loss("kl", confidence_threshold=threshold)


def test_the_threshold_is_refused_where_no_teacher_probability_is_read():
    with pytest.raises(ValueError, match="loss 'hidden_mse' does not take confidence_threshold"):
        get_loss("hidden_mse", confidence_threshold=0.9)
    with pytest.raises(ValueError, match="loss 'regression_mse' does not take confidence_threshold"):
        config("unused", losses="regression_mse:1:confidence_threshold=0.9")


def test_the_threshold_is_refused_on_a_one_logit_head():
    score = torch.randn(4, 1)
    with pytest.raises(ValueError, match="the teacher has one logit per position"):
        get_loss("logit_mse", confidence_threshold=0.9)(features(score), features(score))


def lm_loss_and_grads(tmp_path, student, teacher, losses, chunk_size):
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=lm_data(n=6),
        args=config(tmp_path, losses=losses, chunk_size=chunk_size, hard_label_weight=0.0),  # the term alone
    )
    batch = {k: torch.tensor(v) for k, v in lm_data(n=6)[:].items()}
    student.zero_grad()
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    return loss.item(), grads, trainer.term_log.reduce("train")


@pytest.mark.parametrize("loss", ["kl", "jsd"])
def test_a_thresholded_loss_on_the_chunked_path_equals_the_plain_path(tmp_path, loss):
    """The fused kernels know no threshold: a thresholded loss goes through autograd there, with the same values and
    the same logged kept share."""
    student, teacher = tiny_gpt2(hidden=16, layers=1, seed=2), tiny_gpt2(seed=1)
    with torch.no_grad():  # a threshold between the teacher's confidences, so that it keeps some positions only
        batch = {k: torch.tensor(v) for k, v in lm_data(n=6)[:].items() if k != "labels"}
        top = torch.softmax(teacher(**batch).logits.float(), -1).amax(-1).flatten()
    threshold = round(float(top.median()), 6)
    losses = f"{loss}:1:confidence_threshold={threshold}"
    plain, plain_grads, plain_logged = lm_loss_and_grads(tmp_path / "a", student, teacher, losses, None)
    chunked, chunked_grads, chunked_logged = lm_loss_and_grads(tmp_path / "b", student, teacher, losses, 5)
    unthresholded, _, _ = lm_loss_and_grads(tmp_path / "c", student, teacher, loss, None)
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert plain < 0.9 * unthresholded  # the threshold left positions out
    kept = plain_logged[f"confident/{loss}"]  # the share of distilled positions kept, logged on both paths alike
    assert 0.2 < kept < 0.8 and chunked_logged[f"confident/{loss}"] == pytest.approx(kept, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _threshold_between(probabilities, kept):
    """A threshold that keeps exactly the ``kept`` most confident of these top-class probabilities."""
    ordered = probabilities.sort(descending=True).values
    return float((ordered[kept - 1] + ordered[kept]) / 2)


def test_the_share_a_threshold_keeps_is_logged_per_term_in_training_and_evaluation(tmp_path):
    data, teacher = classification_data(n=8), tiny_bert(seed=1)
    batch = {k: torch.tensor(v) for k, v in data[:].items()}
    with torch.no_grad():
        top = teacher(**batch).logits.softmax(-1).amax(-1)
    threshold = _threshold_between(top, kept=3)  # 3 of the 8 rows
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2),
        teacher_model=teacher,
        args=config(
            tmp_path,
            losses=f"kl:1:confidence_threshold={threshold},tvd:1",
            max_steps=1,
            logging_steps=1,
            per_device_train_batch_size=8,
        ),
        train_dataset=data,
        eval_dataset=data,
    )
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged["confident/kl"] == pytest.approx(3 / 8) and "confident/tvd" not in logged  # tvd has no threshold
    metrics = trainer.evaluate(eval_dataset=data.select(range(5)))  # the exact share over the whole set, not per batch
    assert metrics["eval_confident/kl"] == pytest.approx(float((top[:5] >= threshold).float().mean()))


def test_the_confident_positions_are_computed_once_per_teacher_output(monkeypatch):
    import hf_kd.losses.response as response

    calls = []
    original = response.F.confident_positions
    monkeypatch.setattr(response.F, "confident_positions", lambda *args: calls.append(1) or original(*args))
    teacher = features(TEACHER)
    loss = get_loss("kl", confidence_threshold=0.968)
    loss(features(STUDENT), teacher)
    assert loss.confident_mask(teacher, None).tolist() == KEPT.tolist() and len(calls) == 1  # the loss's, reused
    teacher.logits = TEACHER.flip(0)  # new outputs in the same features object: computed afresh
    assert loss.confident_mask(teacher, None).tolist() == KEPT.flip(0).tolist() and len(calls) == 2


def test_mutual_learning_logs_each_peers_kept_share_against_its_peer(tmp_path):
    from hf_kd.schemes.mutual_learning import MutualLearningTrainer

    data = classification_data(n=8)
    peers = [tiny_bert(hidden=16, seed=1), tiny_bert(hidden=32, seed=2)]
    batch = {k: torch.tensor(v) for k, v in data[:].items()}
    with torch.no_grad():
        tops = [peer(**batch).logits.softmax(-1).amax(-1) for peer in peers]
    threshold = _threshold_between(tops[1], kept=5)
    trainer = MutualLearningTrainer(
        peers, config(tmp_path, losses=f"kl:1:confidence_threshold={threshold}"), train_dataset=data
    )
    trainer.compute_loss(trainer.model, dict(batch))
    logged = trainer.term_log.reduce("train")
    assert logged["confident/kl/peer0"] == pytest.approx(5 / 8)  # peer 0 learns where peer 1 is sure
    assert logged["confident/kl/peer1"] == pytest.approx(float((tops[0] >= threshold).float().mean()))


# ---- class balance --------------------------------------------------------------------------------------------


def class_balance_by_hand(logits, rows):
    """Σ_c −(1/C)·log m_c − (1 − 1/C)·log(1 − m_c), m the mean softmax of ``rows``, in plain Python floats."""
    probabilities = [[math.exp(v) for v in row] for row in logits[rows].tolist()]
    probabilities = [[p / sum(row) for p in row] for row in probabilities]
    classes = len(probabilities[0])
    mean = [sum(row[c] for row in probabilities) / len(probabilities) for c in range(classes)]
    return sum(-(1 / classes) * math.log(m) - (1 - 1 / classes) * math.log(1 - m) for m in mean)


def test_class_balance_is_the_hand_computed_bce_over_the_unlabeled_rows():
    labels = torch.tensor([-100, 2, -100, 0])
    value = get_loss("class_balance")(features(STUDENT), features(None), labels=labels)
    assert value.item() == pytest.approx(class_balance_by_hand(STUDENT, [0, 2]), rel=1e-12)
    every = get_loss("class_balance", rows="all")(features(STUDENT), features(None), labels=labels)
    assert every.item() == pytest.approx(class_balance_by_hand(STUDENT, [0, 1, 2, 3]), rel=1e-12)
    # A batch without labels is all unlabeled; a mask narrows the rows; no row at all gives 0.
    unlabeled = get_loss("class_balance")(features(STUDENT), features(None))
    assert unlabeled.item() == pytest.approx(class_balance_by_hand(STUDENT, [0, 1, 2, 3]), rel=1e-12)
    masked = get_loss("class_balance")(features(STUDENT), features(None), mask=torch.tensor([1, 1, 0, 1]).bool())
    assert masked.item() == pytest.approx(class_balance_by_hand(STUDENT, [0, 1, 3]), rel=1e-12)
    labeled = get_loss("class_balance")(features(STUDENT), features(None), labels=torch.tensor([0, 1, 2, 0]))
    assert labeled.item() == 0.0


def test_class_balance_gradient_matches_the_chain_rule_and_spares_the_labeled_rows():
    labels = torch.tensor([-100, 2, -100, 0])
    student = STUDENT.clone().requires_grad_()
    get_loss("class_balance")(features(student), features(None), labels=labels).backward()
    # ∂L/∂m_c = −u/m_c + (1 − u)/(1 − m_c); ∂m_c/∂z_ik = p_ic·(δ_ck − p_ik)/N over the N unlabeled rows i.
    p = torch.softmax(STUDENT[[0, 2]], -1)
    m, u = p.mean(0), 1 / 3
    d_m = -u / m + (1 - u) / (1 - m)
    by_hand = (p * d_m - p * (p * d_m).sum(-1, keepdim=True)) / 2
    torch.testing.assert_close(student.grad[[0, 2]], by_hand)
    assert (student.grad[[1, 3]] == 0).all()


def test_class_balance_is_smallest_on_a_balanced_batch():
    balanced = torch.eye(3, dtype=torch.float64) * 5  # one row per class: the mean is uniform
    student = balanced.clone().requires_grad_()
    value = get_loss("class_balance")(features(student), features(None))
    binary_entropy = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    assert value.item() == pytest.approx(3 * binary_entropy, rel=1e-12)
    value.backward()
    torch.testing.assert_close(student.grad, torch.zeros_like(student.grad))
    collapsed = torch.tensor([[5.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    assert get_loss("class_balance")(features(collapsed), features(None)).item() > value.item() + 1.0


def test_class_balance_with_a_threshold_is_scaled_by_the_confident_fraction_of_its_rows():
    labels = torch.tensor([-100, -100, -100, 0])  # rows 0, 1, 2 unlabeled; of these the teacher is sure of 0 and 2
    value = get_loss("class_balance", confidence_threshold=0.968)(features(STUDENT), features(TEACHER), labels=labels)
    assert value.item() == pytest.approx(class_balance_by_hand(STUDENT, [0, 1, 2]) * 2 / 3, rel=1e-12)


def test_class_balance_registry_entry_and_refusals():
    cls = resolve_loss_class("class_balance")
    assert "class_balance" in available_losses()
    assert cls.paper.startswith("French, Mackiewicz & Fisher 2018, Self-ensembling for visual domain adaptation")
    assert parse_losses("class_balance")[0].weight == 0.005  # their code's weight
    assert not cls.per_position and get_loss("class_balance").side_needs("teacher") == frozenset()
    assert get_loss("class_balance", confidence_threshold=0.9).side_needs("teacher") == {"logits"}
    with pytest.raises(ValueError, match="class_balance rows must be 'unlabeled' or 'all', got 'target'"):
        get_loss("class_balance", rows="target")
    with pytest.raises(ValueError, match="needs one label per position"):
        get_loss("class_balance")(features(STUDENT), features(None), labels=torch.zeros(4, 3))


def test_the_self_ensembling_objective_trains_a_mean_teacher(tmp_path):
    """French et al.'s objective end to end: thresholded consistency + class balance with the EMA teacher."""
    from hf_kd.schemes.mean_teacher import mean_teacher

    data = classification_data(n=16)
    data = data.map(lambda row, index: {"labels": row["labels"] if index < 8 else -100}, with_indices=True)
    student = tiny_bert(hidden=16, seed=3)
    trained, ema = mean_teacher(
        student,
        config(tmp_path, max_steps=2),
        ema_decay=0.9,
        consistency_loss="prob_mse:3:confidence_threshold=0.34,class_balance:0.005",
        train_dataset=data,
    )
    logged = [row for row in trained.trainer.state.log_history if "class_balance" in row]
    assert logged and all(math.isfinite(row["class_balance"]) and row["class_balance"] > 0 for row in logged)
    assert all(math.isfinite(row["prob_mse"]) for row in logged)
