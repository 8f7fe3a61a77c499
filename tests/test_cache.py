"""Offline teacher cache: write, resume, verify, replay (same loss as the live teacher for k = V)."""

import json
import os

import pytest
import torch
from conftest import VOCAB, classification_data, config, lm_data, tiny_bert, tiny_gpt2
from datasets import Dataset

from hf_kd import DistillationTrainer
from hf_kd.cache import MANIFEST_NAME, TeacherCache, _sparsify, densify, shard_file, write_teacher_cache
from hf_kd.data import add_sample_index


def _losses(trainer, dataset):
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    total = trainer.compute_loss(trainer.model, batch)
    total.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    trainer.model.zero_grad()
    return total.detach(), grads


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("losses", ["kl", "jsd:1.0:beta=0.3,reverse_kl:0.5"])
def test_full_vocabulary_cache_replays_the_live_teacher(tmp_path, losses, chunk_size):
    data = add_sample_index(lm_data(n=16))
    teacher = tiny_gpt2(hidden=48, seed=1)
    cache = write_teacher_cache(teacher, data, str(tmp_path / "cache"), top_k=VOCAB, dtype="float32", shard_size=5)
    assert len(cache) == 16 and cache.vocab_size == VOCAB

    args = config(tmp_path / "out", losses=losses, temperature=2.0, chunk_size=chunk_size)
    live = DistillationTrainer(model=tiny_gpt2(), teacher_model=teacher, args=args, train_dataset=data)
    replay = DistillationTrainer(model=tiny_gpt2(), teacher_model=cache, args=args, train_dataset=data)
    assert replay.teacher_model is None
    live_loss, live_grads = _losses(live, data)
    replay_loss, replay_grads = _losses(replay, data)
    torch.testing.assert_close(replay_loss, live_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(replay_grads, live_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_top_k_rows_keep_the_head_and_spread_the_tail():
    logits = torch.randn(5, 50)
    ids, values = _sparsify(logits, 8, "top_k", torch.Generator())
    dense = densify(ids, values, 50)
    probabilities = dense.exp()
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(5))
    reference = logits.log_softmax(-1)
    torch.testing.assert_close(dense.gather(1, ids), reference.gather(1, ids))
    tail = 1 - reference.gather(1, ids).exp().sum(-1)
    outside = probabilities.scatter(1, ids, 0.0)  # every other entry holds tail / (V - k)
    torch.testing.assert_close(outside.max(-1).values, tail / 42)


@pytest.mark.parametrize("mode", ["top_k", "sampled"])
@pytest.mark.parametrize("loss", ["kl", "soft_ce"])
def test_sparse_losses_equal_their_dense_form(mode, loss):
    from hf_kd.cache import sparse_rows
    from hf_kd.features import ModelFeatures
    from hf_kd.losses import get_loss

    generator = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(6, 40, generator=generator) * 3
    ids, values = _sparsify(teacher_logits, 8, mode, generator)
    teacher = sparse_rows(ids, values, 40, spread_tail=mode == "top_k")
    mask = torch.tensor([True, True, False, True, True, True])
    values = []
    for features in (ModelFeatures(sparse_logits=teacher), ModelFeatures(logits=teacher.dense())):
        student = torch.randn(6, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
        value = get_loss(loss, temperature=2.0)(ModelFeatures(logits=student), features, mask=mask)
        value.backward()
        values.append((value.detach(), student.grad))
    torch.testing.assert_close(values[0][0], values[1][0])
    torch.testing.assert_close(values[0][1], values[1][1])


def test_sampled_rows_estimate_the_teacher_without_bias():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    generator = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(400):
        ids, values = _sparsify(logits, 16, "sampled", generator)
        dense = densify(ids, values, 5, spread_tail=False)
        torch.testing.assert_close(dense.exp().sum(-1), torch.ones(1))
        estimates.append(dense.exp())
    mean = torch.cat(estimates).mean(0)
    # Standard error of a mean of 400 × 16 draws is below 0.007 for every entry.
    torch.testing.assert_close(mean, logits.softmax(-1)[0], atol=0.02, rtol=0)


def test_interrupted_writing_resumes_to_the_same_cache(tmp_path):
    data = lm_data(n=12)
    teacher = tiny_gpt2(seed=1)
    whole = write_teacher_cache(teacher, data, str(tmp_path / "whole"), top_k=4, mode="sampled", shard_size=4)
    folder = tmp_path / "resumed"
    write_teacher_cache(teacher, data, str(folder), top_k=4, mode="sampled", shard_size=4)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    last = manifest["shards"].pop()  # as if the run died while writing the last shard
    os.remove(folder / last["file"])
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="incomplete: 8 of 12"):
        TeacherCache.load(str(folder))
    resumed = write_teacher_cache(teacher, data, str(folder), top_k=4, mode="sampled", shard_size=4)
    assert resumed.manifest["shards"] == whole.manifest["shards"]  # same files, same checksums
    with pytest.raises(ValueError, match=r"different \['top_k'\]"):
        write_teacher_cache(teacher, data, str(folder), top_k=8, mode="sampled", shard_size=4)


def test_load_rejects_corrupt_shards_other_versions_and_other_teachers(tmp_path):
    folder = tmp_path / "cache"
    write_teacher_cache(tiny_gpt2(seed=1), lm_data(n=6), str(folder), top_k=4)
    TeacherCache.load(str(folder))
    with pytest.raises(ValueError, match="teacher=None, not 'gpt2-large'"):
        TeacherCache.load(str(folder), teacher="gpt2-large")
    with pytest.raises(ValueError, match="max_length=None, not 128"):
        TeacherCache.load(str(folder), max_length=128)
    shard = folder / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="does not match its checksum"):
        TeacherCache.load(str(folder))
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(ValueError, match="format version 0"):
        TeacherCache.load(str(folder))
    with pytest.raises(FileNotFoundError, match="not a teacher cache"):
        TeacherCache.load(str(tmp_path))


