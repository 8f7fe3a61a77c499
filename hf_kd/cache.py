"""Offline teacher cache: the teacher runs once over a dataset, training replays its outputs with no teacher loaded.

For every position that carries distillation (the same positions the trainer distills: supervised tokens of a
causal/seq2seq LM, attended tokens without labels, one row per example for classifiers) the cache keeps

- ``top_k`` mode: the teacher's k most likely ids and their log-probabilities; the tail mass 1 − Σ top-k is
  spread uniformly over the other V − k entries when the distribution is rebuilt (exact for k = V);
- ``sampled`` mode (Anshumann et al. 2025, *Sparse Logit Sampling*): ``k`` ids drawn from the teacher's
  distribution with replacement, stored as the empirical distribution counts / k — an unbiased estimate of the
  teacher's probabilities, so losses linear in them (``kl``, ``soft_ce`` at temperature 1) get unbiased
  gradients, where top-k truncation is biased towards the head.

Layout: ``manifest.json`` (format version, teacher, tokenizer and example fingerprints' digest, settings, one
entry per shard with its sha256, the KL divergence between the live and the replayed distribution) and
``shard-NNNNN.safetensors`` files holding the rows (:mod:`hf_kd.cache_format`: unpacked, format version 2, or
packed, version 3), ``offsets`` per example and ``fingerprints`` per example. No pickle. Writing again over an
existing cache verifies every shard it lists (present, checksum, readable) and rewrites the missing or bad ones,
then the rest; loading checks the version and checksums, and the trainer checks the examples, tokenizer and
vocabulary against the cache, with errors that say what differs. Under a launcher with N processes every process
writes its share of the shards and the main process writes the one manifest: the same files as one process writes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from datetime import timedelta

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, default_data_collator
from transformers.utils import logging

from .cache_format import (
    LOG_PROB_BITS,
    PACKED_VERSION,
    UNPACKED_VERSION,
    VALUE_DTYPES,
    RowLayout,
    layout_of,
    shard_tensors,
)
from .data import SAMPLE_INDEX
from .evaluation import count_parameters
from .features import ModelFeatures
from .model_kinds import is_causal_lm, is_token_level, labels_mark_distilled_positions, output_size
from .positions import distillation_mask
from .teachers import LiveTeacher, ServedTeacher, TeacherSource, unwrap
from .teachers.precomputed import sparse_batch, sparse_rows

logger = logging.get_logger(__name__)

# 2: attention_mask and token_type_ids joined the fingerprints; token classifiers distil every attended token.
# 3: the packed rows (hf_kd.cache_format). Both are read.
READABLE_VERSIONS = (UNPACKED_VERSION, PACKED_VERSION)
MANIFEST_NAME = "manifest.json"
# What each process of an N-process write has finished so far (the main process merges them into the manifest).
PROGRESS_NAME = "manifest-process-{:05d}.json"
MODES = ("top_k", "sampled")
# Manifest fields that summarise the shards written, not settings a resumed write must share.
SUMMARY_FIELDS = ("vocab_size", "replay_kl", "shards")
# Positions whose live and replayed distributions are compared at once (two dense N×V tensors each).
KL_ROWS_PER_PASS = 256
# The columns an example's cached rows depend on: what the teacher reads and what decides the distilled positions.
FINGERPRINT_COLUMNS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "labels",
    "decoder_input_ids",
    "decoder_attention_mask",
    "pixel_values",
    "input_values",
    "input_features",
)


def example_fingerprint(example: dict) -> int:
    """A 63-bit hash of an example's token ids / labels / pixels: a cache row belongs to exactly this example.

    Args:
        example: A dataset row (its :data:`FINGERPRINT_COLUMNS` count).

    Returns:
        A non-negative int below 2^63.
    """
    digest = hashlib.blake2b(digest_size=8)
    for column in FINGERPRINT_COLUMNS:
        if column in example and example[column] is not None:
            array = np.asarray(example[column])
            digest.update(column.encode())
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array, dtype=np.float64 if array.dtype.kind == "f" else np.int64))
    return int.from_bytes(digest.digest(), "little") >> 1  # fits an int64


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A digest of a tokenizer's vocabulary and special tokens.

    Args:
        tokenizer: A tokenizer with ``get_vocab``, or ``None``.

    Returns:
        16 hex digits, or ``None`` without a tokenizer.
    """
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    payload = json.dumps(
        [sorted(tokenizer.get_vocab().items()), sorted(map(str, tokenizer.all_special_tokens))], ensure_ascii=False
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: str, payload: dict) -> None:
    temporary = path + ".tmp"
    _remove_leftover(temporary)
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(temporary, path)  # a crash never leaves a half-written manifest


