"""A teacher served by an inference engine (hf_kd.teachers.ServedTeacher) against a server on 127.0.0.1 that speaks
vLLM's and SGLang's protocols over a tiny GPT-2 (tests/served_server.py): its top-k equals the live teacher's, the
caches it writes equal the live teacher's caches, a student trained from it equals one trained from the live
teacher's top-k cache, requests run concurrently and are retried, and a server that goes away mid-run stops
training with the step, the URL and the checkpoint that a resumed run continues from."""

import json
import threading
import time

import pytest
import torch
from conftest import VOCAB, config, lm_data, tiny_gpt2
from served_server import TeacherServer
from transformers import TrainerCallback

from hf_kd import DistillationTrainer
from hf_kd.cache import densify, write_teacher_cache
from hf_kd.data import add_sample_index
from hf_kd.teachers import LiveTeacher, ServedTeacher, TeacherServerError
from hf_kd.teachers.precomputed import sparse_rows

LOGITS = frozenset({"logits"})


@pytest.fixture(autouse=True)
def _no_thread_left_behind():
    """Every request thread and every server thread has ended when a test ends (none would load later tests)."""
    before = set(threading.enumerate())
    yield
    left = [thread for thread in threading.enumerate() if thread not in before and not thread.daemon]
    assert not left, f"threads still running: {left}"


def teacher_model():
    return tiny_gpt2(hidden=48, seed=1)


def batch_of(data) -> dict:
    return {key: torch.tensor(value) for key, value in data[: len(data)].items()}


def live_top_k(teacher, batch, k):
    """The live teacher's top-k distribution at every attended position that predicts a token of its row (dense,
    N×V) and those positions' mask."""
    log_probs = LiveTeacher(teacher)(batch, LOGITS).logits.float().log_softmax(-1)[:, :-1]
    mask = batch["attention_mask"].bool()[:, 1:]
    values, ids = log_probs[mask].topk(k)
    return sparse_rows(ids, values, VOCAB).dense(), mask


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("top_k", [8, VOCAB])
def test_served_top_k_equals_the_live_teachers(engine, top_k):
    teacher, data = teacher_model(), lm_data(n=8)
    batch = batch_of(data)
    with TeacherServer(teacher, max_logprobs=VOCAB) as server:
        served = ServedTeacher(server.url, top_k=top_k, engine=engine, vocab_size=VOCAB)
        answered = served(batch, LOGITS).sparse_logits
        # After the probe, one request per row (in any order), carrying its attended tokens only (no padding).
        assert sorted(server.scored[1:]) == sorted(
            [token for token, kept in zip(row, attended) if kept]
            for row, attended in zip(data["input_ids"], data["attention_mask"])
        )
    expected, mask = live_top_k(teacher, batch, top_k)
    assert answered.ids.shape == (8, 10, top_k)
    torch.testing.assert_close(answered[:, :-1][mask].dense(), expected)
    # Positions that predict nothing of the row (its last token, padding) hold the uniform distribution.
    uniform = torch.full((VOCAB,), -torch.log(torch.tensor(float(VOCAB))).item())
    for position in answered[:, :-1][~mask].dense():
        torch.testing.assert_close(position, uniform)
    torch.testing.assert_close(answered[:, -1].dense(), uniform.expand(8, VOCAB))


def test_requests_send_the_models_own_settings():
    with TeacherServer(teacher_model()) as server:
        served = ServedTeacher(server.url, top_k=4, vocab_size=VOCAB)
        served(batch_of(lm_data(n=2)), LOGITS)
    (payload, *_) = server.payloads
    assert payload["model"] == "tiny-teacher" and payload["prompt_logprobs"] == 4
    assert payload["temperature"] == 1.0 and payload["top_p"] == 1.0 and payload["max_tokens"] == 1
    assert served.describe() == {
        "teacher": "tiny-teacher",
        "teacher_class": "ServedTeacher (vllm)",
        "teacher_parameters": None,
        "teacher_server": {"url": server.url, "engine": "vllm", "top_k": 4},
    }
    with TeacherServer(teacher_model()) as server:
        assert ServedTeacher(server.url, top_k=4, parameters=123_456).describe()["teacher_parameters"] == 123_456


def test_a_served_teacher_writes_the_live_teachers_cache(tmp_path):
    teacher, data = teacher_model(), add_sample_index(lm_data(n=12))
    with TeacherServer(teacher) as server:
        served = ServedTeacher(server.url, top_k=16, vocab_size=VOCAB)
        from_server = write_teacher_cache(
            served, data, str(tmp_path / "served"), top_k=8, dtype="float32", shard_size=5, progress=False
        )
    from_model = write_teacher_cache(
        teacher, data, str(tmp_path / "live"), top_k=8, dtype="float32", shard_size=5, progress=False
    )
    assert len(from_server) == len(from_model) == 12 and from_server.vocab_size == from_model.vocab_size == VOCAB
    for example in range(12):
        (served_ids, served_values), (live_ids, live_values) = from_server.rows(example), from_model.rows(example)
        assert served_ids.shape == live_ids.shape  # the same positions, k each
        torch.testing.assert_close(densify(served_ids, served_values, VOCAB), densify(live_ids, live_values, VOCAB))
    manifest = from_server.manifest
    assert (manifest["teacher"], manifest["teacher_class"], manifest["teacher_config"]) == (
        "tiny-teacher",
        "ServedTeacher (vllm)",
        None,
    )


