"""Sentence embeddings: the embedding losses, the SentenceTransformer adapter, retrieval metrics, the recipe."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from conftest import config, tiny_bert
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from test_recipes import assert_pictures, run_recipe
from transformers import BertConfig, BertModel, BertTokenizerFast, DataCollatorWithPadding

from hf_kd import DistillationTrainer
from hf_kd.features import ModelFeatures
from hf_kd.losses import functional as F
from hf_kd.losses import get_loss
from hf_kd.losses.embedding import EmbeddingMSE
from hf_kd.metrics import nearest_neighbours, retrieval_metrics
from hf_kd.sentence_embeddings import SentenceEmbeddingModel, encode

WORDS = "the a stock market film music game vote team phone bank play win lose new old rise fall goal star".split()


# ---- the losses ----


def test_embedding_losses_match_hand_computed_values():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # squared differences 0, 1, 0, 1 over four entries
    assert F.embedding_mse(student, teacher).item() == pytest.approx(0.5)
    # cosines 1/√2 and 1
    assert F.embedding_cosine(student, teacher).item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2)
    assert F.embedding_mse(teacher, teacher).item() == 0
    assert F.embedding_cosine(teacher, teacher).item() == pytest.approx(0, abs=1e-7)
    F.embedding_mse(student, teacher).backward()
    assert torch.allclose(student.grad, torch.tensor([[0.0, -0.5], [0.0, -0.5]]))  # 2(s − t)/4
    with pytest.raises(ValueError, match="embedding_mse needs embeddings of equal shape, got"):
        F.embedding_mse(student, torch.zeros(2, 3))


def side(embeddings):
    return ModelFeatures(embeddings=embeddings)


def test_a_narrower_student_is_projected_and_equal_widths_are_compared_as_they_are():
    wide, narrow = torch.randn(4, 6), torch.randn(4, 3, requires_grad=True)
    loss = get_loss("embedding_mse")
    loss.setup(side(narrow), side(wide))
    assert isinstance(loss.projector.net, torch.nn.Linear) and loss.projector.net.weight.shape == (6, 3)
    value = loss(side(narrow), side(wide))
    value.backward()
    assert value.item() == pytest.approx(F.embedding_mse(loss.projector(narrow), wide).item())
    assert narrow.grad is not None and loss.projector.net.weight.grad is not None

    same = get_loss("embedding_cosine")
    same.setup(side(wide), side(wide))
    assert isinstance(same.projector, torch.nn.Identity) and same(side(wide), side(wide)).item() == pytest.approx(
        0, abs=1e-6
    )

    strict = get_loss("embedding_mse", projector=None)
    with pytest.raises(
        ValueError, match="the student's embeddings are 3 wide and the teacher's 6; set the loss option"
    ):
        strict.setup(side(narrow), side(wide))


def test_pca_start_maps_the_principal_coordinates_back_to_the_teacher():
    torch.manual_seed(0)
    directions = torch.linalg.qr(torch.randn(8, 3))[0].T  # 3 orthonormal directions in 8 dimensions
    coordinates = torch.randn(50, 3) * torch.tensor([3.0, 2.0, 1.0])
    teacher = coordinates @ directions + torch.randn(8)  # rank 3 around a mean
    loss = EmbeddingMSE()
    loss.setup(side(torch.zeros(2, 3)), side(teacher[:2]))
    loss.init_projector_from_pca(teacher)
    # The student that outputs the teacher's principal coordinates reproduces the teacher exactly.
    weight, bias = loss.projector.net.weight.detach(), loss.projector.net.bias.detach()
    principal = (teacher - bias) @ weight
    assert torch.allclose(loss.projector(principal).detach(), teacher, atol=1e-4)
    assert loss(side(principal), side(teacher)).item() < 1e-8

    with pytest.raises(ValueError, match="needs at least 3 teacher embeddings of width 8"):
        loss.init_projector_from_pca(teacher[:2])
    equal = EmbeddingMSE()
    equal.setup(side(teacher[:2]), side(teacher[:2]))
    with pytest.raises(ValueError, match="init_projector_from_pca needs a linear projector"):
        equal.init_projector_from_pca(teacher)


# ---- the adapter and the trainer ----


def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    return BertTokenizerFast(str(vocab))


def bert(hidden, layers, seed):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
    )
    return BertModel(config)


def sentence_transformer(tmp_path, name, hidden, layers, seed):
    """A SentenceTransformer (Transformer → mean pooling → normalisation) around a tiny random BERT."""
    folder = tmp_path / name
    bert(hidden, layers, seed).save_pretrained(folder)
    tokenizer(tmp_path).save_pretrained(folder)
    modules = [Transformer(str(folder)), Pooling(hidden, "mean"), Normalize()]
    return SentenceTransformer(modules=modules, device="cpu")


def texts(n, seed=0):
    draw = random.Random(seed)
    return [" ".join(draw.choices(WORDS, k=draw.randint(3, 9))) for _ in range(n)]


def sentence_dataset(tok, n, seed=0):
    return Dataset.from_dict(dict(tok(texts(n, seed), truncation=True)))


def trainer_for(tmp_path, student, teacher, tok, **overrides):
    values = dict(losses="embedding_mse", per_device_train_batch_size=16, learning_rate=1e-2, max_steps=6)
    args = config(tmp_path / "run", **{**values, **overrides})
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=sentence_dataset(tok, 96),
        data_collator=DataCollatorWithPadding(tok),
        processing_class=tok,
    )


def test_the_adapter_gives_the_sentence_transformers_embeddings_and_hidden_states(tmp_path):
    st = sentence_transformer(tmp_path, "st", 32, 2, seed=0)
    model, tok = SentenceEmbeddingModel(st), tokenizer(tmp_path)
    sample = texts(5)
    assert np.allclose(encode(model, tok, sample), st.encode(sample), atol=1e-6)
    batch = tok(sample, padding=True, return_tensors="pt")
    with_states = model(**batch, output_hidden_states=True)
    assert len(with_states.hidden_states) == 3  # embeddings + 2 layers
    assert torch.allclose(with_states.embeddings, model(**batch).embeddings, atol=1e-6)
    assert model.embedding_dimension == 32 and model.signature_columns() == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    with pytest.raises(TypeError, match="wraps a sentence_transformers.SentenceTransformer or a transformers model"):
        SentenceEmbeddingModel(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pooling must be one of"):
        SentenceEmbeddingModel(bert(16, 1, 0), pooling="median")


def padded_batch(tok):
    return tok(["the stock market", "a film about music and a game"], padding=True, return_tensors="pt")


def test_max_pooling_takes_each_channels_largest_value_over_real_tokens(tmp_path):
    tok = tokenizer(tmp_path)
    model = SentenceEmbeddingModel(bert(16, 1, seed=0), pooling="max").eval()
    batch = padded_batch(tok)
    assert (batch["attention_mask"] == 0).any()  # the first row is padded
    with torch.no_grad():
        states = model.encoder(**batch).last_hidden_state
        embeddings = model(**batch).embeddings
    for row in range(2):
        real = states[row, batch["attention_mask"][row].bool()]
        assert torch.allclose(embeddings[row], real.max(0).values)
    # Saved as a SentenceTransformer that pools by max too: it embeds as the model did.
    model.save_checkpoint(str(tmp_path / "saved"), tok)
    reloaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    sample = texts(5)
    assert np.allclose(reloaded.encode(sample), encode(model, tok, sample), atol=1e-6)


def test_a_sentence_transformer_pools_and_normalises_as_asked_and_saves_so(tmp_path):
    tok = tokenizer(tmp_path)
    st = sentence_transformer(tmp_path, "st", 16, 1, seed=0)  # mean pooling, then Normalize
    model = SentenceEmbeddingModel(st, pooling="cls", normalize=False).eval()
    assert [type(module).__name__ for module in st] == ["Transformer", "Pooling"]  # changed in place
    batch = padded_batch(tok)
    with torch.no_grad():
        states = model.encoder(**batch).last_hidden_state
        embeddings = model(**batch).embeddings
    assert torch.allclose(embeddings, states[:, 0], atol=1e-6)  # the first token, not unit length
    model.save_checkpoint(str(tmp_path / "saved"))
    reloaded = SentenceEmbeddingModel.from_pretrained(str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).embeddings, embeddings, atol=1e-6)
    # Left unset, the SentenceTransformer keeps its own modules.
    kept = sentence_transformer(tmp_path, "kept", 16, 1, seed=0)
    SentenceEmbeddingModel(kept)
    assert [type(module).__name__ for module in kept] == ["Transformer", "Pooling", "Normalize"]
    without_pooling = SentenceTransformer(modules=[kept[0]], device="cpu")
    with pytest.raises(ValueError, match="pooling='max' replaces the Pooling module of the SentenceTransformer"):
        SentenceEmbeddingModel(without_pooling, pooling="max")


def test_a_model_with_a_task_head_is_read_and_saved_through_its_body(tmp_path):
    tok = tokenizer(tmp_path)
    classifier = tiny_bert(hidden=16)
    classifier.resize_token_embeddings(len(WORDS) + 5)
    model = SentenceEmbeddingModel(classifier, normalize=True).eval()
    assert model.encoder is classifier.bert
    model.save_checkpoint(str(tmp_path / "saved"), tok)
    reloaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert type(reloaded[0].auto_model).__name__ == "BertModel"  # no classifier head in the folder
    sample = texts(4)
    assert np.allclose(reloaded.encode(sample), encode(model, tok, sample), atol=1e-6)


def test_a_sentence_transformer_student_round_trips_through_the_trainer(tmp_path):
    tok = tokenizer(tmp_path)
    teacher = SentenceEmbeddingModel(sentence_transformer(tmp_path, "teacher", 32, 2, seed=0))
    student = SentenceEmbeddingModel(sentence_transformer(tmp_path, "student", 32, 1, seed=1))
    trainer = trainer_for(tmp_path, student, teacher, tok)
    trainer.train()
    assert all("embedding_mse" in entry for entry in trainer.state.log_history if "loss" in entry)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    sample = texts(6, seed=3)
    assert np.allclose(reloaded.encode(sample), encode(trainer.student, tok, sample), atol=1e-6)
    # The teacher was frozen: its embeddings are the ones it started with.
    fresh = sentence_transformer(tmp_path, "teacher_again", 32, 2, seed=0)
    assert np.allclose(encode(teacher, tok, sample), fresh.encode(sample), atol=1e-6)


def test_a_bare_encoder_student_learns_the_teacher_and_saves_as_a_sentence_transformer(tmp_path):
    tok = tokenizer(tmp_path)
    teacher = SentenceEmbeddingModel(sentence_transformer(tmp_path, "teacher", 32, 2, seed=0))
    student = SentenceEmbeddingModel(bert(16, 1, seed=1), pooling="mean", normalize=True)
    untrained = SentenceEmbeddingModel(bert(16, 1, seed=1), pooling="mean", normalize=True)
    trainer = trainer_for(tmp_path, student, teacher, tok, max_steps=40)  # widths 16 → 32: a projector
    (loss,) = [term.loss for term in trainer.distillation_objective.terms]
    loss.init_projector_from_pca(torch.from_numpy(encode(teacher, tok, texts(64, seed=5))))
    start = loss.projector.net.weight.detach().clone()
    trainer.train()
    assert not torch.equal(start, loss.projector.net.weight.detach())  # the projector trained beside the student

    held_out = texts(64, seed=9)
    target = torch.from_numpy(encode(teacher, tok, held_out))

    def error(model):
        with torch.no_grad():
            return F.embedding_mse(loss.projector(torch.from_numpy(encode(model, tok, held_out))), target).item()

    assert error(trainer.student) < 0.5 * error(untrained)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert reloaded.get_sentence_embedding_dimension() == 16  # the projector stays behind
    assert np.allclose(reloaded.encode(held_out), encode(trainer.student, tok, held_out), atol=1e-6)


def test_resuming_a_sentence_encoder_ends_where_an_uninterrupted_run_does(tmp_path):
    tok = tokenizer(tmp_path)

    def run(folder, resume=None):
        teacher = SentenceEmbeddingModel(sentence_transformer(tmp_path, "teacher", 32, 2, seed=0))
        student = SentenceEmbeddingModel(sentence_transformer(tmp_path, "student", 32, 1, seed=1))
        trainer = trainer_for(folder, student, teacher, tok, save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.student.state_dict()

    whole = run(tmp_path / "whole")
    assert os.path.exists(tmp_path / "whole" / "run" / "checkpoint-3" / "modules.json")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "run" / "checkpoint-3"))
    assert all(torch.allclose(whole[key], resumed[key], atol=1e-6) for key in whole)


def test_a_bare_encoder_student_without_a_tokenizer_is_refused_before_training(tmp_path):
    tok = tokenizer(tmp_path)
    teacher = SentenceEmbeddingModel(sentence_transformer(tmp_path, "teacher", 32, 2, seed=0))
    with pytest.raises(ValueError, match="processing_class is None: give the trainer processing_class=tokenizer"):
        DistillationTrainer(
            model=SentenceEmbeddingModel(bert(16, 1, seed=1)),
            teacher_model=teacher,
            args=config(tmp_path / "run", losses="embedding_mse"),
            train_dataset=sentence_dataset(tok, 16),
            data_collator=DataCollatorWithPadding(tok),
        )
    # A SentenceTransformer student carries its tokenizer.
    student = SentenceEmbeddingModel(sentence_transformer(tmp_path, "student", 32, 1, seed=1))
    DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path / "run", losses="embedding_mse"),
        train_dataset=sentence_dataset(tok, 16),
        data_collator=DataCollatorWithPadding(tok),
    )


def test_embedding_losses_on_a_model_without_embeddings_say_what_to_do(tmp_path):
    data = Dataset.from_dict({"input_ids": [[1, 2, 3]] * 8, "labels": [0] * 8})
    with pytest.raises(ValueError, match="wrap the model in hf_kd.sentence_embeddings.SentenceEmbeddingModel"):
        trainer = DistillationTrainer(
            model=tiny_bert(),
            teacher_model=tiny_bert(seed=1),
            args=config(tmp_path, losses="embedding_mse"),
            train_dataset=data,
        )
        trainer.train()


# ---- retrieval metrics ----


def test_retrieval_metrics_match_hand_computed_values():
    scores = {"q1": {"d1": 0.9, "d2": 0.5, "d3": 0.1}, "q2": {"d1": 0.8, "d2": 0.7, "d3": 0.9}}
    relevant = {"q1": {"d2": 1}, "q2": {"d2": 1}}
    values = retrieval_metrics(scores, relevant, ("mrr@10", "recall@10", "ndcg@10", "mrr@1", "recall@2"))
    assert values["mrr@10"] == pytest.approx((1 / 2 + 1 / 3) / 2)  # ranks 2 and 3
    assert values["recall@10"] == 1.0 and values["mrr@1"] == 0.0 and values["recall@2"] == 0.5
    assert values["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 2)
    with pytest.raises(ValueError, match="1 queries have relevance grades but no scores"):
        retrieval_metrics({"q1": scores["q1"]}, relevant)
    with pytest.raises(ValueError, match="retrieval metrics look like mrr@10"):
        retrieval_metrics(scores, relevant, ("mrr",))


def test_nearest_neighbours_rank_documents_by_cosine():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    documents = np.array([[2.0, 0.1], [0.0, 5.0], [1.0, 1.0]])
    run = nearest_neighbours(queries, documents, ["q1", "q2"], ["a", "b", "c"], k=2)
    assert set(run["q1"]) == {"a", "c"} and set(run["q2"]) == {"b", "c"}
    assert run["q2"]["b"] == pytest.approx(1.0) and run["q1"]["c"] == pytest.approx(1 / math.sqrt(2))
    assert retrieval_metrics(run, {"q1": {"a": 1}, "q2": {"c": 1}}, ("mrr@10",))["mrr@10"] == pytest.approx(0.75)


# ---- the recipe ----


def test_embeddings_recipe_distils_the_packaged_minilm_on_real_sentences(tmp_path):
    short = ["--max_train_sentences", "400", "--eval_sentences", "80", "--test_fraction", "0.04"]
    run_recipe(
        "embeddings.py",
        "--config",
        "recipes/configs/embeddings.yaml",
        "--output_dir",
        str(tmp_path / "layers"),
        "--student_layers",
        "2",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "1",
        *short,
    )
    results = json.loads((tmp_path / "layers" / "results.json").read_text())
    teacher, untrained, distilled = results.values()
    assert teacher["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and teacher["spearman"] == pytest.approx(1.0)
    assert 0 < distilled["mrr@10"] <= distilled["recall@10"] <= 1 and distilled["parameters"] < teacher["parameters"]
    assert_pictures(tmp_path / "layers", results, "mean_cosine", latency="texts_per_s")
    student = SentenceTransformer(str(tmp_path / "layers" / "student"), device="cpu")
    assert student[0].auto_model.config.num_hidden_layers == 2 and student.get_sentence_embedding_dimension() == 384

    # A random narrower student whose projector starts from the teacher's principal directions.
    run_recipe(
        "embeddings.py",
        "--config",
        "recipes/configs/embeddings.yaml",
        "--output_dir",
        str(tmp_path / "narrow"),
        "--student_init",
        "random",
        "--student_hidden",
        "64",
        "--student_layers",
        "1",
        "--pca_projector",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        *short,
    )
    rows = list(json.loads((tmp_path / "narrow" / "results.json").read_text()).values())
    assert "mean_cosine" not in rows[-1] and -1 <= rows[-1]["spearman"] <= 1  # 64 wide: no cosine to the teacher
    narrow = SentenceTransformer(str(tmp_path / "narrow" / "student"), device="cpu")
    assert narrow.get_sentence_embedding_dimension() == 64


def test_relation_and_contrastive_losses_read_sentence_embeddings(tmp_path):
    tok = tokenizer(tmp_path)
    teacher = SentenceEmbeddingModel(sentence_transformer(tmp_path, "teacher", 32, 2, seed=0))
    student = SentenceEmbeddingModel(bert(16, 1, seed=1), pooling="mean")
    losses = (
        "embedding_cosine:1.0,rkd_distance:1.0:source=embeddings,sp:1.0:source=embeddings,infonce:1.0:source=embeddings"
    )
    trainer = trainer_for(tmp_path, student, teacher, tok, losses=losses, max_steps=3)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert {"embedding_cosine", "rkd_distance", "sp", "infonce"} <= set(logged)
    # rkd_distance compares the 16- and 32-wide embeddings' distance structures: no projector needed
    rkd = next(term.loss for term in trainer.distillation_objective.terms if term.name == "rkd_distance")
    assert rkd.sources == {"student": "embeddings", "teacher": "embeddings"} and not list(rkd.parameters())