def write_teacher_cache(
    teacher: nn.Module | ServedTeacher,
    dataset,
    path: str,
    *,
    top_k: int = 64,
    mode: str = "top_k",
    tokenizer=None,
    data_collator=None,
    max_length: int | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    dtype: str | None = None,
    packed: bool = False,
    log_prob_bits: int | None = None,
    token_level: bool | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    all_processes: bool = True,
    join_timeout: float = 600.0,
    progress: bool = True,
) -> TeacherCache:
    """Run ``teacher`` once over ``dataset`` (tokenised, in its row order) and write its outputs to ``path``.

    Rerunning with the same arguments resumes: every shard already listed is verified (present, checksum, readable)
    and the missing or bad ones are rewritten with the rest, so a repaired cache equals an unbroken run's. Different
    arguments on an existing cache raise. Under a launcher with N processes (``torchrun``, ``accelerate launch``),
    every process calls this with the same arguments: process r writes the shards i with i mod N = r and, once all
    are done, the main process writes the one manifest — the same files, byte for byte, as one process writes. For
    top-k caches the writer measures, position by position, the KL divergence KL(live ‖ replayed) between the
    distribution the teacher gives (a served teacher: its top-k answer as training would read it) and the one the
    cache replays; the manifest's ``replay_kl`` holds its mean and maximum over the positions where it is finite,
    and how many positions it is infinite at (the unpacked layout drops a remaining mass below 1e-6), and the
    writer logs them.

    Args:
        teacher: A model, or a :class:`~hf_kd.teachers.ServedTeacher` (a causal LM answered by an inference engine,
            whose top-k answers are written as they come; a server that stops answering leaves the shards written
            so far for the rerun).
        dataset: Tokenised rows (a ``datasets.Dataset``), in training row order.
        path: The cache folder (under N processes, one folder that every process sees).
        top_k: k: ids kept per position, or draws per position in ``sampled`` mode (a served teacher: at most its
            own ``top_k``).
        mode: ``"top_k"`` or ``"sampled"`` (see the module docstring).
        tokenizer: Recorded so that training with another tokenizer is refused; pads rows of unequal length.
        data_collator: Batches rows as in training (default: padding with ``tokenizer`` — per-token labels with
            -100 —, else ``default_data_collator``).
        max_length: Recorded so that a mismatch at training time is caught.
        batch_size: Rows per teacher forward.
        shard_size: Rows per shard file.
        dtype: The unpacked layout's log-probability dtype: ``"float16"`` (default), ``"bfloat16"`` or
            ``"float32"``.
        packed: Write the packed layout (format version 3, :mod:`hf_kd.cache_format`): ids in ⌈log₂ V⌉ bits,
            top-k log-probabilities as ``log_prob_bits``-bit codes per row with the remaining mass kept exactly,
            sampled draws as exact counts. 198 bytes per position at k = 64, V = 49,152 (384 unpacked).
        log_prob_bits: Bits per log-probability of a packed top-k cache, 2 to 16 (default 8).
        token_level: Whether the teacher predicts per token (default: from the model).
        seed: Seeds the draws of ``sampled`` mode (shard i draws from ``seed + i``).
        device: Where the teacher's inputs go (default: the teacher's device).
        all_processes: Under a launcher with N processes, share the work among all of them (every process calls
            this). ``False``: this process writes the whole cache alone (call it from one process only).
        join_timeout: Seconds every process of the launch waits, on entry, for all the others to call the writer
            too; a process that does not (a call under ``if accelerator.is_main_process:``) makes the ones that did
            raise instead of waiting on it forever.
        progress: Show a progress bar (the main process's share).

    Returns:
        The written :class:`TeacherCache`.

    Raises:
        ValueError: An unknown mode or dtype, ``top_k``, ``shard_size``, ``batch_size`` or ``log_prob_bits`` out of
            range, an option of the other layout, ``top_k`` above the vocabulary, a folder holding a cache written
            with other settings, or processes of one launch called with different arguments.
        TypeError: A dataset without indexing, or ``packed`` not a bool.
        RuntimeError: Under N processes with ``all_processes=True``, a process of the launch did not call the writer
            within ``join_timeout`` seconds.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if top_k <= 0:
        raise ValueError(f"top_k must be a positive number of entries per position, got {top_k}.")
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be > 0, got {shard_size} and {batch_size}.")
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be True or False, got {packed!r}.")
    if log_prob_bits is not None and (not isinstance(log_prob_bits, int) or log_prob_bits not in LOG_PROB_BITS):
        raise ValueError(f"log_prob_bits must be a whole number of bits from 2 to 16, got {log_prob_bits!r}.")
    if packed:
        if dtype is not None:
            raise ValueError(
                f"dtype={dtype!r} is the value type of the unpacked layout; a packed cache stores each top-k "
                "log-probability as a log_prob_bits-bit code (and sampled draws as counts): leave dtype out."
            )
        if mode == "sampled" and log_prob_bits is not None:
            raise ValueError(
                "a packed sampled cache stores each id's draw count exactly (⌈log₂(k + 1)⌉ bits): log_prob_bits "
                "applies to top_k caches only."
            )
        log_prob_bits = 8 if mode == "top_k" and log_prob_bits is None else log_prob_bits
    else:
        if log_prob_bits is not None:
            raise ValueError(
                f"log_prob_bits={log_prob_bits} sets the packed layout's codes: pass packed=True with it (the "
                "unpacked layout stores log-probabilities at dtype)."
            )
        dtype = "float16" if dtype is None else dtype
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(VALUE_DTYPES)}, got {dtype!r}.")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError("dataset must be indexable with a length (a datasets.Dataset), in training row order.")
    served = teacher if isinstance(teacher, ServedTeacher) else None
    if served is not None:  # a causal LM's every token, answered on the CPU side of the connection
        described = served.cache_description(top_k, mode, token_level, tokenizer)
        token_level = shift = by_labels = True
        device = torch.device("cpu")
    else:
        model = unwrap(teacher)
        token_level = is_token_level(model) if token_level is None else token_level
        shift = token_level and is_causal_lm(model)
        by_labels = labels_mark_distilled_positions(model)
        device = torch.device(device) if device is not None else next(model.parameters()).device
        described = {
            "teacher": getattr(model, "name_or_path", None) or None,
            "teacher_class": type(model).__name__,
            "teacher_parameters": count_parameters(model),
            "teacher_config": hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:16]
            if hasattr(model, "config")
            else None,
        }
    if data_collator is None:
        data_collator = _default_collator(dataset, tokenizer)

    rank, processes, group = _process_share() if all_processes else (0, 1, None)
    _every_process_joins(processes, group, join_timeout)
    columns = [c for c in dataset.column_names if c != SAMPLE_INDEX] if hasattr(dataset, "column_names") else None
    rows = dataset.select_columns(columns) if columns is not None else dataset
    num_shards = -(-len(rows) // shard_size)
    mine = [index for index in range(num_shards) if index % processes == rank]
    settings = {
        "format_version": PACKED_VERSION if packed else UNPACKED_VERSION,
        "mode": mode,
        "top_k": top_k,
        "dtype": dtype,
        **({"log_prob_bits": log_prob_bits} if packed else {}),
        "seed": seed,
        "token_level": token_level,
        "causal": shift,
        "positions_by_labels": by_labels,
        **described,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "num_examples": len(rows),
    }
    # Each process fingerprints the rows of its own shards; all of them need the digest of every row.
    own = {
        index: [example_fingerprint(rows[row]) for row in _shard_range(index, shard_size, len(rows))] for index in mine
    }
    call = {**settings, "path": os.path.abspath(path), "batch_size": batch_size, "shard_size": shard_size}
    shared = _gather((call, own), processes, group)
    differing = sorted(
        {key for other, _ in shared for key in call.keys() | other.keys() if other.get(key) != call.get(key)}
    )
    if differing:
        raise ValueError(
            f"write_teacher_cache was called with different {differing} in the processes of this launch: every "
            "process calls it with the same teacher, data, folder and settings (each writes its share of the "
            "shards), or pass all_processes=False and call it from one process."
        )
    by_shard = {index: prints for _, part in shared for index, prints in part.items()}
    fingerprints = [value for index in range(num_shards) for value in by_shard[index]]
    manifest = {
        **settings,
        "examples": hashlib.sha256(np.asarray(fingerprints, dtype=np.int64).tobytes()).hexdigest()[:16],
        "shard_size": shard_size,
    }
    os.makedirs(path, exist_ok=True)
    manifest_path = os.path.join(path, MANIFEST_NAME)
    listed, vocab_size = _listed_shards(path, manifest)
    _barrier(processes, group)  # every process has read what earlier runs left before any writes
    tensors = shard_tensors(packed, mode)
    done: dict[int, dict] = {}
    for index in mine:  # the others are written again
        first = index * shard_size
        sound = [shard for shard in listed.get(first, []) if _shard_problem(path, shard, tensors) is None]
        if sound:
            done[index] = sound[0]
    vocab_size = vocab_size if done else None
    record = manifest_path if processes == 1 else os.path.join(path, PROGRESS_NAME.format(rank))
    live = None if served is not None else LiveTeacher(teacher)
    resume = "The shards written before it are kept: rerun write_teacher_cache with the same arguments to go on."
    generator = torch.Generator(device="cpu")
    bar = tqdm(
        total=sum(len(_shard_range(index, shard_size, len(rows))) for index in mine),
        desc="teacher cache",
        unit="ex",
        disable=not progress or rank != 0,
    )
    for index in mine:
        span = _shard_range(index, shard_size, len(rows))
        if index in done:
            bar.update(len(span))
            continue
        generator.manual_seed(seed + index)  # a resumed shard draws the same samples as an unbroken run
        stored, per_example, kl = [], [], _KLTally()
        for start in range(span.start, span.stop, batch_size):
            stop = min(start + batch_size, span.stop)
            batch = data_collator([rows[row] for row in range(start, stop)])
            batch = {key: value.to(device) for key, value in batch.items() if torch.is_tensor(value)}
            mask = distillation_mask(batch, token_level, shift, by_labels)
            if served is not None:  # the engine's top-k as it answered: the rows a live teacher's top-k would give
                with served.during(f"writing the teacher cache in {path} (examples {start} to {stop - 1})", resume):
                    answered = served(batch, frozenset({"logits"})).sparse_logits[:, :-1]
                if mask is None:  # no labels, no attention mask: every position
                    mask = torch.ones(answered.ids.shape[:2], dtype=torch.bool)
                answered = answered[mask]
                per_example += mask.sum(-1).tolist()
                vocab_size = answered.vocab_size
                layout = RowLayout(mode, top_k, vocab_size, dtype, log_prob_bits)
                ids, values = answered.ids[:, :top_k], answered.logprobs[:, :top_k]
                tails = (1 - values.double().exp().sum(-1)).clamp(min=0).float() if packed else None
                stored.append(layout.encode(ids, values, tails))
                kl.add(lambda part, answered=answered: answered[part].dense(), layout, stored[-1])
                bar.update(stop - start)
                continue
            logits = live(batch, frozenset({"logits"})).logits
            if shift:
                logits = logits[:, :-1]
            if mask is None:  # every position: one row per example (classifiers) or every token
                positions = logits.reshape(-1, logits.shape[-1])
                per_example += [positions.shape[0] // logits.shape[0]] * logits.shape[0]
            else:
                positions = logits[mask]
                per_example += mask.sum(-1).tolist()
            vocab_size = logits.shape[-1]
            if top_k > vocab_size and mode == "top_k":
                raise ValueError(f"top_k={top_k} exceeds the teacher's {vocab_size} classes/vocabulary entries.")
            layout = RowLayout(mode, top_k, vocab_size, dtype, log_prob_bits)
            if mode == "sampled":
                stored.append(layout.encode(*_sparsify(positions, top_k, mode, generator), None))
            else:
                stored.append(_top_k_rows(positions, layout, kl))
            bar.update(stop - start)
        name = f"shard-{index:05d}.safetensors"
        file = os.path.join(path, name)  # os.replace below replaces a link at that name, never writes through it
        offsets = np.concatenate([[0], np.cumsum(per_example)]).astype(np.int64)
        _remove_leftover(file + ".tmp")
        save_file(
            {
                **{key: torch.cat([part[key] for part in stored]).contiguous() for key in stored[0]},
                "offsets": torch.from_numpy(offsets),
                "fingerprints": torch.tensor(fingerprints[span.start : span.stop], dtype=torch.int64),
            },
            file + ".tmp",
        )
        os.replace(file + ".tmp", file)
        done[index] = {"file": name, "first": span.start, "count": len(span), "sha256": _sha256(file), **kl.entry()}
        if _replay_kl(done.values()) is not None:  # the mean KL(live ‖ replayed) so far
            bar.set_postfix(kl=f"{_replay_kl(done.values())['mean']:.3g}")
        _write_json(record, _manifest(manifest, vocab_size, done.values()))
    bar.close()
    finished = _gather((list(done.values()), vocab_size), processes, group)
    shards = [shard for part, _ in finished for shard in part]
    vocab_size = next((size for _, size in finished if size is not None), None)
    complete = _manifest(manifest, vocab_size, shards)
    if rank == 0:
        _write_json(manifest_path, complete)
        for leftover in glob.glob(os.path.join(glob.escape(path), PROGRESS_NAME.replace("{:05d}", "*"))):
            os.remove(leftover)  # merged into the manifest
        if complete["replay_kl"] is not None:
            kl = complete["replay_kl"]
            summary = (
                f"teacher cache {path}: KL(live ‖ replayed) mean {kl['mean']:.4g}, max {kl['max']:.4g} nats over "
                f"{kl['positions']} positions" + (f"; infinite at {kl['infinite']}" if kl["infinite"] else "")
            )
            logger.info(summary)
            if progress:
                tqdm.write(summary)
    _barrier(processes, group)  # no process returns before the manifest is there
    return TeacherCache.load(path, verify_checksums=False)  # every shard was just hashed


def _shard_range(index: int, shard_size: int, num_examples: int) -> range:
    return range(index * shard_size, min((index + 1) * shard_size, num_examples))


def _process_share() -> tuple[int, int, object]:
    """``(rank, number of processes, group)`` of the launch this process belongs to: ``group`` is a gloo group over
    all of them for the writer's own small exchanges (settings, fingerprints, manifest entries; the default group's
    when it is gloo). Joins the launch's default process group when a launcher (``torchrun``, ``accelerate
    launch``) started several processes and none is set up yet; a trainer made afterwards finds it."""
    if not torch.distributed.is_available():
        return 0, 1, None
    if not torch.distributed.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1, None
        torch.distributed.init_process_group()  # env://, NCCL for CUDA tensors and gloo for CPU ones where CUDA is
    processes = torch.distributed.get_world_size()
    if processes == 1:
        return 0, 1, None
    group = None if torch.distributed.get_backend() == "gloo" else torch.distributed.new_group(backend="gloo")
    return torch.distributed.get_rank(), processes, group


def _every_process_joins(processes: int, group, timeout: float) -> None:
    """Raise when a process of the launch does not reach the writer within ``timeout`` seconds: the writer's exchanges
    are collective, so a call from the main process alone would otherwise wait on the others forever."""
    if processes == 1:
        return
    try:  # gloo's barrier that names the processes missing, instead of hanging until the group's own timeout
        torch.distributed.monitored_barrier(group=group, timeout=timedelta(seconds=timeout), wait_all_ranks=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"write_teacher_cache runs on every process of the launch ({processes} processes), each writing its share "
            f"of the shards, but not all of them called it within join_timeout={timeout:g} s ({error}). Call it from "
            "every process, or pass all_processes=False to write the whole cache from this one process."
        ) from None


def _gather(value, processes: int, group) -> list:
    """``value`` of every process, in rank order (JSON-like values: settings, fingerprints, manifest entries)."""
    if processes == 1:
        return [value]
    gathered = [None] * processes
    torch.distributed.all_gather_object(gathered, value, group=group)
    return gathered


def _barrier(processes: int, group) -> None:
    if processes > 1:
        torch.distributed.barrier(group=group)


def _listed_shards(path: str, manifest: dict) -> tuple[dict[int, list[dict]], int | None]:
    """The shards that the manifest and the processes' progress records of an earlier run list, by first example,
    and the vocabulary size they record; raises when those were written with other settings."""
    listed: dict[int, list[dict]] = {}
    vocab_size = None
    records = [os.path.join(path, MANIFEST_NAME)]
    records += sorted(glob.glob(os.path.join(glob.escape(path), PROGRESS_NAME.replace("{:05d}", "*"))))
    for record in records:
        if not os.path.exists(record):
            continue
        with open(record) as handle:
            existing = json.load(handle)
        written = {key: value for key, value in existing.items() if key not in SUMMARY_FIELDS}
        differing = sorted(key for key in manifest.keys() | written.keys() if manifest.get(key) != written.get(key))
        if differing:
            raise ValueError(
                f"{path} already holds a teacher cache written with different {differing}; resume with the same "
                "teacher, data and settings, or write to an empty folder."
            )
        for shard in existing.get("shards", []):
            shard_file(path, shard)  # a name outside the folder is refused by every process alike, before any writes
            listed.setdefault(shard["first"], []).append(shard)
        vocab_size = existing.get("vocab_size") if existing.get("shards") else vocab_size
    return listed, vocab_size


def _manifest(settings: dict, vocab_size: int | None, shards) -> dict:
    shards = sorted(shards, key=_first)
    return {**settings, "vocab_size": vocab_size, "replay_kl": _replay_kl(shards), "shards": shards}


def _replay_kl(shards) -> dict | None:
    """The KL divergence between the live and the replayed distribution over every position of ``shards``
    (``None`` for sampled caches, or while a shard written before the measure lacks it)."""
    shards = list(shards)
    if not shards or any("kl_sum" not in shard for shard in shards):
        return None
    positions = sum(shard["kl_positions"] for shard in shards)
    return {
        "mean": sum(shard["kl_sum"] for shard in shards) / max(positions, 1),
        "max": max(shard["kl_max"] for shard in shards),
        "positions": positions,
        "infinite": sum(shard["kl_infinite"] for shard in shards),
    }


class _KLTally:
    """KL(live ‖ replayed) over a shard's positions: sum and maximum where finite, and the infinite count."""

    def __init__(self):
        self.total, self.largest, self.finite, self.infinite, self.measured = 0.0, 0.0, 0, 0, False

    def add(self, live, layout: RowLayout, stored: dict) -> None:
        """Compare the positions of ``stored`` (one layout's row tensors) with ``live(rows)``, their live dense
        log-probabilities (a function of a slice, so that only a slice is dense at a time)."""
        if layout.mode != "top_k":
            return
        self.measured = True
        ids, values, *tails = layout.decode(stored)
        replay = sparse_rows(ids, values, layout.vocab_size, tail=tails[0] if tails else None)
        for start in range(0, replay.ids.shape[0], KL_ROWS_PER_PASS):
            part = slice(start, start + KL_ROWS_PER_PASS)
            values = replay_divergence(live(part), replay[part].dense())
            finite = torch.isfinite(values)
            self.total += float(values[finite].sum())
            self.largest = max(self.largest, float(values[finite].max())) if finite.any() else self.largest
            self.finite += int(finite.sum())
            self.infinite += int((~finite).sum())

    def entry(self) -> dict:
        """The shard entry's KL fields (none for sampled rows)."""
        if not self.measured:
            return {}
        return {"kl_sum": self.total, "kl_max": self.largest, "kl_positions": self.finite, "kl_infinite": self.infinite}


