"""Refusal-table rows (see ``tests/refusal_cases.py``) for what is pushed to the Hub and for sentence encoders."""

from __future__ import annotations

import os

import torch
from conftest import classification_data, config, push_to_local_hub, tiny_bert, tiny_gpt2, tiny_t5
from refusal_cases import Case

from hf_kd import DistillationTrainer
from hf_kd.sentence_embeddings import SentenceEmbeddingModel

WORDS = "the a stock market film music game vote team phone bank".split()
STUDENT_FILES = {"model.safetensors", "config.json", "distillation_config.json", "README.md", "quality_latency.png"}


def pushed_paths(state) -> set[str]:
    return {path for commit in state.commits for path in commit["files"]}


# ---- pushing ----


def _push_over_stale_files(tmp_path):
    # What an earlier push (a LoRA student, notes) left in the staging folder.
    stale = tmp_path / "out" / "_hub_upload"
    (stale / "private").mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"stale weights")
    (stale / "private" / "notes.txt").write_text("not for the Hub")
    return push_to_local_hub(tmp_path, "push_worker.py")


def _check_only_the_student(state, tmp_path):
    (commit,) = state.commits
    assert set(commit["files"]) == STUDENT_FILES
    # The staging folder holds what was pushed, nothing older.
    assert set(os.listdir(tmp_path / "out" / "_hub_upload")) == STUDENT_FILES


def _check_no_exits_pushed(state, tmp_path):
    paths = pushed_paths(state)
    root = {path for path in paths if "/" not in path}  # the student; checkpoints go to last-checkpoint/ or none
    assert {"model.safetensors", "config.json", "distillation_config.json"} <= root
    assert not any(os.path.basename(path).startswith("early_exits") for path in root), sorted(root)
    assert len(state.commits) >= 2  # a checkpoint pushed during training, then the final push
    # Saved as pushed: the model without its exits; the checkpoints keep them (they resume).
    assert not (tmp_path / "out" / "model" / "early_exits.json").exists()
    assert (tmp_path / "out" / "checkpoint-2" / "early_exits.safetensors").exists()


# ---- sentence encoders ----


def _tokenizer(folder):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    return BertTokenizerFast(str(folder / "vocab.txt"))


def _bare_encoder_without_tokenizer(tmp_path):
    return DistillationTrainer(
        model=SentenceEmbeddingModel(tiny_bert(hidden=16).bert),
        teacher_model=SentenceEmbeddingModel(tiny_bert(seed=1).bert),
        args=config(tmp_path / "out", losses="embedding_mse", save_strategy="steps", save_steps=2),
        train_dataset=classification_data(),
    )


def _batch():
    ids = torch.tensor([[2, 7, 9, 12, 3], [2, 8, 3, 0, 0]])  # the second row padded
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _masked_mean(states, mask):
    weights = mask.unsqueeze(-1).float()
    return (states * weights).sum(1) / weights.sum(1)


def _head_models(tmp_path):
    batch = _batch()
    rows = []
    for model in (tiny_bert(), tiny_gpt2()):
        wrapped = SentenceEmbeddingModel(model)
        with torch.no_grad():
            states = model.base_model(**batch).last_hidden_state
            rows.append((wrapped(**batch).embeddings, _masked_mean(states, batch["attention_mask"]), wrapped))
    return rows


def _check_head_models(rows, tmp_path):
    for embeddings, by_hand, wrapped in rows:
        assert torch.allclose(embeddings, by_hand, atol=1e-6)
        assert type(wrapped.encoder).__name__ in ("BertModel", "GPT2Model")  # the body: what is saved


def _sentence_transformer_max_normalized(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    folder = tmp_path / "st"
    tiny_bert(hidden=16).bert.save_pretrained(folder)
    _tokenizer(folder).save_pretrained(folder)
    st = SentenceTransformer(modules=[Transformer(str(folder)), Pooling(16, "mean")], device="cpu")  # no Normalize
    model = SentenceEmbeddingModel(st, pooling="max", normalize=True)
    batch = _batch()
    with torch.no_grad():
        states = model.encoder(**batch).last_hidden_state
        embeddings = model(**batch).embeddings
        with_states = model(**batch, output_hidden_states=True).embeddings
    return embeddings, with_states, states, batch["attention_mask"]


def _check_max_normalized(result, tmp_path):
    embeddings, with_states, states, mask = result
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-6)
    # By hand: the largest value of each channel over the real tokens only, then unit length.
    by_hand = torch.stack([states[row, mask[row].bool()].max(0).values for row in range(2)])
    assert torch.allclose(embeddings, torch.nn.functional.normalize(by_hand, dim=-1), atol=1e-6)
    assert torch.allclose(with_states, embeddings, atol=1e-6)


CASES = [
    Case(
        "push-stale-upload-folder",
        "`push_to_hub()` with an earlier push's files left in `OUTPUT_DIR/_hub_upload`",
        _push_over_stale_files,
        check=_check_only_the_student,
    ),
    Case(
        "self-distillation-push-exits",
        '`self_distillation(..., save_exits=False)` with `push_to_hub=True`, `save_strategy="steps"`',
        lambda p: push_to_local_hub(p, "self_distillation_push_worker.py", "checkpoints"),
        check=_check_no_exits_pushed,
    ),
    Case(
        "embeddings-bare-encoder-no-tokenizer",
        "`SentenceEmbeddingModel(AutoModel)` student without `processing_class`",
        _bare_encoder_without_tokenizer,
        ValueError,
        "is saved as a SentenceTransformer folder, which needs its tokenizer",
    ),
    Case(
        "embeddings-head-model",
        "`SentenceEmbeddingModel(BertForSequenceClassification)`, `SentenceEmbeddingModel(GPT2LMHeadModel)`",
        _head_models,
        check=_check_head_models,
    ),
    Case(
        "embeddings-encoder-decoder",
        "`SentenceEmbeddingModel(T5ForConditionalGeneration)`",
        lambda p: SentenceEmbeddingModel(tiny_t5()),
        ValueError,
        "Wrap its encoder: SentenceEmbeddingModel(model.get_encoder())",
    ),
    Case(
        "embeddings-st-pooling-normalize",
        '`SentenceEmbeddingModel(SentenceTransformer, pooling="max", normalize=True)`',
        _sentence_transformer_max_normalized,
        check=_check_max_normalized,
    ),
]
