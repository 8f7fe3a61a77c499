"""Knowledge amalgamation (hf_kd.schemes.amalgamation): the uhc loss against hand-computed values and gradients,
teachers' logits placed at the student's class ids, disjoint and overlapping label sets, the refusals, and a run
through run_scheme whose student beats an untrained one over the union of the teachers' classes."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import VOCAB, config, tiny_bert, tiny_gpt2
from datasets import Dataset

from hf_kd import ModelFeatures, get_loss, write_teacher_cache
from hf_kd.losses import functional as F
from hf_kd.schemes import AmalgamationConfig, run_scheme
from hf_kd.schemes.amalgamation import (
    LabelSubsetTeacher,
    amalgamation,
    amalgamation_losses,
    class_maps,
    union_label_config,
    union_labels,
)

INF = float("-inf")
NAMES = ["a", "b", "c", "d"]


def _named(model, names):
    """``model`` with its classes named ``names`` (config.id2label / label2id)."""
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: index for index, name in enumerate(names)}
    return model


def _softmax(values, temperature=1.0):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


# ---- the loss ----------------------------------------------------------------------------------------------------


def test_uhc_is_the_kl_to_the_student_restricted_and_renormalised_to_the_teachers_classes():
    # The student over 4 classes; the teacher knows classes 0 and 2 (logits 0.5, -0.5), -inf at 1 and 3.
    student = torch.tensor([[1.0, 2.0, -1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.5, INF, -0.5, INF]])
    loss = get_loss("uhc", temperature=1.0)
    value = loss(ModelFeatures(logits=student), ModelFeatures(logits=teacher))
    # By hand: p = softmax(0.5, -0.5), q̂ = softmax(1, -1) (classes 0 and 2 only), KL(p ‖ q̂).
    assert value.item() == pytest.approx(0.0826077448947449, rel=1e-5)  # float32
    value.backward()
    p, q = _softmax([0.5, -0.5]), _softmax([1.0, -1.0])
    expected = torch.tensor([[q[0] - p[0], 0.0, q[1] - p[1], 0.0]])  # ∂/∂z = τ(q̂ − p) on its classes, 0 elsewhere
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_uhc_softens_and_scales_by_the_temperature_as_the_other_response_losses(temperature):
    student = torch.tensor([[1.0, 2.0, -1.0, 0.0], [0.0, 0.3, 0.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[0.5, INF, -0.5, INF], [INF, 1.0, 2.0, -1.0]])
    value = F.subset_kl(student, teacher, temperature=temperature, reduction="sum")
    expected, gradient = 0.0, torch.zeros(2, 4)
    for row, known in ((0, [0, 2]), (1, [1, 2, 3])):
        p = _softmax([teacher[row, k].item() for k in known], temperature)
        q = _softmax([student[row, k].item() for k in known], temperature)
        expected += temperature**2 * sum(a * math.log(a / b) for a, b in zip(p, q))
        for k, a, b in zip(known, p, q):
            gradient[row, k] = temperature * (b - a)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    if temperature == 2.0:  # the first row alone, worked out by hand: 4·KL(softmax(0.25, -0.25) ‖ softmax(0.5, -0.5))
        assert F.subset_kl(student[:1], teacher[:1], temperature=2.0).item() == pytest.approx(
            0.11182015094875586, rel=1e-5
        )
    value.backward()
    torch.testing.assert_close(student.grad, gradient, rtol=1e-5, atol=1e-7)


def test_uhc_with_every_class_known_is_kl_and_masks_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 6), torch.randn(5, 6)
    mask = torch.tensor([True, False, True, True, False])
    for reduction in ("sum", "mean"):
        uhc = F.subset_kl(student, teacher, temperature=2.0, mask=mask, reduction=reduction)
        kl = F.forward_kl(student, teacher, temperature=2.0, mask=mask, reduction=reduction)
        torch.testing.assert_close(uhc, kl)


def test_disjoint_teachers_fix_each_set_but_not_the_split_between_them_overlapping_ones_tie_them():
    """Each teacher's term reads only its classes, so with disjoint sets the student may move all its logits of one
    set up together at no cost (the split between the sets comes from elsewhere: labels, the network); a shared class
    ties the sets together."""
    student = torch.tensor([[0.2, -0.4, 1.0, 0.1]])

    def total(logits, sets):
        terms = []
        for known, values in sets:
            teacher = torch.full((1, 4), INF)
            teacher[0, known] = torch.tensor(values)
            terms.append(F.subset_kl(logits, teacher, temperature=1.0, reduction="sum"))
        return sum(terms)

    disjoint = [([0, 1], [1.0, 0.0]), ([2, 3], [0.0, 2.0])]
    overlapping = [([0, 1, 2], [1.0, 0.0, 0.5]), ([2, 3], [0.0, 2.0])]
    shift = torch.tensor([[3.0, 3.0, 0.0, 0.0]])  # the first set's logits up together
    assert total(student + shift, disjoint).item() == pytest.approx(total(student, disjoint).item(), rel=1e-6)
    assert total(student + shift, overlapping).item() != pytest.approx(total(student, overlapping).item(), rel=1e-3)
    # The hand-computed sum of the two terms, overlapping sets.
    expected = 0.0
    for known, values in overlapping:
        p, q = _softmax(values), _softmax([student[0, k].item() for k in known])
        expected += sum(a * math.log(a / b) for a, b in zip(p, q))
    assert total(student, overlapping).item() == pytest.approx(expected, rel=1e-6)


def test_the_naive_kl_reads_the_teacher_zero_padded():
    # kl against a teacher with -inf at the classes it does not know: Σ over its classes of p (log p − log q), q over
    # all the student's classes (AmalgamationConfig(loss="kl"), the baseline the UHC paper compares with).
    student = torch.tensor([[1.0, 2.0, -1.0, 0.0]])
    teacher = torch.tensor([[0.5, INF, -0.5, INF]])
    p, q = _softmax([0.5, -0.5]), _softmax([1.0, 2.0, -1.0, 0.0])
    expected = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[2])
    assert F.forward_kl(student, teacher).item() == pytest.approx(expected, rel=1e-6)


# ---- label sets --------------------------------------------------------------------------------------------------


def test_teacher_logits_are_placed_at_the_students_ids_of_its_classes():
    teacher = _named(tiny_bert(hidden=16, num_labels=3, seed=1), ["d", "a", "c"])  # its own order
    student_names = ["a", "b", "c", "d"]
    maps = class_maps(student_names, {"t": ["d", "a", "c"], "u": ["b", "c"]})
    assert maps == {"t": [3, 0, 2], "u": [1, 2]}
    source = LabelSubsetTeacher(teacher, maps["t"], 4, ["d", "a", "c"])
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    own = teacher(**inputs).logits
    placed = source(inputs, frozenset({"logits"})).logits
    assert placed.shape == (2, 4)
    torch.testing.assert_close(placed[:, [3, 0, 2]], own)
    assert torch.isneginf(placed[:, 1]).all()
    assert source.describe()["classes"] == ["d", "a", "c"]


def test_the_union_is_the_first_teachers_classes_then_each_later_ones_new_classes():
    low = _named(tiny_bert(hidden=16, num_labels=3, seed=1), ["a", "b", "c"])
    high = _named(tiny_bert(hidden=16, num_labels=3, seed=2), ["d", "c", "e"])
    assert union_labels([low, high]) == ["a", "b", "c", "d", "e"]
    assert union_labels({"high": high, "low": low}) == ["d", "c", "e", "a", "b"]
    assert union_label_config([low, high]) == {
        "num_labels": 5,
        "id2label": {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"},
        "label2id": {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4},
    }


def test_kl_in_losses_stands_for_the_teachers_terms_and_feature_losses_stay(tmp_path):
    args = config(tmp_path, losses="kl:2:temperature=4,hidden_mse:0.5")
    assert amalgamation_losses(args, ["low", "high"]) == [
        {"name": "uhc", "weight": 2.0, "teacher": "low", "temperature": 4},
        {"name": "uhc", "weight": 2.0, "teacher": "high", "temperature": 4},
        {"name": "hidden_mse", "weight": 0.5},
    ]
    assert amalgamation_losses(config(tmp_path, losses="hidden_mse"), ["t"], "kl") == [
        {"name": "kl", "weight": 1.0, "teacher": "t"},
        {"name": "hidden_mse", "weight": 1.0},
    ]


# ---- refusals ----------------------------------------------------------------------------------------------------


def assert_refused(message, tmp_path, teachers, student, **overrides):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        amalgamation(teachers, student, config(tmp_path / "out", max_steps=1, **overrides), train_dataset=_rows(8))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_teacher_class_the_student_lacks_is_refused_with_the_names(tmp_path):
    teachers = {
        "low": _named(tiny_bert(num_labels=2, seed=1), ["a", "b"]),
        "high": _named(tiny_bert(seed=2), NAMES[1:]),
    }
    student = _named(tiny_bert(hidden=16, num_labels=3, seed=3), ["a", "b", "c"])
    assert_refused(
        "teacher 'high' knows the classes ['d'], which the student does not have (its classes: ['a', 'b', 'c']): "
        "build the student over the union of the teachers' classes, e.g. with "
        "hf_kd.schemes.amalgamation.union_label_config(teachers).",
        tmp_path,
        teachers,
        student,
    )


def test_placeholder_label_names_are_refused_naming_the_fix(tmp_path):
    student = _named(tiny_bert(hidden=16, seed=3), ["a", "b", "c"])
    assert_refused(
        "teacher 'teacher0' knows the classes ['LABEL_0', 'LABEL_1', 'LABEL_2'], which the student does not have "
        "(its classes: ['a', 'b', 'c']) (LABEL_0, LABEL_1, ... are transformers' placeholder names, which name no "
        "class: set the teacher's config.id2label to the names of its classes): build the student over the union of "
        "the teachers' classes, e.g. with hf_kd.schemes.amalgamation.union_label_config(teachers).",
        tmp_path,
        [tiny_bert(seed=1)],
        student,
    )


def test_a_student_class_no_teacher_knows_is_refused(tmp_path):
    teachers = {
        "low": _named(tiny_bert(num_labels=2, seed=1), ["a", "b"]),
        "high": _named(tiny_bert(seed=2), NAMES[1:]),
    }
    student = _named(tiny_bert(hidden=16, num_labels=5, seed=3), [*NAMES, "e"])
    assert_refused(
        "the student's classes ['e'] are known by no teacher (the teachers' classes: {'low': ['a', 'b'], 'high': "
        "['b', 'c', 'd']}), so nothing would teach them: drop them from the student's id2label, or add a teacher "
        "that knows them.",
        tmp_path,
        teachers,
        student,
    )


def test_a_class_named_twice_is_refused(tmp_path):
    student = _named(tiny_bert(hidden=16, seed=3), ["a", "b", "a"])
    assert_refused(
        "the student's config.id2label names ['a'] more than once: amalgamation matches classes across models by "
        "name, so each class needs a name of its own.",
        tmp_path,
        [_named(tiny_bert(seed=1), ["a", "b", "c"])],
        student,
    )


def test_models_that_are_not_classifiers_and_teachers_without_classes_are_refused(tmp_path):
    assert_refused(
        "amalgamation matches classes by name (config.id2label) across classifiers; the student is a GPT2LMHeadModel, "
        "which is not a classifier (…ForSequenceClassification, …ForImageClassification, …ForTokenClassification, "
        "...).",
        tmp_path,
        [tiny_gpt2(seed=1)],
        tiny_gpt2(seed=2),
    )
    labeled = _rows(8).map(lambda row: {"labels": row["labels"] % 3})
    cache = write_teacher_cache(tiny_bert(seed=1), labeled, str(tmp_path / "cache"), top_k=3)
    assert_refused(
        "amalgamation reads each teacher's classes from its model's config.id2label; teacher 'teacher0' is a "
        "TeacherCache, which has none: give the teacher model (or its folder).",
        tmp_path,
        [cache],
        _named(tiny_bert(hidden=16, seed=3), ["a", "b", "c"]),
    )


def test_options_that_cannot_take_effect_are_refused_naming_them(tmp_path):
    teachers = [_named(tiny_bert(seed=1), ["a", "b", "c"])]
    student = _named(tiny_bert(hidden=16, seed=3), ["a", "b", "c"])
    assert_refused(
        "amalgamation combines classifiers over the union of their label sets; chunk_size is a causal-LM option and "
        "does not apply: leave it unset.",
        tmp_path,
        teachers,
        student,
        chunk_size=4,
    )
    assert_refused(
        "amalgamation gives each teacher its own term on its own classes and combines no distributions: "
        "teacher_aggregation='adaptive' / teacher_weights=None would do nothing. Leave both unset (weigh a teacher's "
        "term through losses instead).",
        tmp_path,
        teachers,
        student,
        teacher_aggregation="adaptive",
    )
    assert_refused(
        "amalgamation gives each teacher its own 'uhc' term on its own classes; losses also lists 'logit_mse', which "
        "would compare the student's logits class by class with teachers that know only some of its classes. Keep kl "
        "(it stands for the amalgamation's terms, with its weight) and losses on other features.",
        tmp_path,
        teachers,
        student,
        losses="kl,logit_mse",
    )
    with pytest.raises(ValueError, match=re.escape("amalgamation's loss is one of ['uhc', 'kl'], got 'jsd'.")):
        AmalgamationConfig(loss="jsd")


# ---- a run -------------------------------------------------------------------------------------------------------


def _examples(n, seed=0, length=1):
    """Token ids ``n×length`` and their classes: the first token's id mod 4 (``NAMES``)."""
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return ids, ids[:, 0] % 4