def replay_divergence(live: torch.Tensor, replayed: torch.Tensor) -> torch.Tensor:
    """KL(live ‖ replayed) = Σ p (log p − log q) per position, float64; infinite where the replay gives
    probability 0 to an entry the live distribution does not.

    Args:
        live: N×V live log-probabilities.
        replayed: N×V replayed log-probabilities.

    Returns:
        N values in nats.
    """
    live = live.float()
    probabilities = live.exp()
    terms = torch.where(probabilities > 0, probabilities * (live - replayed.float()), 0.0)
    return terms.sum(-1, dtype=torch.float64)


@torch.no_grad()
def _top_k_rows(positions: torch.Tensor, layout: RowLayout, kl: _KLTally) -> dict:
    """The top-k rows of ``positions`` (N×V logits) as ``layout`` stores them, tallying their replay's KL."""
    parts = []
    for start in range(0, max(positions.shape[0], 1), KL_ROWS_PER_PASS):  # no position: one empty part
        log_probs = torch.log_softmax(positions[start : start + KL_ROWS_PER_PASS].float(), dim=-1)
        values, ids = log_probs.topk(layout.top_k, dim=-1)
        tails = None
        if layout.packed:  # the remaining mass itself, exact where it is far below the top-k's rounding
            tails = torch.logsumexp(log_probs.scatter(1, ids, float("-inf")), dim=-1).exp()
        parts.append(layout.encode(ids, values, tails))
        kl.add(lambda part, log_probs=log_probs: log_probs[part], layout, parts[-1])
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def shard_file(path: str, shard: dict) -> str:
    """The file of the manifest entry ``shard``, confined to the cache folder ``path``: a relative name without
    ``..`` that does not resolve, through links, outside the folder (a manifest is data: it must not make a load
    read, or a repair trust, a file elsewhere).

    Args:
        path: The cache folder.
        shard: A manifest entry (its ``file``, and ``first`` and ``count`` for the error).

    Returns:
        The file's path inside ``path``.

    Raises:
        ValueError: The entry names no file, an absolute path, climbs out with ``..`` or resolves outside the folder.
    """
    name = shard.get("file") if isinstance(shard, dict) else None
    problem = None
    if not isinstance(name, str) or not name.strip():
        problem = "is not a file name"
    elif os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        problem = "is an absolute path or climbs out with '..'"
    else:
        root = os.path.realpath(path)
        resolved = os.path.realpath(os.path.join(path, name))
        if resolved == root or os.path.commonpath([root, resolved]) != root:
            problem = f"resolves to {resolved}"
    if problem is not None:
        examples = ""
        if isinstance(shard, dict) and isinstance(shard.get("first"), int) and isinstance(shard.get("count"), int):
            examples = f" (examples {shard['first']} to {shard['first'] + shard['count'] - 1})"
        raise ValueError(
            f"the manifest of the teacher cache in {path} lists the shard {name!r}{examples}, which is not a file "
            f"inside the cache folder: it {problem}. A shard is a file of the cache folder itself. Remove that "
            f"entry from {MANIFEST_NAME} (write_teacher_cache with the same arguments then writes the shard again), "
            "or write the cache into an empty folder."
        )
    return os.path.join(path, name)