def test_trainer_rejects_a_cache_that_does_not_fit(tmp_path):
    data = lm_data(n=8)
    cache = write_teacher_cache(tiny_gpt2(seed=1), data, str(tmp_path / "cache"), top_k=4)
    args = config(tmp_path / "out")
    with pytest.raises(ValueError, match="add it with hf_kd.data.add_sample_index"):
        DistillationTrainer(model=tiny_gpt2(), teacher_model=cache, args=args, train_dataset=data)
    shorter = add_sample_index(data.map(lambda row: {"input_ids": row["input_ids"][:8], "labels": row["labels"][:8]}))
    with pytest.raises(ValueError, match="tokenised differently"):
        DistillationTrainer(model=tiny_gpt2(), teacher_model=cache, args=args, train_dataset=shorter)
    reordered = add_sample_index(data).select(range(7, -1, -1)).remove_columns("sample_index")
    with pytest.raises(ValueError, match="tokenised differently .* or reordered"):
        DistillationTrainer(
            model=tiny_gpt2(), teacher_model=cache, args=args, train_dataset=add_sample_index(reordered)
        )
    with pytest.raises(ValueError, match="over 64 classes/tokens and the student predicts 80"):
        DistillationTrainer(
            model=tiny_gpt2(vocab=80), teacher_model=cache, args=args, train_dataset=add_sample_index(data)
        )
    with pytest.raises(ValueError, match="does not provide"):
        DistillationTrainer(
            model=tiny_gpt2(),
            teacher_model=cache,
            args=config(tmp_path / "out", losses="hidden_mse"),
            train_dataset=add_sample_index(data),
        )
    sampled = write_teacher_cache(tiny_gpt2(seed=1), data, str(tmp_path / "sampled"), top_k=4, mode="sampled")
    with pytest.raises(ValueError, match=r"not for \['reverse_kl'\]"):
        DistillationTrainer(
            model=tiny_gpt2(),
            teacher_model=sampled,
            args=config(tmp_path / "out", losses="reverse_kl"),
            train_dataset=add_sample_index(data),
        )
    with pytest.raises(ValueError, match=r"temperature 1 .* not for \['kl'\]"):
        DistillationTrainer(
            model=tiny_gpt2(),
            teacher_model=sampled,
            args=config(tmp_path / "out", temperature=2.0),
            train_dataset=add_sample_index(data),
        )


