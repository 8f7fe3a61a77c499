"""Ranking: margin_mse and listwise_kl, the group collator, cross- and bi-encoder rankers, metrics, training."""

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import VOCAB, config, tiny_bert
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, EvalPrediction

from hf_kd import DistillationTrainer
from hf_kd.features import ModelFeatures
from hf_kd.losses import functional as F
from hf_kd.losses import get_loss
from hf_kd.losses.registry import resolve_loss_class
from hf_kd.metrics import ranking_compute_metrics, ranking_metrics
from hf_kd.ranking import BiEncoderRanker, CrossEncoderRanker, RankingCollator, TeacherScores, score_groups
from hf_kd.sentence_embeddings import SentenceEmbeddingModel

INF = float("inf")


# ---- the losses ----


def test_margin_mse_matches_hand_computed_values():
    student, teacher = torch.tensor([[3.0, 1.0, 0.0]], requires_grad=True), torch.tensor([[2.0, 1.0, 1.0]])
    # d = s − t = (1, 0, −1); with a positive at 0: pairs (0,1), (0,2) → (1 + 4) / 2
    assert F.margin_mse(student, teacher, torch.tensor([[1, 0, 0]])).item() == pytest.approx(2.5)
    # without labels every pair i < j: (1 + 4 + 1) / 3
    assert F.margin_mse(student, teacher).item() == pytest.approx(2.0)
    # unjudged candidates (-100) take no part; a query with no ordered pair falls back to every pair
    assert F.margin_mse(student, teacher, torch.tensor([[1, -100, 0]])).item() == pytest.approx(4.0)
    assert F.margin_mse(student, teacher, torch.tensor([[0, 0, 0]])).item() == pytest.approx(2.0)
    # a padded candidate (-inf on both sides) is skipped: only the pair (0, 1)
    padded_s, padded_t = torch.tensor([[3.0, 1.0, -INF]]), torch.tensor([[2.0, 1.0, -INF]])
    assert F.margin_mse(padded_s, padded_t).item() == pytest.approx(1.0)
    # shifting all of a query's scores changes nothing: margins only
    assert F.margin_mse(student + 5, teacher).item() == pytest.approx(2.0)
    F.margin_mse(student, teacher, torch.tensor([[1, 0, 0]])).backward()
    # ∂/∂s of ½((d0 − d1)² + (d0 − d2)²): d0: (1 + 2) = 3, d1: −1, d2: −2
    assert torch.allclose(student.grad, torch.tensor([[3.0, -1.0, -2.0]]))


def test_listwise_kl_is_kl_over_each_querys_candidates():
    student, teacher = torch.tensor([[0.5, 1.0, -1.0]]), torch.tensor([[2.0, 0.0, 1.0]])
    tau = 2.0
    p, q = torch.softmax(teacher / tau, -1), torch.softmax(student / tau, -1)
    expected = tau**2 * (p * (p / q).log()).sum()
    assert F.listwise_kl(student, teacher, temperature=tau).item() == pytest.approx(expected.item(), rel=1e-6)
    # a padded candidate changes nothing and gives no NaN
    padded = F.listwise_kl(
        torch.tensor([[0.5, 1.0, -1.0, -INF]]), torch.tensor([[2.0, 0.0, 1.0, -INF]]), temperature=tau
    )
    assert padded.item() == pytest.approx(expected.item(), rel=1e-6)
    assert F.listwise_kl(teacher, teacher).item() == pytest.approx(0, abs=1e-7)
    loss = get_loss("listwise_kl", temperature=tau)
    value = loss(ModelFeatures(logits=student), ModelFeatures(logits=teacher))
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)  # one query: the sum is the value


@pytest.mark.parametrize("name", ["margin_mse", "listwise_kl"])
def test_ranking_losses_refuse_scores_without_groups_and_mismatched_groups(name):
    function = getattr(F, name)
    with pytest.raises(ValueError, match=f"{name} compares each query's candidates: scores must be B×G with G >= 2"):
        function(torch.zeros(4, 1), torch.zeros(4, 1))
    with pytest.raises(ValueError, match=f"{name}: the student scored \\(2, 3\\) candidates and the teacher"):
        function(torch.zeros(2, 3), torch.zeros(2, 4))


# ---- the collator and the rankers ----


def pair_rows(n, group, seed=0, ragged=False, length=6):
    """Rows of query–candidate pairs with one relevant candidate (the first) each."""
    draw = random.Random(seed)
    rows = []
    for _ in range(n):
        size = draw.randint(2, group) if ragged else group
        candidates = [[draw.randrange(5, VOCAB) for _ in range(draw.randint(3, length))] for _ in range(size)]
        rows.append({"input_ids": candidates, "labels": [1] + [0] * (size - 1)})
    return rows


