"""A teacher served by an inference engine (``ServedTeacher``): what it refuses at construction (the probe request
shows a set-up the server cannot serve), when a trainer or cache writer takes it, and on a batch it cannot send. Each
case runs against the small server of ``tests/served_server.py`` on 127.0.0.1, set up as real deployments go wrong."""

from __future__ import annotations

import torch
from conftest import VOCAB, config, lm_data, tiny_bert, tiny_gpt2
from refusal_cases import Case
from served_server import TeacherServer

from hf_kd import DistillationTrainer, write_teacher_cache
from hf_kd.teachers import ServedTeacher, TeacherServerError


def _word_tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(words)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=words[0])), unk_token=words[0])


WORDS = [f"w{index}" for index in range(VOCAB)]


def _served(tmp_path, server_options=None, **options):
    """``ServedTeacher(...)`` against a server with ``server_options``; ``options`` go to the teacher."""
    with TeacherServer(tiny_gpt2(hidden=48, seed=1), **(server_options or {})) as server:
        return ServedTeacher(server.url, **{"top_k": 8, "vocab_size": VOCAB, **options})


def _called(tmp_path, batch, server_options=None, **options):
    """The teacher built, then asked for ``batch``."""
    with TeacherServer(tiny_gpt2(hidden=48, seed=1), **(server_options or {})) as server:
        teacher = ServedTeacher(server.url, **{"top_k": 8, "vocab_size": VOCAB, **options})
        return teacher(batch, frozenset({"logits"}))


def _rows(data) -> dict:
    return {key: torch.tensor(value) for key, value in data[: len(data)].items()}


def _gone(tmp_path):
    with TeacherServer(tiny_gpt2(hidden=48, seed=1)) as server:
        url = server.url
    return ServedTeacher(url, top_k=8, vocab_size=VOCAB, retries=1, backoff=0.01)


def _packed(tmp_path):
    batch = _rows(lm_data(n=2, padded=False))
    batch["attention_mask"][0, 3] = 0  # a hole inside the row
    return _called(tmp_path, batch)


def _labels_on_padding(tmp_path):
    batch = _rows(lm_data(n=2))  # right-padded: row 0 has 4 tokens of 10
    batch["labels"][0, 6] = 5  # a label on a padding token
    return _called(tmp_path, batch)


def _trainer(tmp_path, student, **options):
    with TeacherServer(tiny_gpt2(hidden=48, seed=1)) as server:
        return DistillationTrainer(
            model=student,
            teacher_model=ServedTeacher(server.url, top_k=8, **options),
            args=config(tmp_path / "out"),
            train_dataset=lm_data(n=8),
        )


def _sampled_cache(tmp_path):
    with TeacherServer(tiny_gpt2(hidden=48, seed=1)) as server:
        teacher = ServedTeacher(server.url, top_k=8, vocab_size=VOCAB)
        return write_teacher_cache(teacher, lm_data(n=4), str(tmp_path / "out"), top_k=8, mode="sampled")