def _rows(n, seed=0, length=1):
    """:func:`_examples` as a data set (``input_ids``, ``attention_mask``, ``labels``)."""
    ids, classes = _examples(n, seed, length)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": classes.tolist()}
    )


def _teacher(classes: list[int], seed: int) -> torch.nn.Module:
    """A tiny BERT trained on the rows of ``classes`` only, its classes named (a specialised teacher)."""
    model = _named(tiny_bert(hidden=16, layers=1, num_labels=len(classes), seed=seed), [NAMES[c] for c in classes])
    ids, labels = _examples(256, seed=seed)
    keep = torch.isin(labels, torch.tensor(classes))
    ids, labels = ids[keep], labels[keep]
    labels = torch.tensor([classes.index(int(label)) for label in labels])
    optimizer, generator = torch.optim.Adam(model.parameters(), lr=3e-2), torch.Generator().manual_seed(seed)
    for _ in range(40):
        batch = torch.randint(0, len(ids), (64,), generator=generator)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _accuracy(model, ids, classes) -> float:
    with torch.no_grad():
        return (model(input_ids=ids).logits.argmax(-1) == classes).float().mean().item()


def test_an_amalgamated_student_beats_an_untrained_one_over_the_union(tmp_path):
    # Overlapping teachers: "low" knows a, b, c and "high" c, d; the student learns all four from unlabeled rows.
    teachers = {"low": _teacher([0, 1, 2], seed=1), "high": _teacher([2, 3], seed=2)}
    test_ids, test_classes = _examples(256, seed=99)
    for name, classes in (("low", [0, 1, 2]), ("high", [2, 3])):  # each teacher is good on its own classes
        own = torch.isin(test_classes, torch.tensor(classes))
        with torch.no_grad():
            predicted = torch.tensor(classes)[teachers[name](input_ids=test_ids[own]).logits.argmax(-1)]
        assert (predicted == test_classes[own]).float().mean() > 0.9, name
    labels = union_label_config(teachers)
    assert labels["id2label"] == dict(enumerate(NAMES))

    def make_student(k):
        return _named(tiny_bert(hidden=16, layers=1, num_labels=4, seed=20), NAMES)

    unlabeled = _rows(256, seed=7).map(lambda row: {"labels": -100})
    result = run_scheme(
        "amalgamation",
        config(tmp_path, max_steps=30, learning_rate=3e-2, per_device_train_batch_size=64, logging_steps=10),
        teacher=teachers,
        make_student=make_student,
        train_dataset=unlabeled,
    )
    untrained = _accuracy(make_student(1), test_ids, test_classes)
    amalgamated = _accuracy(result.student, test_ids, test_classes)
    assert untrained < 0.35 and amalgamated > 0.6, (untrained, amalgamated)
    logged = result.trainer.state.log_history[0]
    assert {"uhc/low", "uhc/high"} <= set(logged) and "ce" not in logged  # one term per teacher, no labels
    summary = result.trainer.distillation_summary()
    assert summary["scheme"] == {"name": "amalgamation", "loss": "uhc"}
    assert summary["stage"]["teacher_classes"] == {"low": ["a", "b", "c"], "high": ["c", "d"]}
    assert summary["teachers"]["high"]["classes"] == ["c", "d"]
    assert (tmp_path / "model" / "distillation_config.json").exists()