def test_a_cache_interrupted_by_the_server_resumes_with_a_new_one(tmp_path):
    teacher, data = teacher_model(), add_sample_index(lm_data(n=12))
    path = str(tmp_path / "cache")
    with TeacherServer(teacher) as server:
        served = ServedTeacher(server.url, top_k=8, vocab_size=VOCAB, retries=1, backoff=0.01)
        server.failures = ["drop"] * 2 * len(data)  # after the probe, every request of the first batch is dropped
        with pytest.raises(TeacherServerError) as raised:
            write_teacher_cache(
                served, data, path, top_k=8, dtype="float32", shard_size=4, batch_size=4, progress=False
            )
    message = str(raised.value)
    assert f"the teacher server at {server.url}/v1/completions did not answer" in message
    assert f"writing the teacher cache in {path} (examples 0 to 3)" in message
    assert "rerun write_teacher_cache with the same arguments" in message
    with TeacherServer(teacher) as again:
        cache = write_teacher_cache(
            ServedTeacher(again.url, top_k=8, vocab_size=VOCAB),
            data,
            path,
            top_k=8,
            dtype="float32",
            shard_size=4,
            batch_size=4,
            progress=False,
        )
    assert len(cache) == 12


def _logged_losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_training_from_a_served_teacher_equals_training_from_the_live_top_k_cache(tmp_path):
    teacher, data = teacher_model(), add_sample_index(lm_data(n=16))
    cache = write_teacher_cache(teacher, data, str(tmp_path / "cache"), top_k=8, dtype="float32", progress=False)
    args = dict(losses="kl:1.0,reverse_kl:0.5", temperature=2.0, max_steps=3)
    replayed = DistillationTrainer(
        model=tiny_gpt2(), teacher_model=cache, args=config(tmp_path / "cache_run", **args), train_dataset=data
    )
    replayed.train()
    with TeacherServer(teacher) as server:
        served = DistillationTrainer(
            model=tiny_gpt2(),
            teacher_model=ServedTeacher(server.url, top_k=8),  # vocab_size: the student's
            args=config(tmp_path / "served_run", eval_strategy="steps", eval_steps=3, **args),
            train_dataset=data,
            eval_dataset=data.select(range(8)),
        )
        served.train()
    assert served.teacher.vocab_size == VOCAB
    losses, expected = _logged_losses(served), _logged_losses(replayed)
    assert list(losses) == [1, 2, 3]
    assert losses == pytest.approx(expected, rel=1e-5)
    # A served teacher answers for any text: evaluation reports the distillation terms too (a cache cannot).
    assert any("eval_kl" in entry for entry in served.state.log_history)


def test_chunk_rows_equal_the_live_top_k_caches(tmp_path):
    # chunk_size: the trainer asks the teacher for the rows of the distilled positions and their logits.
    teacher, data = teacher_model(), add_sample_index(lm_data(n=8))
    cache = write_teacher_cache(teacher, data, str(tmp_path / "cache"), top_k=8, dtype="float32", progress=False)
    batch = batch_of(data)
    sample_index = batch.pop("sample_index")
    mask = batch["labels"][:, 1:].ne(-100)
    cached_rows, cached_logits = cache.token_rows(batch, mask, sample_index=sample_index)
    with TeacherServer(teacher) as server:
        served_rows, served_logits = ServedTeacher(server.url, top_k=8, vocab_size=VOCAB).token_rows(batch, mask)
    assert [row.shape for row in served_rows] == [row.shape for row in cached_rows] == [(int(mask.sum()), 8)] * 2
    torch.testing.assert_close(served_logits(*served_rows), cached_logits(*cached_rows))


class _StopServer(TrainerCallback):
    """The server goes away after ``step`` (before that step's checkpoint is written, which needs no server)."""

    def __init__(self, server, step):
        self.server, self.step = server, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.server.stop()


@pytest.mark.slow
def test_a_server_gone_mid_run_stops_training_at_a_checkpoint_that_resumes(tmp_path):
    teacher, data = teacher_model(), add_sample_index(lm_data(n=16))
    settings = dict(losses="kl", temperature=2.0, max_steps=6, per_device_train_batch_size=4)

    def trainer(server, out, **extra):
        served = ServedTeacher(server.url, top_k=8, retries=2, backoff=0.01)
        return DistillationTrainer(
            model=tiny_gpt2(), teacher_model=served, args=config(out, **settings, **extra), train_dataset=data
        )

    with TeacherServer(teacher) as server:
        unbroken = trainer(server, tmp_path / "unbroken")
        unbroken.train()
    with TeacherServer(teacher) as server:
        broken = trainer(server, tmp_path / "out", save_strategy="steps", save_steps=2)
        broken.add_callback(_StopServer(server, step=4))
        with pytest.raises(TeacherServerError) as raised:
            broken.train()
    message = str(raised.value)
    assert (
        f"the teacher server at {server.url}/v1/completions did not answer at training step 5 after 3 tries" in message
    )
    assert "cannot connect" in message
    assert f"The last complete checkpoint is {tmp_path / 'out' / 'checkpoint-4'}" in message
    assert "trainer.train(resume_from_checkpoint=True) continues from it" in message
    with TeacherServer(teacher) as restarted:  # the server is back, at another address
        resumed = trainer(restarted, tmp_path / "out", save_strategy="steps", save_steps=2)
        resumed.train(resume_from_checkpoint=True)
        assert len(restarted.scored) == 1 + 2 * 4  # the probe, then steps 5 and 6 only: 4 rows each
    assert resumed.state.global_step == 6
    continued, expected = _logged_losses(resumed), _logged_losses(unbroken)
    assert [continued[step] for step in (5, 6)] == pytest.approx([expected[5], expected[6]], rel=1e-5)