def _remove_leftover(temporary: str) -> None:
    """Remove what a crash (or anyone) left at a temporary file's name, so writing never follows a link there."""
    if os.path.lexists(temporary):
        os.remove(temporary)


def _shard_problem(path: str, shard: dict, tensors: tuple[str, ...]) -> str | None:
    """Why a listed shard cannot be used (missing, checksum, unreadable, without one of ``tensors``), or ``None``
    when it is sound; a shard outside the cache folder raises (:func:`shard_file`)."""
    file = shard_file(path, shard)
    if not os.path.exists(file):
        return "is missing"
    if _sha256(file) != shard["sha256"]:
        return "does not match its checksum (corrupt or changed)"
    try:
        with safe_open(file, "pt") as handle:
            missing = set(tensors) - set(handle.keys())
    except (SafetensorError, OSError) as error:
        return f"is not a readable safetensors file ({error})"
    return f"lacks the tensors {sorted(missing)}" if missing else None


def _default_collator(dataset, tokenizer):
    """Padding with ``tokenizer`` (labels too, with -100, when they are per token), else stacking."""
    if tokenizer is None:
        return default_data_collator
    labels = dataset[0].get("labels") if len(dataset) else None
    if isinstance(labels, (list, tuple)) or (torch.is_tensor(labels) and labels.dim() > 0):
        return DataCollatorForSeq2Seq(tokenizer)
    return DataCollatorWithPadding(tokenizer)