def test_the_collator_pads_ragged_groups_and_marks_them():
    rows = [
        {"input_ids": [[5, 6, 7], [8, 9]], "labels": [1, 0], "teacher_scores": [2.0, 1.0]},
        {"input_ids": [[5], [6, 7], [8, 9, 10, 11]], "labels": [0, 1, 0], "teacher_scores": [0.0, 3.0, -1.0]},
    ]
    batch = RankingCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (2, 3, 4) and batch["attention_mask"].shape == (2, 3, 4)
    assert batch["group_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["labels"].tolist() == [[1, 0, -100], [0, 1, 0]]
    assert batch["teacher_scores"][0].tolist() == [2.0, 1.0, -INF]
    assert batch["input_ids"][0, 1].tolist() == [8, 9, 0, 0] and batch["attention_mask"][0, 1].tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="ranking row 0 has 2 candidates but group_size is 3"):
        RankingCollator(group_size=3)(rows)
    with pytest.raises(ValueError, match="ranking row 0 is not grouped"):
        RankingCollator()([{"input_ids": [5, 6, 7], "labels": [1]}])
    with pytest.raises(ValueError, match="ranking row 1: 2 teacher_scores for 3 candidates"):
        RankingCollator()([rows[0], {**rows[1], "teacher_scores": [1.0, 2.0]}])
    with pytest.raises(ValueError, match="ranking row 0 has neither input_ids"):
        RankingCollator()([{"labels": [1, 0]}])


def test_the_collator_checks_a_whole_data_set_before_training_and_names_its_rows():
    listwise, margin = resolve_loss_class("listwise_kl"), resolve_loss_class("margin_mse")
    assert listwise.min_group_size == margin.min_group_size == 2 and resolve_loss_class("kl").min_group_size == 1
    collator = RankingCollator()
    rows = pair_rows(6, 4, seed=0, ragged=True)
    collator.check_dataset(Dataset.from_list(rows), [listwise])  # ragged groups of 2-4: accepted
    both = [{**row, "query_input_ids": [5], "candidate_input_ids": row["input_ids"]} for row in rows]
    collator.check_dataset(Dataset.from_list(both), [margin])  # both layouts in every row
    batch = collator(both[:2])
    assert batch["input_ids"].shape[:2] == batch["candidate_input_ids"].shape[:2] == batch["group_mask"].shape
    # the rows are the data set's, not a batch's; lengths read from Arrow and from plain rows alike
    single = [*rows[:4], {"input_ids": [[5, 6]], "labels": [1]}, rows[5]]
    for data in (Dataset.from_list(single), single):
        collator.check_dataset(data)  # one candidate is a query to score: only ranking losses need two
        with pytest.raises(ValueError, match=r"ranking row 4 has 1 candidate: \['listwise_kl'\] compare"):
            collator.check_dataset(data, [listwise])
    even = pair_rows(4, 3)
    bad_labels = [*even[:3], {**even[3], "labels": [1, 0]}]
    with pytest.raises(ValueError, match="ranking row 3: 2 labels for 3 candidates"):
        collator.check_dataset(Dataset.from_list(bad_labels))
    with pytest.raises(ValueError, match="ranking row 0 has 3 candidates but group_size is 4"):
        RankingCollator(group_size=4).check_dataset(Dataset.from_list(pair_rows(2, 3)))
    with pytest.raises(ValueError, match="ranking row 0 is not grouped"):
        collator.check_dataset(Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[1], [0]]}))
    with pytest.raises(ValueError, match="ranking row 1 has no candidates"):
        collator.check_dataset([rows[0], {"input_ids": [], "labels": []}])
    with pytest.raises(ValueError, match=r"ranking row 1 sets \['candidate_input_ids'\] but row 0 sets"):
        collator.check_dataset([{"candidate_input_ids": [[5]], "query_input_ids": [6]}, {"candidate_input_ids": [[5]]}])
    with pytest.raises(ValueError, match="ranking row 0 has candidate_input_ids but no query_input_ids"):
        collator([{"candidate_input_ids": [[5], [6]]}])


