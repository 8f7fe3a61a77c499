"""How a teacher cache's shards store their rows: the unpacked layout (format version 2) and the packed one (3).

A row is one distilled position: ``k`` vocabulary ids and what the teacher gave them.

- **Unpacked** (version 2): ``ids`` int32 N×k and ``logprobs`` N×k at a float dtype (float16 by default): 6 bytes
  per entry, 384 B per position at k = 64. The remaining mass is what the kept entries leave.
- **Packed** (version 3): ``ids`` as ⌈log₂ V⌉-bit fields, each row's fields packed into whole bytes. A top-k row's
  log-probabilities become ``log_prob_bits``-bit codes of their distance below the row's largest one, in steps of
  the row's ``step`` (float16, rounded up so that the smallest kept value is the last finite code); the last code
  stands for probability 0. The remaining mass ``tail`` is stored as it was (float32), and on reading the kept
  entries are scaled to hold exactly 1 − tail. A sampled row stores its draw counts exactly, in ⌈log₂(k + 1)⌉ bits.
  At k = 64, 8 bits and V = 49,152: 128 + 64 + 6 = 198 B per position.

The packed top-k row's error is bounded per row by its step s. Every kept log-probability lies within s of the
float32 one it was written from (their distances below the largest are rounded by at most s/2, and the
normalisation moves all of them by at most s/2 more), and the remaining mass is the same, so the log-ratio r = log p
− log q of the float32 distribution p and the packed one q spans at most s, and KL(p ‖ q) ≤ KL(p ‖ q) + KL(q ‖ p) =
Σ (p − q) r ≤ s · TV(p, q) ≤ s · √(KL(p ‖ q) / 2) (Pinsker): KL(p ‖ q) ≤ s²/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The unpacked layout keeps today's (version 2) files; the packed layout is version 3.
UNPACKED_VERSION = 2
PACKED_VERSION = 3
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LOG_PROB_BITS = range(2, 17)
# Tensors of a shard besides its rows: where each example's rows start, and each example's fingerprint.
EXAMPLE_TENSORS = ("offsets", "fingerprints")


def shard_tensors(packed: bool, mode: str) -> tuple[str, ...]:
    """The tensors a shard of a layout holds: its row tensors, then ``offsets`` and ``fingerprints``.

    Args:
        packed: The packed layout (format version 3), else the unpacked one (2).
        mode: ``"top_k"`` or ``"sampled"``.

    Returns:
        The tensor names.
    """
    if not packed:
        rows = ("ids", "logprobs")
    else:
        rows = ("ids", "codes", "steps", "tails") if mode == "top_k" else ("ids", "counts")
    return (*rows, *EXAMPLE_TENSORS)


def bits_for(count: int) -> int:
    """⌈log₂ count⌉ (at least 1): the width of a field that holds the numbers 0 … count − 1.

    Args:
        count: How many different values the field holds (≥ 1).

    Returns:
        The number of bits.
    """
    return max(1, (count - 1).bit_length())


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Each row of non-negative integers as ``width``-bit fields, least significant bit first, in whole bytes.

    Args:
        values: N×k integers in [0, 2^width).
        width: Bits per value (1 to 57).

    Returns:
        uint8 N×⌈k·width/8⌉: value j of a row occupies bits j·width … (j + 1)·width − 1 of the row's bytes.

    Raises:
        ValueError: a value outside [0, 2^width).
    """
    values = values.long()
    if values.numel() and (values.min() < 0 or values.max() >= 1 << width):
        raise ValueError(f"values from {values.min()} to {values.max()} do not fit {width}-bit fields.")
    rows, count = values.shape
    size = -(-count * width // 8)
    bits = (values.unsqueeze(-1) >> torch.arange(width, device=values.device)) & 1
    bits = F.pad(bits.reshape(rows, count * width), (0, size * 8 - count * width))
    weights = 1 << torch.arange(8, device=values.device)
    return (bits.reshape(rows, size, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`.

    Args:
        packed: uint8 N×⌈count·width/8⌉.
        count: Values per row.
        width: Bits per value (1 to 57).

    Returns:
        int64 N×count.
    """
    # Every 8 values fill exactly ``width`` bytes, so value j of each such group sits at the same bit offset j·width:
    # one strided slice per byte it touches, for all groups and rows at once (no gather).
    rows, groups = packed.shape[0], -(-count // 8)
    grouped = F.pad(packed, (0, groups * width - packed.shape[1])).reshape(rows, groups, width)
    if width % 8 == 0:  # whole bytes: each value's bytes side by side, least significant first
        grouped = grouped.reshape(rows, groups * 8, width // 8)
        values = grouped[..., 0].long()
        for byte in range(1, width // 8):
            values |= grouped[..., byte].long() << (8 * byte)
        return values[:, :count]
    values = torch.empty(rows, groups, 8, dtype=torch.long, device=packed.device)
    for j in range(8):
        first, shift = (j * width) >> 3, (j * width) & 7
        value = grouped[..., first].long()
        for byte in range(1, (shift + width + 7) // 8):
            value |= grouped[..., first + byte].long() << (8 * byte)
        values[..., j] = (value >> shift) & ((1 << width) - 1)
    return values.reshape(rows, groups * 8)[:, :count]


def quantize_log_probs(logprobs: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``bits``-bit codes of log-probabilities: code c stands for (row's largest) − c · step, the last code
    for probability 0 (−inf).

    Args:
        logprobs: N×k log-probabilities (−inf allowed).
        bits: Bits per code (2 to 16).

    Returns:
        ``(codes, steps)``: int64 N×k codes and each row's step as float16, the smallest float16 at least
            (largest − smallest finite) / (2^bits − 2), so every finite value gets a finite code.

    Raises:
        ValueError: a row whose finite values span more than float16 steps can reach.
    """
    levels = (1 << bits) - 2  # finite codes 0 … levels; levels + 1 is probability 0
    logprobs = logprobs.float()
    finite = torch.isfinite(logprobs)
    largest = logprobs.masked_fill(~finite, -math.inf).amax(-1, keepdim=True)
    below = torch.where(finite, largest - logprobs, torch.zeros_like(logprobs))
    spread = below.amax(-1) if below.shape[-1] else below.new_zeros(below.shape[0])
    exact = spread / levels
    steps = exact.to(torch.float16)
    short = steps.float() < exact  # rounded down: one float16 up
    steps = torch.where(short, torch.nextafter(steps, torch.full_like(steps, math.inf)), steps)
    if not torch.isfinite(steps).all():
        raise ValueError(
            f"a row's log-probabilities span {spread.max().item():.4g} nats, beyond what {bits}-bit codes with a "
            "float16 step reach: write with more log_prob_bits, or unpacked."
        )
    step = steps.float()[:, None]
    codes = torch.where(step > 0, torch.round(below / step.clamp(min=torch.finfo(torch.float32).tiny)), 0.0)
    codes = torch.where(finite, codes.clamp(0, levels), float(levels + 1))
    return codes.long(), steps


def dequantize_log_probs(codes: torch.Tensor, steps: torch.Tensor, tails: torch.Tensor, bits: int) -> torch.Tensor:
    """Log-probabilities from :func:`quantize_log_probs`'s codes, scaled so that each row holds 1 − tail.

    Args:
        codes: int64 N×k codes.
        steps: Each row's step (float16 or wider).
        tails: Each row's remaining mass, outside its k entries.
        bits: Bits per code.

    Returns:
        float32 N×k log-probabilities.
    """
    relative = -codes.float() * steps.float()[:, None]
    relative = relative.masked_fill(codes == (1 << bits) - 1, -math.inf)
    total = relative.exp().sum(-1, keepdim=True).log()  # no overflow: the largest is 0 (code 0), the rest below
    kept = torch.log1p(-tails.float().clamp(0, 1))[:, None]
    return torch.where(torch.isfinite(total), relative - total + kept, relative)


@dataclass(frozen=True)
class RowLayout:
    """How one cache's shards hold their rows.

    Args:
        mode: ``"top_k"`` or ``"sampled"``.
        top_k: k: ids kept per row, or draws per row (sampled).
        vocab_size: V.
        dtype: The unpacked layout's value dtype name (``None``: packed).
        log_prob_bits: The packed top-k layout's bits per log-probability (``None``: unpacked, or sampled).
    """

    mode: str
    top_k: int
    vocab_size: int
    dtype: str | None = None
    log_prob_bits: int | None = None

    @property
    def packed(self) -> bool:
        """Whether this is the packed layout (format version 3)."""
        return self.dtype is None

    @property
    def version(self) -> int:
        """The cache format version of this layout."""
        return PACKED_VERSION if self.packed else UNPACKED_VERSION

    @property
    def row_tensors(self) -> tuple[str, ...]:
        """The names of a shard's tensors that hold rows (one entry per row along their first dimension)."""
        return shard_tensors(self.packed, self.mode)[: -len(EXAMPLE_TENSORS)]

    @property
    def id_bits(self) -> int:
        """Bits per packed id: ⌈log₂ V⌉."""
        return bits_for(self.vocab_size)

    @property
    def columns(self) -> int:
        """Entries per row: k, at most V (a sampled row keeps each drawn id once)."""
        return min(self.top_k, self.vocab_size)

    @property
    def count_bits(self) -> int:
        """Bits per packed draw count (sampled rows): ⌈log₂(k + 1)⌉ for counts 0 … k."""
        return bits_for(self.top_k + 1)

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor, tails: torch.Tensor | None) -> dict:
        """A batch of rows as this layout stores them.

        Args:
            ids: N×k vocabulary ids.
            logprobs: N×k log-probabilities (sampled: log(count / k), −inf for an id not drawn).
            tails: Each row's remaining mass (packed top-k rows store it; else unused).

        Returns:
            The row tensors by name (see :attr:`row_tensors`), on the CPU.
        """
        ids, logprobs = ids.cpu(), logprobs.cpu()
        if not self.packed:
            return {"ids": ids.to(torch.int32), "logprobs": logprobs.to(VALUE_DTYPES[self.dtype])}
        packed = {"ids": pack_bits(ids, self.id_bits)}
        if self.mode == "sampled":
            counts = torch.round(logprobs.float().exp() * self.top_k)
            return {**packed, "counts": pack_bits(counts, self.count_bits)}
        codes, steps = quantize_log_probs(logprobs, self.log_prob_bits)
        return {**packed, "codes": pack_bits(codes, self.log_prob_bits), "steps": steps, "tails": tails.cpu().float()}

    def decode(self, stored: dict) -> tuple[torch.Tensor, ...]:
        """Rows back from :meth:`encode`'s tensors (or slices of them).

        Args:
            stored: The row tensors by name.

        Returns:
            ``(ids, logprobs)`` (int64 and float32 or the stored dtype), and for packed top-k rows ``tails`` too:
                the arguments of :func:`~hf_kd.teachers.precomputed.sparse_rows` but ``vocab_size``.
        """
        if not self.packed:
            return stored["ids"].long(), stored["logprobs"]
        ids = unpack_bits(stored["ids"], self.columns, self.id_bits)
        if self.mode == "sampled":
            counts = unpack_bits(stored["counts"], self.columns, self.count_bits)
            return ids, torch.log(counts.float() / self.top_k)
        codes = unpack_bits(stored["codes"], self.columns, self.log_prob_bits)
        tails = stored["tails"].float()
        return ids, dequantize_log_probs(codes, stored["steps"], tails, self.log_prob_bits), tails


def layout_of(manifest: dict) -> RowLayout:
    """The row layout a cache's manifest describes.

    Args:
        manifest: The manifest's fields (``format_version``, ``mode``, ``top_k``, ``vocab_size``, ``dtype``,
            ``log_prob_bits``).

    Returns:
        The layout of its shards (a :class:`RowLayout`).
    """
    vocab_size = manifest.get("vocab_size") or 1
    packed = manifest["format_version"] == PACKED_VERSION
    return RowLayout(
        mode=manifest["mode"],
        top_k=manifest["top_k"],
        vocab_size=vocab_size,
        dtype=None if packed else manifest["dtype"],
        log_prob_bits=manifest.get("log_prob_bits") if packed else None,
    )