def _first(shard: dict) -> int:
    return shard["first"]


@torch.no_grad()
def _sparsify(positions: torch.Tensor, k: int, mode: str, generator: torch.Generator):
    """``(ids, log-probabilities)`` N×k of each position's teacher distribution (see the module docstring)."""
    log_probs = torch.log_softmax(positions.float(), dim=-1)
    if mode == "top_k":
        values, ids = log_probs.topk(k, dim=-1)
        return ids, values
    draws = torch.multinomial(log_probs.exp().cpu(), k, replacement=True, generator=generator).to(positions.device)
    counts = torch.zeros_like(log_probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=log_probs.dtype))
    # Every drawn id (at most min(k, V) distinct), then zero-count fillers.
    frequency, ids = counts.topk(min(k, counts.shape[-1]), dim=-1)
    return ids, torch.log(frequency / k)  # log 0 = -inf: a filler carries no probability


def densify(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int, spread_tail: bool = True) -> torch.Tensor:
    """Full N×V log-probabilities from cached rows (see :func:`~hf_kd.teachers.precomputed.sparse_rows`).

    Args:
        ids: N×k vocabulary ids.
        logprobs: N×k log-probabilities.
        vocab_size: V.
        spread_tail: Spread the remaining mass over the other entries (top-k rows), else 0 (sampled rows).

    Returns:
        An N×V float tensor.
    """
    return sparse_rows(ids, logprobs, vocab_size, spread_tail).dense()