def test_training_from_a_cache_needs_no_teacher_and_records_it(tmp_path):
    data = add_sample_index(classification_data(n=32))
    teacher = tiny_bert(hidden=48, seed=1)
    cache = write_teacher_cache(teacher, data, str(tmp_path / "cache"), top_k=2, mode="sampled", progress=False)
    del teacher
    args = config(tmp_path / "out", max_steps=6, temperature=1.0, eval_strategy="steps", eval_steps=3)
    trainer = DistillationTrainer(
        model=tiny_bert(), teacher_model=cache, args=args, train_dataset=data, eval_dataset=data.select(range(8))
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert logged and all(torch.isfinite(torch.tensor(entry["kl"])) for entry in logged)
    assert any("eval_loss" in entry for entry in trainer.state.log_history)  # student label loss only
    trainer.save_model()
    summary = json.loads((tmp_path / "out" / "distillation_config.json").read_text())
    assert summary["teacher_class"] == "BertForSequenceClassification"
    assert summary["teacher_cache"] == {
        "mode": "sampled",
        "top_k": 2,
        "dtype": "float16",
        "num_examples": 32,
        "vocab_size": 3,
    }
    rows = trainer.compare_with_teacher()
    assert list(rows) == ["student"]


def _word_tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(["[UNK]", "[PAD]", *words])}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]", pad_token="[PAD]"
    )


def test_a_cache_written_with_another_tokenizer_is_refused(tmp_path):
    data = lm_data(n=4)
    written_with = _word_tokenizer(["a", "b", "c"])
    cache = write_teacher_cache(
        tiny_gpt2(seed=1),
        data,
        str(tmp_path / "cache"),
        top_k=4,
        tokenizer=written_with,
        data_collator=lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in rows[0]},
    )
    TeacherCache.load(str(tmp_path / "cache"), tokenizer=_word_tokenizer(["a", "b", "c"]))
    with pytest.raises(ValueError, match="tokenizer="):
        TeacherCache.load(str(tmp_path / "cache"), tokenizer=_word_tokenizer(["a", "c", "b"]))
    with pytest.raises(ValueError, match="training tokenizer differs"):
        DistillationTrainer(
            model=tiny_gpt2(),
            teacher_model=cache,
            args=config(tmp_path / "out"),
            train_dataset=add_sample_index(data),
            processing_class=_word_tokenizer(["x"]),
        )


def test_rows_of_different_lengths_are_padded_with_the_tokenizer(tmp_path):
    from transformers import DataCollatorForSeq2Seq

    tokenizer = _word_tokenizer([f"w{i}" for i in range(VOCAB - 2)])
    generator = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for length in (5, 9, 3, 7, 6, 8):
        ids = torch.randint(2, VOCAB, (length,), generator=generator).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append([-100] + ids[1:])
    data = add_sample_index(Dataset.from_dict(rows))
    teacher = tiny_gpt2(seed=1)
    cache = write_teacher_cache(
        teacher, data, str(tmp_path / "cache"), top_k=VOCAB, dtype="float32", tokenizer=tokenizer, batch_size=4
    )
    assert cache.manifest["num_examples"] == 6
    args = config(tmp_path / "out", per_device_train_batch_size=6)
    collator = DataCollatorForSeq2Seq(tokenizer)
    losses = [
        _losses(
            DistillationTrainer(
                model=tiny_gpt2(), teacher_model=source, args=args, train_dataset=data, data_collator=collator
            ),
            data,
        )[0]
        for source in (teacher, cache)
    ]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_a_shard_is_a_file_inside_the_cache_folder(tmp_path):
    folder = tmp_path / "cache"
    (folder / "part").mkdir(parents=True)
    (folder / "part" / "x.safetensors").write_bytes(b"")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    os.symlink(folder / "part" / "x.safetensors", folder / "inside-link.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", folder / "outside-link.safetensors")
    for name in ("shard-00000.safetensors", "part/x.safetensors", "inside-link.safetensors"):
        assert shard_file(str(folder), {"file": name}) == str(folder / name)
    refused = {
        "../elsewhere.safetensors": "climbs out with '..'",
        "part/../../elsewhere.safetensors": "climbs out with '..'",
        str(tmp_path / "elsewhere.safetensors"): "is an absolute path",
        "outside-link.safetensors": f"resolves to {os.path.realpath(tmp_path / 'elsewhere.safetensors')}",
        ".": f"resolves to {os.path.realpath(folder)}",
        "": "is not a file name",
        None: "is not a file name",
    }
    for name, problem in refused.items():
        with pytest.raises(ValueError, match="which is not a file inside the cache folder") as raised:
            shard_file(str(folder), {"file": name, "first": 4, "count": 4})
        assert f"lists the shard {name!r} (examples 4 to 7)" in str(raised.value) and problem in str(raised.value)