def test_token_classifiers_with_different_tag_sets_amalgamate_token_by_token(tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    def tagger(names, seed, hidden=32):
        torch.manual_seed(seed)
        config_ = BertConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            num_labels=len(names),
        )
        return _named(BertForTokenClassification(config_), names)

    people, places = tagger(["O", "B-PER"], 1), tagger(["O", "B-LOC"], 2)
    ids = torch.randint(0, VOCAB, (8, 6), generator=torch.Generator().manual_seed(0))
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 6] * 8, "labels": [[-100] * 6] * 8})
    source = LabelSubsetTeacher(places, [0, 2], 3, ["O", "B-LOC"])
    placed = source({"input_ids": ids[:2]}, frozenset({"logits"})).logits
    assert placed.shape == (2, 6, 3) and torch.isneginf(placed[..., 1]).all()
    torch.testing.assert_close(placed[..., [0, 2]], places(input_ids=ids[:2]).logits)
    result = run_scheme(
        "amalgamation",
        config(tmp_path, max_steps=2),
        teacher={"people": people, "places": places},
        make_student=lambda k: tagger(["O", "B-PER", "B-LOC"], 3, hidden=16),
        train_dataset=rows,
    )
    logged = result.trainer.state.log_history[0]
    assert result.trainer.state.global_step == 2 and logged["uhc/people"] > 0 and logged["uhc/places"] > 0
