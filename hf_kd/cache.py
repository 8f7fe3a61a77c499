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
entry per shard with its sha256) and ``shard-NNNNN.safetensors`` files (``ids`` int32 N×k, ``logprobs`` N×k,
``offsets`` per example, ``fingerprints`` per example). No pickle. Writing again over an existing cache verifies
every shard it lists (present, checksum, readable) and rewrites the missing or bad ones, then the rest; loading
checks the version and checksums, and the trainer checks the examples, tokenizer and vocabulary against the
cache, with errors that say what differs.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, default_data_collator

from .data import SAMPLE_INDEX
from .evaluation import count_parameters
from .features import ModelFeatures, SparseDistribution
from .model_kinds import is_causal_lm, is_token_level, labels_mark_distilled_positions, output_size
from .positions import distillation_mask
from .teachers import LiveTeacher, ServedTeacher, TeacherSource, unwrap
from .teachers.precomputed import sparse_batch, sparse_rows

# 2: attention_mask and token_type_ids joined the fingerprints; token classifiers distil every attended token.
CACHE_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
MODES = ("top_k", "sampled")
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
_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def example_fingerprint(example: dict) -> int:
    """A 63-bit hash of an example's token ids / labels / pixels: a cache row belongs to exactly this example."""
    digest = hashlib.blake2b(digest_size=8)
    for column in FINGERPRINT_COLUMNS:
        if column in example and example[column] is not None:
            array = np.asarray(example[column])
            digest.update(column.encode())
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array, dtype=np.float64 if array.dtype.kind == "f" else np.int64))
    return int.from_bytes(digest.digest(), "little") >> 1  # fits an int64


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A digest of a tokenizer's vocabulary and special tokens (``None`` without a tokenizer)."""
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
    dtype: str = "float16",
    token_level: bool | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> TeacherCache:
    """Run ``teacher`` once over ``dataset`` (tokenised, in its row order) and write its outputs to ``path``.

    ``top_k`` is k (ids kept per position, or draws per position in ``sampled`` mode). ``data_collator``
    batches rows as in training (default: padding with ``tokenizer`` — per-token labels with -100 —, else
    ``default_data_collator``).
    ``tokenizer`` and ``max_length`` are recorded so a mismatch at training time is caught. Rerunning with the
    same arguments resumes: every shard already listed is verified (present, checksum, readable) and the missing
    or bad ones are rewritten with the rest, so a repaired cache equals an unbroken run's. Different arguments on
    an existing cache raise. ``teacher`` may be a :class:`~hf_kd.teachers.ServedTeacher` (a causal LM answered by an
    inference engine): its top-k answers are written as they come (``top_k`` at most its own), and a server that
    stops answering leaves the shards written so far for the rerun.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if top_k <= 0:
        raise ValueError(f"top_k must be a positive number of entries per position, got {top_k}.")
    if dtype not in _VALUE_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_VALUE_DTYPES)}, got {dtype!r}.")
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be > 0, got {shard_size} and {batch_size}.")
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

    columns = [c for c in dataset.column_names if c != SAMPLE_INDEX] if hasattr(dataset, "column_names") else None
    rows = dataset.select_columns(columns) if columns is not None else dataset
    fingerprints = [example_fingerprint(rows[index]) for index in range(len(rows))]
    manifest = {
        "format_version": CACHE_FORMAT_VERSION,
        "mode": mode,
        "top_k": top_k,
        "dtype": dtype,
        "seed": seed,
        "token_level": token_level,
        "causal": shift,
        "positions_by_labels": by_labels,
        **described,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "num_examples": len(rows),
        "examples": hashlib.sha256(np.asarray(fingerprints, dtype=np.int64).tobytes()).hexdigest()[:16],
        "shard_size": shard_size,
    }
    os.makedirs(path, exist_ok=True)
    manifest_path = os.path.join(path, MANIFEST_NAME)
    shards: list[dict] = []
    existing: dict = {}
    if os.path.exists(manifest_path):
        with open(manifest_path) as handle:
            existing = json.load(handle)
        shards = existing.pop("shards", [])
        written = {key: value for key, value in existing.items() if key != "vocab_size"}
        differing = sorted(key for key in manifest.keys() | written.keys() if manifest.get(key) != written.get(key))
        if differing:
            raise ValueError(
                f"{path} already holds a teacher cache written with different {differing}; resume with the same "
                "teacher, data and settings, or write to an empty folder."
            )
    shards = [shard for shard in shards if _shard_problem(path, shard) is None]  # the others are written again
    vocab_size = existing.get("vocab_size") if shards else None
    done = {shard["first"] for shard in shards}
    live = None if served is not None else LiveTeacher(teacher)
    resume = "The shards written before it are kept: rerun write_teacher_cache with the same arguments to go on."
    generator = torch.Generator(device="cpu").manual_seed(seed)
    num_shards = -(-len(rows) // shard_size)
    bar = tqdm(total=len(rows), desc="teacher cache", unit="ex", disable=not progress)
    for shard_index in range(num_shards):
        first = shard_index * shard_size
        count = min(shard_size, len(rows) - first)
        if first in done:
            generator.manual_seed(seed + shard_index + 1)
            bar.update(count)
            continue
        generator.manual_seed(seed + shard_index)  # a resumed shard draws the same samples as an unbroken run
        ids, values, per_example = [], [], []
        for start in range(first, first + count, batch_size):
            stop = min(start + batch_size, first + count)
            batch = data_collator([rows[index] for index in range(start, stop)])
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
                ids.append(answered.ids[:, :top_k].to("cpu", torch.int32))
                values.append(answered.logprobs[:, :top_k].to("cpu", _VALUE_DTYPES[dtype]))
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
            batch_ids, batch_values = _sparsify(positions, top_k, mode, generator)
            ids.append(batch_ids.to("cpu", torch.int32))
            values.append(batch_values.to("cpu", _VALUE_DTYPES[dtype]))
            bar.update(stop - start)
        name = f"shard-{shard_index:05d}.safetensors"
        file = os.path.join(path, name)  # os.replace below replaces a link at that name, never writes through it
        offsets = np.concatenate([[0], np.cumsum(per_example)]).astype(np.int64)
        _remove_leftover(file + ".tmp")
        save_file(
            {
                "ids": torch.cat(ids).contiguous(),
                "logprobs": torch.cat(values).contiguous(),
                "offsets": torch.from_numpy(offsets),
                "fingerprints": torch.tensor(fingerprints[first : first + count], dtype=torch.int64),
            },
            file + ".tmp",
        )
        os.replace(file + ".tmp", file)
        shards = [shard for shard in shards if shard["first"] != first]
        shards.append({"file": name, "first": first, "count": count, "sha256": _sha256(file)})
        _write_json(manifest_path, {**manifest, "vocab_size": vocab_size, "shards": sorted(shards, key=_first)})
    bar.close()
    _write_json(manifest_path, {**manifest, "vocab_size": vocab_size, "shards": sorted(shards, key=_first)})
    return TeacherCache.load(path)


def shard_file(path: str, shard: dict) -> str:
    """The file of the manifest entry ``shard``, confined to the cache folder ``path``: a relative name without
    ``..`` that does not resolve, through links, outside the folder — else a ``ValueError`` naming the entry (a
    manifest is data: it must not make a load read, or a repair trust, a file elsewhere)."""
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


def _shard_problem(path: str, shard: dict) -> str | None:
    """Why a listed shard cannot be used (missing, checksum, unreadable), or ``None`` when it is sound; a shard
    outside the cache folder raises (:func:`shard_file`)."""
    file = shard_file(path, shard)
    if not os.path.exists(file):
        return "is missing"
    if _sha256(file) != shard["sha256"]:
        return "does not match its checksum (corrupt or changed)"
    try:
        with safe_open(file, "pt") as handle:
            missing = {"ids", "logprobs", "offsets", "fingerprints"} - set(handle.keys())
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
    """Full N×V log-probabilities from cached rows (see :func:`sparse_rows`)."""
    return sparse_rows(ids, logprobs, vocab_size, spread_tail).dense()


class TeacherCache(TeacherSource):
    """A teacher replayed from :func:`write_teacher_cache` output: pass it as ``teacher_model=`` to
    :class:`~hf_kd.DistillationTrainer`. The training set must be the cached dataset with a ``sample_index``
    column (:func:`hf_kd.data.add_sample_index`), which keys each batch row to its cached rows. Only logit losses
    can be replayed; evaluation reports the student's label loss (the cache covers the training data only)."""

    provides = frozenset({"logits"})
    covers_eval = False

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.model = None
        self.vocab_size = manifest["vocab_size"]
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
        """Open a cache; checks its format version, completeness, shard checksums and, when given, that it was
        written by ``teacher`` (name or path), with ``tokenizer`` and ``max_length``."""
        manifest_path = os.path.join(path, MANIFEST_NAME)
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"{path} is not a teacher cache (no {MANIFEST_NAME}); write one first.")
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        version = manifest.get("format_version")
        if version != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"{path} is a teacher cache of format version {version}; this hf_kd reads version "
                f"{CACHE_FORMAT_VERSION}. Write the cache again with this version."
            )
        cached = sum(shard["count"] for shard in manifest["shards"])
        if cached != manifest["num_examples"]:
            raise ValueError(
                f"{path} is incomplete: {cached} of {manifest['num_examples']} examples were written. Run "
                "write_teacher_cache again with the same arguments to resume."
            )
        for shard in manifest["shards"]:
            problem = _shard_problem(path, shard) if verify_checksums else None
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

    def rows(self, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ``(ids, log-probabilities)`` of one dataset row: one row per distilled position."""
        if not 0 <= example < len(self):
            raise IndexError(f"example {example} is outside the cache's {len(self)} examples.")
        shard = int(np.searchsorted(self._firsts, example, side="right")) - 1
        local = example - self._firsts[shard]
        start, stop = self._offsets[shard][local : local + 2].tolist()
        handle = self._handles[shard]
        return handle.get_slice("ids")[start:stop], handle.get_slice("logprobs")[start:stop]

    def check_compatible(self, *, student: nn.Module, train_dataset, tokenizer=None, losses=()) -> None:
        """Raise, saying what differs, unless the cache fits this student, training set, tokenizer and losses."""
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

    def _batch_rows(self, sample_index: torch.Tensor | None, counts: list[int]):
        if sample_index is None:
            raise ValueError(
                "a cached teacher needs the sample_index column in every batch: add it with "
                "hf_kd.data.add_sample_index and keep it through the collator."
            )
        ids, values = [], []
        for example, count in zip(sample_index.tolist(), counts):
            example_ids, example_values = self.rows(int(example))
            if len(example_ids) != count:
                raise ValueError(
                    f"example {example} has {count} distilled positions in this batch but {len(example_ids)} in "
                    "the cache: the batch was built differently from the cached data (labels, truncation)."
                )
            ids.append(example_ids)
            values.append(example_values)
        return torch.cat(ids), torch.cat(values)

    def _sparse(self, ids: torch.Tensor, values: torch.Tensor) -> SparseDistribution:
        # A sampled cache is the empirical distribution itself: nothing outside the draws.
        return sparse_rows(ids, values, self.vocab_size, spread_tail=self.manifest["mode"] == "top_k")

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        """The cached distributions of the batch's rows as ``sparse_logits`` (kl and soft_ce read them as they
        are; other losses get them dense)."""
        reference = inputs.get("input_ids", next(v for v in inputs.values() if torch.is_tensor(v)))
        device = reference.device
        mask = distillation_mask(
            inputs, self.manifest["token_level"], self.manifest["causal"], self.manifest["positions_by_labels"]
        )
        batch = reference.shape[0]
        if not self.manifest["token_level"]:
            ids, values = self._batch_rows(sample_index, [1] * batch)
            return ModelFeatures(sparse_logits=self._sparse(ids.to(device), values.to(device)))
        length = reference.shape[1]
        if mask is None:
            mask = torch.ones(batch, length - int(self.manifest["causal"]), dtype=torch.bool, device=device)
        ids, values = self._batch_rows(sample_index, mask.sum(-1).tolist())
        return ModelFeatures(sparse_logits=sparse_batch(self._sparse(ids.to(device), values.to(device)), mask, length))

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        ids, values = self._batch_rows(sample_index, mask.sum(-1).tolist())
        return (ids.to(mask.device), values.to(mask.device)), lambda i, v: self._sparse(i, v).dense()

    def describe(self) -> dict:
        return {
            "teacher": self.manifest["teacher"],
            "teacher_class": self.manifest["teacher_class"],
            "teacher_parameters": self.manifest["teacher_parameters"],
            "teacher_cache": {
                key: self.manifest[key] for key in ("mode", "top_k", "dtype", "num_examples", "vocab_size")
            },
        }