def test_a_rewrite_never_writes_through_a_link_left_at_a_temporary_name(tmp_path):
    data, teacher = lm_data(n=8), tiny_gpt2(seed=1)
    whole = write_teacher_cache(teacher, data, str(tmp_path / "whole"), top_k=4, shard_size=4, progress=False)
    folder = tmp_path / "cache"
    write_teacher_cache(teacher, data, str(folder), top_k=4, shard_size=4, progress=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    os.remove(folder / "shard-00001.safetensors")
    for temporary in ("shard-00001.safetensors.tmp", f"{MANIFEST_NAME}.tmp"):
        os.symlink(victim, folder / temporary)
    repaired = write_teacher_cache(teacher, data, str(folder), top_k=4, shard_size=4, progress=False)
    assert victim.read_text() == "untouched"
    assert repaired.manifest["shards"] == whole.manifest["shards"]
    assert sorted(os.listdir(folder)) == [MANIFEST_NAME, "shard-00000.safetensors", "shard-00001.safetensors"]


# --- Packed rows (format version 3), caches written by several processes, old caches -------------------------------


@pytest.mark.parametrize("width", [1, 3, 8, 13, 15, 16, 17, 25, 32])
def test_bit_fields_round_trip_and_take_ceil_k_times_width_over_8_bytes(width):
    from hf_kd.cache_format import pack_bits, unpack_bits

    values = torch.randint(0, 1 << width, (9, 11), generator=torch.Generator().manual_seed(width))
    values[0] = (1 << width) - 1  # every bit set
    packed = pack_bits(values, width)
    assert packed.dtype == torch.uint8 and packed.shape == (9, -(-11 * width // 8))
    assert torch.equal(unpack_bits(packed, 11, width), values)
    assert int.from_bytes(pack_bits(torch.tensor([[5, 1]]), 3).numpy().tobytes(), "little") == 5 | 1 << 3
    with pytest.raises(ValueError, match=f"do not fit {width}-bit fields"):
        pack_bits(values + 1, width)


def _exact_top_k(logits, k):
    """The teacher's top-k log-probabilities (float32) and remaining mass, as a packed cache is written from."""
    log_probs = logits.float().log_softmax(-1)
    values, ids = log_probs.topk(k, dim=-1)
    return log_probs, ids, values, torch.logsumexp(log_probs.scatter(1, ids, float("-inf")), -1).exp()


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_packed_rows_stay_within_one_step_and_their_kl_within_half_a_step_squared(bits):
    from hf_kd.cache_format import RowLayout
    from hf_kd.teachers.precomputed import sparse_rows

    generator = torch.Generator().manual_seed(bits)
    logits = torch.randn(40, 300, generator=generator) * torch.linspace(0.5, 6, 40)[:, None]  # flat to peaked
    logits[3, :250] = float("-inf")  # only 50 entries possible: the top-k holds probability-0 entries
    log_probs, ids, values, tails = _exact_top_k(logits, 64)
    layout = RowLayout("top_k", 64, 300, log_prob_bits=bits)
    stored = layout.encode(ids, values, tails)
    assert {name: tensor.shape for name, tensor in stored.items()} == {
        "ids": (40, 72),  # 64 × ⌈log₂ 300⌉ = 64 × 9 bits
        "codes": (40, 8 * bits),
        "steps": (40,),
        "tails": (40,),
    }
    decoded_ids, decoded, decoded_tails = layout.decode(stored)
    assert torch.equal(decoded_ids, ids) and torch.equal(decoded_tails, tails)
    assert torch.isneginf(decoded[3, 50:]).all() and torch.isfinite(decoded[3, :50]).all()
    step = stored["steps"].float()
    finite = torch.isfinite(values)
    # The step: the smallest float16 ≥ (largest − smallest finite) / (2^bits − 2) (float16 spacing: 2^-10 relative,
    # 2^-24 absolute below 2^-14).
    exact_step = (values[:, 0] - torch.where(finite, values, float("inf")).amin(-1)) / ((1 << bits) - 2)
    assert (step >= exact_step).all() and (step <= exact_step * (1 + 2**-10) + 2**-24).all()
    error = (decoded - values).abs().masked_fill(~finite, 0).amax(-1)
    assert (error <= step + 2e-6).all(), (error - step).max()
    torch.testing.assert_close(decoded.exp().sum(-1) + tails, torch.ones(40))  # the remaining mass is kept
    exact = sparse_rows(ids, values, 300, tail=tails).dense()
    packed = sparse_rows(decoded_ids, decoded, 300, tail=decoded_tails).dense()
    kl = torch.where(exact.exp() > 0, exact.exp() * (exact - packed), 0.0).sum(-1)
    assert (kl <= step**2 / 2 + 1e-6).all(), (kl - step**2 / 2).max()


def test_packed_sampled_rows_keep_their_draw_counts_exactly(tmp_path):
    data = lm_data(n=7)
    teacher = tiny_gpt2(seed=1)
    options = dict(top_k=6, mode="sampled", shard_size=3, progress=False)
    unpacked = write_teacher_cache(teacher, data, str(tmp_path / "unpacked"), dtype="float32", **options)
    packed = write_teacher_cache(teacher, data, str(tmp_path / "packed"), packed=True, **options)
    assert packed.manifest["format_version"] == 3 and packed.manifest["replay_kl"] is None
    for example in range(7):
        ids, values = packed.rows(example)
        reference_ids, reference_values = unpacked.rows(example)
        assert torch.equal(ids, reference_ids.long()) and torch.equal(values, reference_values)
    # Per row: 6 ids of ⌈log₂ 64⌉ = 6 bits and 6 counts of ⌈log₂ 7⌉ = 3 bits, 5 + 3 bytes (48 unpacked in float32).
    handle = packed._handles[0]
    rows = handle.get_slice("ids").get_shape()[0]
    assert handle.get_slice("ids").get_shape() == [rows, 5] and handle.get_slice("counts").get_shape() == [rows, 3]


def _live_divergence(teacher, data, cache):
    """KL(live ‖ replayed) per distilled position, from the teacher run here and the cache's replay of each batch."""
    values = []
    for example in range(len(data)):
        batch = {key: torch.tensor([data[example][key]]) for key in ("input_ids", "attention_mask", "labels")}
        with torch.no_grad():
            live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        replayed = cache(batch, frozenset({"logits"}), sample_index=torch.tensor([example])).sparse_logits[:, :-1]
        mask = batch["labels"][:, 1:].ne(-100)
        live = live[mask].log_softmax(-1)
        values.append(torch.where(live.exp() > 0, live.exp() * (live - replayed[mask].dense()), 0.0).sum(-1))
    return torch.cat(values).double()


@pytest.mark.parametrize("packed", [False, True])
def test_the_writer_reports_the_kl_between_the_live_and_the_replayed_distribution(tmp_path, packed):
    data = lm_data(n=9)
    teacher = tiny_gpt2(hidden=48, seed=1)
    cache = write_teacher_cache(teacher, data, str(tmp_path / "cache"), top_k=8, packed=packed, shard_size=4)
    expected = _live_divergence(teacher, data, cache)
    reported = cache.manifest["replay_kl"]
    assert reported["positions"] == len(expected) and reported["infinite"] == 0
    assert reported["mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert reported["max"] == pytest.approx(expected.max().item(), rel=1e-5)
    shards = cache.manifest["shards"]
    assert sum(shard["kl_positions"] for shard in shards) == len(expected)
    assert cache.describe()["teacher_cache"]["replay_kl"] == reported
    if packed:
        assert cache.describe()["teacher_cache"] | {"replay_kl": None} == {
            "mode": "top_k",
            "top_k": 8,
            "dtype": None,
            "num_examples": 9,
            "vocab_size": VOCAB,
            "format_version": 3,
            "log_prob_bits": 8,
            "replay_kl": None,
        }


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_a_packed_full_vocabulary_cache_trains_like_the_live_teacher(tmp_path, chunk_size):
    # 16-bit codes: every log-probability within one step (~2e-4 nats here) of the live one, so the loss and its
    # gradients agree to about that; the chunked path reads the same rows (ids, log-probs and remaining masses).
    data = add_sample_index(lm_data(n=16))
    teacher = tiny_gpt2(hidden=48, seed=1)
    cache = write_teacher_cache(
        teacher, data, str(tmp_path / "cache"), top_k=VOCAB, packed=True, log_prob_bits=16, shard_size=5
    )
    steps = torch.cat([handle.get_tensor("steps").float() for handle in cache._handles])
    assert steps.max() < 3e-4
    args = config(tmp_path / "out", losses="kl", temperature=2.0, chunk_size=chunk_size)
    live_loss, live_grads = _losses(
        DistillationTrainer(model=tiny_gpt2(), teacher_model=teacher, args=args, train_dataset=data), data
    )
    replay_loss, replay_grads = _losses(
        DistillationTrainer(model=tiny_gpt2(), teacher_model=cache, args=args, train_dataset=data), data
    )
    torch.testing.assert_close(replay_loss, live_loss, rtol=1e-3, atol=0)
    for a, b in zip(replay_grads, live_grads):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-5)


OLD_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "teacher_cache_v2")


def test_a_cache_written_by_the_previous_version_replays_as_before(tmp_path):
    # tests/data/teacher_cache_v2: written by hf_kd before format version 3 (top_k=8, float16, lm_data(n=6), shards
    # of 4), with no KL fields. Its rows replay as the unpacked format defines them: the k entries as stored and
    # the remaining mass 1 − Σ spread uniformly over the other V − k entries.
    from safetensors.torch import load_file

    from hf_kd.teachers.precomputed import sparse_rows

    cache = TeacherCache.load(OLD_CACHE)
    assert cache.manifest["format_version"] == 2 and "replay_kl" not in cache.manifest
    data = add_sample_index(lm_data(n=6))
    raw = [load_file(os.path.join(OLD_CACHE, shard["file"])) for shard in cache.manifest["shards"]]
    for example in range(6):
        shard, local = raw[example // 4], example % 4
        start, stop = shard["offsets"][local : local + 2].tolist()
        ids, values = cache.rows(example)
        assert torch.equal(ids, shard["ids"][start:stop].long()) and torch.equal(values, shard["logprobs"][start:stop])
        batch = {key: torch.tensor([data[example][key]]) for key in ("input_ids", "attention_mask", "labels")}
        replayed = cache(batch, frozenset({"logits"}), sample_index=torch.tensor([example])).sparse_logits[:, :-1]
        stored = shard["logprobs"][start:stop].float()
        tail = 1 - stored.exp().sum(-1)
        expected = (tail / (VOCAB - 8)).log()[:, None].expand(-1, VOCAB).clone()
        expected.scatter_(1, shard["ids"][start:stop].long(), stored)
        torch.testing.assert_close(replayed[batch["labels"][:, 1:].ne(-100)].dense(), expected)
        assert torch.equal(replayed[batch["labels"][:, 1:].ne(-100)].dense(), sparse_rows(ids, values, VOCAB).dense())
    trainer = DistillationTrainer(
        model=tiny_gpt2(), teacher_model=cache, args=config(tmp_path / "out", max_steps=2), train_dataset=data
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(entry["kl"])) for entry in trainer.state.log_history if "kl" in entry)


def test_a_rerun_merges_what_the_processes_of_a_broken_launch_recorded(tmp_path):
    # A 2-process write that died: each process had recorded its finished shards in its own progress record, and no
    # manifest was written. Rerun by one process, the writer keeps the recorded shards, writes the rest, and leaves
    # the files of an unbroken run.
    from hf_kd.cache import PROGRESS_NAME

    data, teacher = lm_data(n=10), tiny_gpt2(seed=1)
    options = dict(top_k=4, shard_size=3, packed=True, progress=False)
    whole = write_teacher_cache(teacher, data, str(tmp_path / "whole"), **options)
    folder = tmp_path / "broken"
    write_teacher_cache(teacher, data, str(folder), **options)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).unlink()
    shards = manifest.pop("shards")
    for rank, kept in ((0, [shards[0]]), (1, [shards[1]])):  # shards 2 and 3 were never finished
        (folder / PROGRESS_NAME.format(rank)).write_text(json.dumps({**manifest, "shards": kept}))
    for shard in shards[2:]:
        (folder / shard["file"]).unlink()
    before = {shard["file"]: (folder / shard["file"]).stat().st_mtime_ns for shard in shards[:2]}
    resumed = write_teacher_cache(teacher, data, str(folder), **options)
    assert resumed.manifest == whole.manifest
    assert {name: (folder / name).stat().st_mtime_ns for name in before} == before  # kept, not written again
    assert sorted(os.listdir(folder)) == sorted(os.listdir(tmp_path / "whole"))  # the progress records are gone
    (folder / PROGRESS_NAME.format(1)).write_text(json.dumps({**manifest, "top_k": 8, "shards": []}))
    with pytest.raises(ValueError, match=r"different \['top_k'\]"):
        write_teacher_cache(teacher, data, str(folder), **options)


@pytest.mark.slow
def test_a_writer_called_from_the_main_process_alone_is_refused_not_left_waiting(tmp_path):
    # torchrun, 2 processes: rank 0 calls write_teacher_cache under `if is_main_process:`, rank 1 does something else;
    # rank 0 raises after join_timeout instead of waiting on rank 1 forever, and the launch ends cleanly.
    from conftest import run_two_processes

    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed", "cache_worker.py")
    run_two_processes(worker, tmp_path, "main_only", timeout=300)
    said = (tmp_path / "refusal-0.txt").read_text()
    assert said.startswith("write_teacher_cache runs on every process of the launch (2 processes)")
    assert "join_timeout=3 s" in said and "all_processes=False" in said
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # nothing written


@pytest.mark.slow
def test_two_processes_write_the_one_process_cache_byte_for_byte(tmp_path):
    # torchrun, 2 processes: rank 0 first writes each cache alone (all_processes=False), then both write it together
    # (5 shards: rank 0 writes 0, 2, 4 and rank 1 writes 1, 3); every file of the two folders is the same.
    from conftest import run_two_processes

    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed", "cache_worker.py")
    run_two_processes(worker, tmp_path, "write", timeout=300)
    for name in ("unpacked", "packed", "sampled"):
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        files = sorted(os.listdir(one))
        assert files == sorted(os.listdir(two)) == [MANIFEST_NAME] + [f"shard-{i:05d}.safetensors" for i in range(5)]
        for file in files:
            assert (one / file).read_bytes() == (two / file).read_bytes(), f"{name}/{file}"
        assert json.loads((two / MANIFEST_NAME).read_text())["num_examples"] == 14