class TeacherCache(TeacherSource):
    """A teacher replayed from :func:`write_teacher_cache` output: pass it as ``teacher_model=`` to
    :class:`~hf_kd.DistillationTrainer`. The training set must be the cached dataset with a ``sample_index``
    column (:func:`hf_kd.data.add_sample_index`), which keys each batch row to its cached rows. Only logit losses
    can be replayed; evaluation reports the student's label loss (the cache covers the training data only). Reads
    both layouts (format versions 2 and 3, :mod:`hf_kd.cache_format`); packed rows are unpacked on the device of the
    batch, so only their bytes cross to it.

    Args:
        path: The cache folder.
        manifest: Its manifest (use :meth:`load`, which checks it).

    Raises:
        ValueError: A shard that is not a readable safetensors file.
    """

    provides = frozenset({"logits"})
    covers_eval = False

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.model = None
        self.vocab_size = manifest["vocab_size"]
        self.layout = layout_of(manifest)
        self._firsts = np.asarray([shard["first"] for shard in manifest["shards"]])
        try:
            self._handles = [safe_open(shard_file(path, shard), "pt") for shard in manifest["shards"]]
        except SafetensorError as error:  # only without checksum verification: a garbage file
            raise ValueError(
                f"a shard of the teacher cache in {path} is not a readable safetensors file ({error}). Run "
                "write_teacher_cache again with the same arguments to rewrite it."
            ) from error
        self._offsets = [handle.get_tensor("offsets") for handle in self._handles]

    @classmethod
    def load(
        cls,
        path: str,
        *,
        verify_checksums: bool = True,
        teacher: str | None = None,
        tokenizer=None,
        max_length: int | None = None,
    ) -> TeacherCache:
        """Open a cache, checking its format version, completeness, shard checksums and, when given, that it was
        written by ``teacher``, with ``tokenizer`` and ``max_length``.

        Args:
            path: The cache folder.
            verify_checksums: Hash every shard against the manifest's sha256.
            teacher: The teacher's name or path the cache must have been written by.
            tokenizer: The tokenizer the cache must have been written with.
            max_length: The ``max_length`` the cache must have been written with.

        Returns:
            The opened cache (a :class:`TeacherCache`).

        Raises:
            FileNotFoundError: ``path`` holds no manifest.
            ValueError: Another format version, a cache not finished, a missing or damaged shard, or another
                teacher, tokenizer or ``max_length``.
        """
        manifest_path = os.path.join(path, MANIFEST_NAME)
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"{path} is not a teacher cache (no {MANIFEST_NAME}); write one first.")
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        version = manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{path} is a teacher cache of format version {version}; this hf_kd reads versions "
                f"{UNPACKED_VERSION} (unpacked) and {PACKED_VERSION} (packed). Write the cache again with this "
                "version."
            )
        cached = sum(shard["count"] for shard in manifest["shards"])
        if cached != manifest["num_examples"]:
            raise ValueError(
                f"{path} is incomplete: {cached} of {manifest['num_examples']} examples were written. Run "
                "write_teacher_cache again with the same arguments to resume."
            )
        tensors = shard_tensors(version == PACKED_VERSION, manifest["mode"])
        for shard in manifest["shards"]:
            problem = _shard_problem(path, shard, tensors) if verify_checksums else None
            if problem is None and not os.path.exists(shard_file(path, shard)):
                problem = "is missing"
            if problem is not None:
                raise ValueError(
                    f"{shard['file']} in {path} {problem}. Run write_teacher_cache again with the same arguments: it "
                    "verifies every shard and rewrites the missing or bad ones."
                )
        expected = {
            "teacher": teacher,
            "tokenizer": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
            "max_length": max_length,
        }
        for key, value in expected.items():
            if value is not None and manifest.get(key) != value:
                raise ValueError(
                    f"the teacher cache in {path} was written with {key}={manifest.get(key)!r}, not {value!r}: "
                    "write a cache for this set-up."
                )
        return cls(path, manifest)

    def __len__(self) -> int:
        return self.manifest["num_examples"]

    def _stored(self, example: int) -> dict:
        """The row tensors of one dataset row as stored (packed or not)."""
        if not 0 <= example < len(self):
            raise IndexError(f"example {example} is outside the cache's {len(self)} examples.")
        shard = int(np.searchsorted(self._firsts, example, side="right")) - 1
        local = example - self._firsts[shard]
        start, stop = self._offsets[shard][local : local + 2].tolist()
        handle = self._handles[shard]
        return {name: handle.get_slice(name)[start:stop] for name in self.layout.row_tensors}

    def rows(self, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached rows of one dataset row: one per distilled position.

        Args:
            example: The row's index in the cached dataset (its ``sample_index``).

        Returns:
            ``(ids, log-probabilities)``, N×k each; a packed top-k row's log-probabilities hold exactly 1 − its
                stored remaining mass.

        Raises:
            IndexError: ``example`` lies outside the cache.
        """
        return self.layout.decode(self._stored(example))[:2]

    def check_compatible(self, *, student: nn.Module, train_dataset, tokenizer=None, losses=()) -> None:
        """Raise, saying what differs, unless the cache fits this student, training set, tokenizer and losses.

        Args:
            student: The student model.
            train_dataset: The training set (with ``sample_index``), or ``None`` to skip the row checks.
            tokenizer: The training tokenizer.
            losses: The configured losses (a sampled cache allows only those linear in the teacher, at τ = 1).

        Raises:
            ValueError: The student predicts other positions or another vocabulary, another tokenizer, a loss a
                sampled cache cannot serve, or a training row that is not the cached example at its index.
        """
        manifest = self.manifest
        if is_token_level(student) != manifest["token_level"] or (
            manifest["token_level"]
            and (
                is_causal_lm(student) != manifest["causal"]
                or labels_mark_distilled_positions(student) != manifest["positions_by_labels"]
            )
        ):
            raise ValueError(
                f"the cache was written by a {manifest['teacher_class']} (token level: {manifest['token_level']}), "
                f"which does not predict the same positions as a {type(unwrap(student)).__name__} student."
            )
        classes = output_size(student)
        classes = classes if classes is not None else getattr(student.config, "num_labels", None)
        if classes is not None and classes != self.vocab_size:
            raise ValueError(
                f"the cache holds distributions over {self.vocab_size} classes/tokens and the student predicts "
                f"{classes}: the teacher and student need the same vocabulary (or label set)."
            )
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint is not None and manifest["tokenizer"] is not None and fingerprint != manifest["tokenizer"]:
            raise ValueError(
                "the training tokenizer differs from the one the cache was written with: the cached rows belong "
                "to other token ids. Write the cache with this tokenizer."
            )
        if manifest["mode"] == "sampled":
            biased = [loss.name for loss in losses if not getattr(loss, "linear_in_teacher", False)]
            hot = [loss.name for loss in losses if getattr(loss, "temperature", 1.0) != 1.0]
            if biased or hot:
                raise ValueError(
                    "a sampled teacher cache estimates the teacher's probabilities without bias only for losses "
                    f"linear in them at temperature 1 (kl, soft_ce); not for {biased or hot}. Use those losses with "
                    "temperature=1, or a top_k cache."
                )
        if train_dataset is None:
            return
        if SAMPLE_INDEX not in getattr(train_dataset, "column_names", ()):
            raise ValueError(
                "a cached teacher finds each example's rows by its sample_index: add it with "
                "hf_kd.data.add_sample_index(train_dataset) (the dataset the cache was written from, same order)."
            )
        columns = [c for c in train_dataset.column_names if c in FINGERPRINT_COLUMNS or c == SAMPLE_INDEX]
        examples = train_dataset.select_columns(columns)
        for row in range(len(examples)):
            example = examples[row]
            index = int(example[SAMPLE_INDEX])
            if not 0 <= index < len(self) or self._fingerprint(index) != example_fingerprint(example):
                raise ValueError(
                    f"training row {row} (sample_index {index}) is not the example the cache holds at that index: "
                    "the data was tokenised differently (tokenizer, max_length, preprocessing) or reordered since "
                    f"the cache was written (max_length then: {manifest['max_length']}). Write the cache again."
                )

    def _fingerprint(self, example: int) -> int:
        shard = int(np.searchsorted(self._firsts, example, side="right")) - 1
        return int(self._handles[shard].get_slice("fingerprints")[example - self._firsts[shard]].item())

    def _batch_rows(self, sample_index: torch.Tensor | None, counts: list[int], device) -> tuple[torch.Tensor, ...]:
        """The rows of a batch's examples, unpacked on ``device``: the arguments of :meth:`_sparse`."""
        if sample_index is None:
            raise ValueError(
                "a cached teacher needs the sample_index column in every batch: add it with "
                "hf_kd.data.add_sample_index and keep it through the collator."
            )
        stored = []
        for example, count in zip(sample_index.tolist(), counts):
            rows = self._stored(int(example))
            if len(rows["ids"]) != count:
                raise ValueError(
                    f"example {example} has {count} distilled positions in this batch but {len(rows['ids'])} in "
                    "the cache: the batch was built differently from the cached data (labels, truncation)."
                )
            stored.append(rows)
        joined = {name: torch.cat([rows[name] for rows in stored]).to(device) for name in self.layout.row_tensors}
        return self.layout.decode(joined)

    def _sparse(self, ids: torch.Tensor, values: torch.Tensor, tails: torch.Tensor | None = None):
        # A sampled cache is the empirical distribution itself: nothing outside the draws.
        return sparse_rows(ids, values, self.vocab_size, spread_tail=self.manifest["mode"] == "top_k", tail=tails)

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        """The cached distributions of the batch's rows as ``sparse_logits`` (kl and soft_ce read them as they
        are; other losses get them dense).

        Args:
            inputs: The batch.
            needs: The features the losses need (``{"logits"}``).
            sample_index: Each row's index in the cached dataset.

        Returns:
            ``ModelFeatures(sparse_logits=...)``: B×k rows for classifiers, B×T×k for token-level teachers
                (positions that are not distilled hold the uniform distribution).

        Raises:
            ValueError: No ``sample_index``, or an example with another number of distilled positions than cached.
        """
        reference = inputs.get("input_ids", next(v for v in inputs.values() if torch.is_tensor(v)))
        device = reference.device
        mask = distillation_mask(
            inputs, self.manifest["token_level"], self.manifest["causal"], self.manifest["positions_by_labels"]
        )
        batch = reference.shape[0]
        if not self.manifest["token_level"]:
            return ModelFeatures(sparse_logits=self._sparse(*self._batch_rows(sample_index, [1] * batch, device)))
        length = reference.shape[1]
        if mask is None:
            mask = torch.ones(batch, length - int(self.manifest["causal"]), dtype=torch.bool, device=device)
        rows = self._sparse(*self._batch_rows(sample_index, mask.sum(-1).tolist(), device))
        return ModelFeatures(sparse_logits=sparse_batch(rows, mask, length))

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        """For chunked causal-LM KD (``chunk_size``): the cached rows of the positions ``mask`` marks.

        Args:
            inputs: The batch.
            mask: B×(T−1) supervised positions.
            sample_index: Each row's index in the cached dataset.

        Returns:
            ``(rows, to_logits)``: the N-row tensors (ids, log-probabilities and, for packed top-k rows, the
                remaining masses), and a function giving a slice's dense N×V log-probabilities.
        """
        rows = self._batch_rows(sample_index, mask.sum(-1).tolist(), mask.device)
        return rows, lambda *part: self._sparse(*part).dense()

    def describe(self) -> dict:
        """What the model card and ``distillation_config.json`` record of this teacher.

        Returns:
            The teacher's name, class and size as the cache recorded them, and the cache's settings (a packed
                cache also its format version and bits per log-probability; a top-k cache written by this version
                the KL divergence between the live and the replayed distribution).
        """
        settings = {key: self.manifest[key] for key in ("mode", "top_k", "dtype", "num_examples", "vocab_size")}
        if self.layout.packed:
            settings.update(format_version=PACKED_VERSION, log_prob_bits=self.manifest["log_prob_bits"])
        if self.manifest.get("replay_kl") is not None:
            settings["replay_kl"] = self.manifest["replay_kl"]
        return {
            "teacher": self.manifest["teacher"],
            "teacher_class": self.manifest["teacher_class"],
            "teacher_parameters": self.manifest["teacher_parameters"],
            "teacher_cache": settings,
        }