def test_the_trainer_checks_its_ranking_data_sets_at_construction(tmp_path):
    rows = pair_rows(8, 3, seed=0)
    eval_rows = [*pair_rows(2, 3, seed=1), {"input_ids": [[5]], "labels": [1]}]
    with pytest.raises(ValueError, match=r"eval_dataset\['held out'\]: ranking row 2 has 1 candidate"):
        DistillationTrainer(
            model=cross_encoder(seed=1, hidden=16),
            teacher_model=cross_encoder(seed=0),
            args=config(tmp_path, losses="margin_mse"),
            train_dataset=Dataset.from_list(rows),
            eval_dataset={"held out": Dataset.from_list(eval_rows)},
            data_collator=RankingCollator(),
        )


def cross_encoder(seed=0, hidden=32, layers=2):
    return CrossEncoderRanker(tiny_bert(hidden=hidden, layers=layers, num_labels=1, seed=seed))


def test_a_cross_encoder_scores_each_pair_and_leaves_padding_at_minus_infinity():
    ranker = cross_encoder().eval()
    rows = [{"input_ids": [[5, 6, 7], [8, 9]], "labels": [1, 0]}, {"input_ids": [[5], [6, 7], [8, 9, 10]]}]
    rows[1]["labels"] = [0, 0, 1]
    batch = RankingCollator()(rows)
    output = ranker(**batch)
    with torch.no_grad():
        alone = ranker.model(input_ids=torch.tensor([[8, 9]])).logits.item()
    assert output.logits[0, 1].item() == pytest.approx(alone, abs=1e-5)
    assert output.logits[0, 2].item() == -INF
    real = output.logits[batch["group_mask"]]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(real, torch.tensor([1.0, 0, 0, 0, 1]))
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="a cross-encoder scores a pair with one logit: build it with num_labels=1"):
        CrossEncoderRanker(tiny_bert(num_labels=3))
    with pytest.raises(ValueError, match="input_ids must be B×G×T, got \\(2, 3\\)"):
        ranker(input_ids=torch.ones(2, 3, dtype=torch.long))


def test_a_bi_encoder_scores_scaled_cosines():
    encoder = SentenceEmbeddingModel(tiny_bert(seed=3).bert)
    ranker = BiEncoderRanker(encoder, similarity="cosine", scale=10.0).eval()
    rows = [{"query_input_ids": [5, 6], "candidate_input_ids": [[7, 8, 9], [10]], "labels": [1, 0]}]
    batch = RankingCollator()(rows)
    logits = ranker(**batch).logits
    with torch.no_grad():
        q = encoder(input_ids=torch.tensor([[5, 6]])).embeddings
        c = encoder(input_ids=torch.tensor([[10]])).embeddings
    assert logits[0, 1].item() == pytest.approx(10 * torch.cosine_similarity(q, c).item(), abs=1e-4)


# ---- metrics ----


def test_ranking_metrics_match_hand_computed_values():
    groups = [(np.array([0.9, 0.5, 0.1]), np.array([0, 1, 0])), (np.array([0.8, 0.7, 0.9]), np.array([0, 1, 0]))]
    values = ranking_metrics(groups)
    assert values["mrr@10"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert values["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 2)
    # the Trainer's form: padded groups (-100 labels) drop out
    predictions = np.array([[0.9, 0.5, 0.1, -100.0], [0.8, 0.7, 0.9, 0.95]])
    labels = np.array([[0, 1, 0, -100], [0, 1, 0, -100]])
    trainer_values = ranking_compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
    assert trainer_values == pytest.approx(values)


# ---- training ----


def trainer_for(tmp_path, student, teacher, data, losses, **overrides):
    values = dict(losses=losses, per_device_train_batch_size=4, learning_rate=3e-3, max_steps=30, alpha=1.0)
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **{**values, **overrides}),
        train_dataset=data,
        data_collator=RankingCollator(),
    )


def teacher_agreement(student, teacher, rows):
    """The listwise KL from the teacher's to the student's ranking of held-out groups (lower: closer)."""
    collator = RankingCollator()
    dataset = Dataset.from_list(rows)
    scores = [torch.from_numpy(s) for s, _ in score_groups(student, dataset, collator)]
    targets = [torch.from_numpy(t) for t, _ in score_groups(teacher, dataset, collator)]
    return float(np.mean([F.listwise_kl(s[None], t[None]).item() for s, t in zip(scores, targets)]))