CASES = [
    Case(
        "served-top-k-above-the-cap",
        "`ServedTeacher(url, top_k=32)` on a vLLM server with the default `--max-logprobs 20`",
        lambda p: _served(p, top_k=32),
        ValueError,
        "start it with --max-logprobs 32 or more (vLLM's default is 20), or use top_k <= 20",
    ),
    Case(
        "served-other-tokenizer",
        "`ServedTeacher(url, tokenizer=...)` whose tokenizer differs from the served model's",
        lambda p: _served(
            p,
            {"tokenizer": _word_tokenizer(WORDS)},
            tokenizer=_word_tokenizer([*WORDS[:2], WORDS[3], WORDS[2], *WORDS[4:]]),
        ),
        ValueError,
        "the served model's tokenizer differs from this one: token id 2 is 'w2' on the server and 'w3' here",
    ),
    Case(
        "served-no-token-strings",
        "`ServedTeacher(url, tokenizer=...)` on a server started with `--skip-tokenizer-init`",
        lambda p: _served(p, tokenizer=_word_tokenizer(WORDS)),
        ValueError,
        "sends no token strings (a server started with --skip-tokenizer-init?)",
    ),
    Case(
        "served-logits",
        "a vLLM server started with `--logprobs-mode raw_logits`",
        lambda p: _served(p, {"logits_mode": True}),
        ValueError,
        "the server returned values that are not log-probabilities",
    ),
    Case(
        "served-bos-added",
        "an engine that puts a BOS token before the prompt it was sent",
        lambda p: _served(p, {"prepend": 1}),
        ValueError,
        "the server scored other tokens than it was sent",
    ),
    Case(
        "served-unaligned",
        "an engine that changes the prompt and does not echo its token ids (vLLM < 0.10.2)",
        lambda p: _served(p, {"prepend": 1, "echo_token_ids": False}),
        ValueError,
        "the server answered for 9 prompt tokens where 8 were sent: it added or removed tokens (a BOS?)",
    ),
    Case(
        "served-fewer-than-asked",
        "an engine that returns 4 log-probabilities per position where `top_k=8` were asked",
        lambda p: _served(p, {"returns_at_most": 4}),
        ValueError,
        "log-probabilities for a position where top_k=8 were asked: it caps them lower (--max-logprobs)",
    ),
    Case(
        "served-prefix-cache",
        "an engine that answers a cached prefix without prompt log-probabilities",
        lambda p: _served(p, {"cached_prefix": 3}),
        ValueError,
        "a prefix cache answers cached tokens without them. Start the server with --no-enable-prefix-caching",
    ),
    Case(
        "served-temperature",
        "`ServedTeacher(url, temperature=2.0)`",
        lambda p: _served(p, temperature=2.0),
        ValueError,
        "so another temperature cannot be honoured",
    ),
    Case(
        "served-unknown-model",
        '`ServedTeacher(url, model="llama")` on a server of another model',
        lambda p: _served(p, model="llama"),
        ValueError,
        "does not serve 'llama'; it serves ['tiny-teacher']",
    ),
    Case(
        "served-server-gone",
        "`ServedTeacher(url)` with nothing listening at `url`",
        _gone,
        TeacherServerError,
        "did not answer at the probe request at construction after 2 tries",
    ),
    Case(
        "served-packed-rows",
        "a batch whose attention mask has holes inside a row (packed sequences)",
        _packed,
        ValueError,
        "attends to tokens with gaps between them",
    ),
    Case(
        "served-labels-on-padding",
        "a batch with a label on a padding token",
        _labels_on_padding,
        ValueError,
        "row 0 of the batch has labels on tokens that no attended token before them predicts",
    ),
    Case(
        "served-too-long",
        "a row longer than the served model's `max_model_len`",
        lambda p: _called(p, _rows(lm_data(n=2, padded=False)), {"max_model_len": 8}),
        ValueError,
        "row 0 of the batch has 10 tokens; the served model takes at most 8",
    ),
    Case(
        "served-not-causal",
        "a `ServedTeacher` for a `BertForSequenceClassification` student",
        lambda p: _trainer(p, tiny_bert()),
        ValueError,
        "a ServedTeacher scores causal-LM prompts token by token",
    ),
    Case(
        "served-other-vocabulary",
        "`ServedTeacher(url, vocab_size=32)` for a student with 64 tokens",
        lambda p: _trainer(p, tiny_gpt2(), vocab_size=32),
        ValueError,
        "the student's vocabulary has 64 entries and the served teacher's 32",
    ),
    Case(
        "served-sampled-cache",
        '`write_teacher_cache(ServedTeacher(...), mode="sampled")`',
        _sampled_cache,
        ValueError,
        "which a served teacher does not return (only its top k): write a top_k cache",
    ),
]