def test_the_rows_of_a_batch_are_asked_concurrently():
    teacher, batch = teacher_model(), batch_of(lm_data(n=8))
    with TeacherServer(teacher) as server:
        served = ServedTeacher(server.url, top_k=4, vocab_size=VOCAB, max_concurrency=4, retries=0)
        narrow = ServedTeacher(server.url, top_k=4, vocab_size=VOCAB, max_concurrency=2, retries=0)
        # The server answers only when 4 requests wait together: one row at a time would break the barrier.
        server.barrier = threading.Barrier(4, timeout=10)
        answered = served(batch, LOGITS).sparse_logits
        expected, mask = live_top_k(teacher, batch, 4)
        torch.testing.assert_close(answered[:, :-1][mask].dense(), expected)
        # With at most 2 in flight, a barrier of 3 never fills: the server gives up (HTTP 500), nothing is retried.
        server.barrier = threading.Barrier(3, timeout=1)
        with pytest.raises(TeacherServerError, match="HTTP 500: the other requests of the batch never came"):
            narrow(batch, LOGITS)


def test_failed_and_dropped_requests_are_retried_after_a_back_off():
    teacher, batch = teacher_model(), batch_of(lm_data(n=4))
    with TeacherServer(teacher) as server:
        served = ServedTeacher(server.url, top_k=4, vocab_size=VOCAB, retries=3, backoff=0.05)
        before = len(server.payloads)
        server.failures = [503, "drop", 429]
        started = time.monotonic()
        answered = served(batch, LOGITS).sparse_logits
        elapsed = time.monotonic() - started
        assert len(server.payloads) - before == 4 + 3  # every row answered once, three requests tried again
        assert elapsed >= 0.05  # a retry waited its back-off first
        expected, mask = live_top_k(teacher, batch, 4)
        torch.testing.assert_close(answered[:, :-1][mask].dense(), expected)
        # A request the server refuses (a 4xx other than 408/429) would be refused again: no retry.
        server.failures = [400]
        before = len(server.payloads)
        with pytest.raises(TeacherServerError, match="refused a request at a request .HTTP 400: the engine is"):
            served(batch_of(lm_data(n=1)), LOGITS)
        assert len(server.payloads) - before == 1


def test_a_silent_server_times_out_with_the_url():
    with TeacherServer(teacher_model()) as server:
        served = ServedTeacher(server.url, top_k=4, vocab_size=VOCAB, timeout=0.2, retries=1, backoff=0.01)
        server.slow = True  # answers only once the server stops
        with pytest.raises(TeacherServerError) as raised:
            served(batch_of(lm_data(n=2)), LOGITS)
    message = str(raised.value)
    assert f"the teacher server at {server.url}/v1/completions did not answer at a request after 2 tries" in message
    assert "no answer within timeout=0.2 s" in message


def test_summary_and_card_name_the_served_model(tmp_path):
    data = lm_data(n=8)
    with TeacherServer(teacher_model()) as server:
        trainer = DistillationTrainer(
            model=tiny_gpt2(),
            teacher_model=ServedTeacher(server.url, top_k=4),  # its size unknown: no parameters=
            args=config(tmp_path / "out", max_steps=1),
            train_dataset=data,
            eval_dataset=data.select(range(4)),
        )
        trainer.train()
        trainer.save_model()
        rows = trainer.compare_with_teacher()
        trainer.create_model_card(model_name="tiny-student")
    summary = json.loads((tmp_path / "out" / "distillation_config.json").read_text())
    assert summary["teacher"] == "tiny-teacher" and summary["teacher_class"] == "ServedTeacher (vllm)"
    assert summary["teacher_parameters"] is None
    assert summary["teacher_server"] == {"url": server.url, "engine": "vllm", "top_k": 4}
    assert list(rows) == ["teacher", "student"] and rows["teacher"]["parameters"] is None
    card = (tmp_path / "out" / "README.md").read_text()
    assert "from the teacher `tiny-teacher`.\nIt has 29.6k parameters.\n" in card  # no share of an unknown size
    assert "- Teacher: `tiny-teacher` (`ServedTeacher (vllm)`)" in card
    assert "| teacher | – |" in card