@pytest.mark.parametrize("loss", ["margin_mse", "listwise_kl"])
def test_a_cross_encoder_student_learns_the_teachers_ranking(tmp_path, loss):
    teacher = cross_encoder(seed=0, hidden=32, layers=2)
    with torch.no_grad():  # a teacher with a clear opinion
        teacher.model.classifier.weight.mul_(20)
    teacher_start = {key: value.clone() for key, value in teacher.state_dict().items()}
    student, untrained = cross_encoder(seed=1, hidden=16, layers=1), cross_encoder(seed=1, hidden=16, layers=1)
    data = Dataset.from_list(pair_rows(64, 4, seed=0, ragged=True))
    trainer = trainer_for(tmp_path, student, teacher, data, loss, max_steps=60)
    trainer.train()
    assert all(loss in entry for entry in trainer.state.log_history if "loss" in entry)
    held_out = pair_rows(24, 4, seed=1, ragged=True)
    assert teacher_agreement(trainer.student, teacher, held_out) < 0.6 * teacher_agreement(untrained, teacher, held_out)
    assert all(torch.equal(teacher_start[key], value) for key, value in teacher.state_dict().items())


def test_precomputed_teacher_scores_give_the_live_teachers_loss(tmp_path):
    teacher = cross_encoder(seed=0)
    rows = pair_rows(16, 3, seed=2)
    groups = score_groups(teacher, Dataset.from_list(rows), RankingCollator())
    with_scores = Dataset.from_list(
        [{**row, "teacher_scores": scores.tolist()} for row, (scores, _) in zip(rows, groups)]
    )
    logged = []
    for source, data in ((teacher, Dataset.from_list(rows)), (TeacherScores(), with_scores)):
        trainer = trainer_for(tmp_path / str(len(logged)), cross_encoder(seed=1, hidden=16), source, data, "margin_mse")
        trainer.args.max_steps = 2
        trainer.train()
        logged.append([entry["margin_mse"] for entry in trainer.state.log_history if "margin_mse" in entry])
    assert logged[0] == pytest.approx(logged[1], rel=1e-5)


def test_a_cross_encoder_student_saves_as_a_plain_reranker(tmp_path):
    student = cross_encoder(seed=1, hidden=16)
    trainer = trainer_for(tmp_path, student, cross_encoder(seed=0), Dataset.from_list(pair_rows(8, 3)), "listwise_kl")
    trainer.args.max_steps = 2
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(value, reloaded.state_dict()[key]) for key, value in student.model.state_dict().items())


# ---- the recipe ----


def test_ranking_recipe_distils_a_minilm_reranker_on_bbc_headlines(tmp_path):
    from test_recipes import assert_pictures, run_recipe

    short = ["--train_queries", "16", "--eval_queries", "6", "--eval_group_size", "4", "--max_length", "48"]
    common = ["--config", "recipes/configs/ranking.yaml", "--max_steps", "2", "--per_device_train_batch_size", "2"]
    cross_run = ["--output_dir", str(tmp_path / "cross"), "--cross_teacher_steps", "2", "--logging_steps", "1"]
    run_recipe("ranking.py", *common, *short, *cross_run)
    results = json.loads((tmp_path / "cross" / "results.json").read_text())
    assert len(results) == 4
    assert_pictures(tmp_path / "cross", results, "mrr@10", latency="ms_per_query")
    for row in results.values():
        assert 0 < row["mrr@10"] <= 1 and 0 < row["ndcg@10"] <= 1 and row["ms_per_query"] > 0
    bi, cross, labels_only, distilled = results.values()
    assert distilled["parameters"] == labels_only["parameters"] < cross["parameters"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cross" / "student")
    assert reloaded.config.num_labels == 1 and reloaded.config.num_hidden_layers == 2
    assert (tmp_path / "cross" / "teacher" / "model.safetensors").exists()

    # The other teacher (the zero-shot bi-encoder) and a bi-encoder student, reusing the fine-tuned cross-encoder.
    run_recipe(
        "ranking.py",
        *common,
        *short,
        "--output_dir",
        str(tmp_path / "bi"),
        "--cross_teacher",
        str(tmp_path / "cross" / "teacher"),
        "--distil_from",
        "bi",
        "--student_kind",
        "bi",
        "--losses",
        "listwise_kl",
    )
    rows = json.loads((tmp_path / "bi" / "results.json").read_text())
    assert any("bi-encoder (MiniLM layers), distilled from the bi-encoder (listwise_kl)" in name for name in rows)
    from sentence_transformers import SentenceTransformer

    bi_student = SentenceTransformer(str(tmp_path / "bi" / "student"), device="cpu")
    assert bi_student[0].auto_model.config.num_hidden_layers == 2
    assert list(rows.values())[1]["mrr@10"] == pytest.approx(cross["mrr@10"])  # the same teacher, read back
