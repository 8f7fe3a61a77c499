"""The offline teacher cache's options for the packed layout (format version 3), the versions it reads, and a write
shared by the processes of a launch."""

from __future__ import annotations

import json
import os

from conftest import ROOT, lm_data, run_two_processes, tiny_gpt2
from refusal_cases import Case

from hf_kd.cache import MANIFEST_NAME, TeacherCache, write_teacher_cache


def _write(tmp_path, **options):
    return write_teacher_cache(tiny_gpt2(seed=1), lm_data(n=4), str(tmp_path / "out"), top_k=4, **options)


def _load_version(tmp_path, version):
    folder = tmp_path / "cache"
    write_teacher_cache(tiny_gpt2(seed=1), lm_data(n=4), str(folder), top_k=4, packed=True, progress=False)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": version}))
    return TeacherCache.load(str(folder))


def _processes_disagree(tmp_path):
    """Two processes of one launch call the writer with different top_k; both raise, and say the same."""
    run_two_processes(os.path.join(ROOT, "tests", "distributed", "cache_worker.py"), tmp_path, "mismatch", timeout=300)
    messages = {(tmp_path / f"refusal-{rank}.txt").read_text() for rank in (0, 1)}
    assert len(messages) == 1, messages
    raise ValueError(messages.pop())


CASES = [
    Case(
        "cache-packed-with-dtype",
        '`write_teacher_cache(..., packed=True, dtype="float32")`',
        lambda p: _write(p, packed=True, dtype="float32"),
        ValueError,
        "is the value type of the unpacked layout; a packed cache stores each top-k log-probability as a "
        "log_prob_bits-bit code",
    ),
    Case(
        "cache-bits-without-packed",
        "`write_teacher_cache(..., log_prob_bits=4)` (unpacked)",
        lambda p: _write(p, log_prob_bits=4),
        ValueError,
        "log_prob_bits=4 sets the packed layout's codes: pass packed=True with it",
    ),
    Case(
        "cache-one-bit",
        "`write_teacher_cache(..., packed=True, log_prob_bits=1)`",
        lambda p: _write(p, packed=True, log_prob_bits=1),
        ValueError,
        "log_prob_bits must be a whole number of bits from 2 to 16, got 1",
    ),
    Case(
        "cache-32-bits",
        "`write_teacher_cache(..., packed=True, log_prob_bits=32)`",
        lambda p: _write(p, packed=True, log_prob_bits=32),
        ValueError,
        "log_prob_bits must be a whole number of bits from 2 to 16, got 32",
    ),
    Case(
        "cache-sampled-bits",
        '`write_teacher_cache(..., mode="sampled", packed=True, log_prob_bits=8)`',
        lambda p: _write(p, mode="sampled", packed=True, log_prob_bits=8),
        ValueError,
        "a packed sampled cache stores each id's draw count exactly",
    ),
    Case(
        "cache-packed-not-bool",
        '`write_teacher_cache(..., packed="yes")`',
        lambda p: _write(p, packed="yes"),
        TypeError,
        "packed must be True or False, got 'yes'",
    ),
    Case(
        "cache-unknown-version",
        "`TeacherCache.load` of a cache of a later format version (4)",
        lambda p: _load_version(p, 4),
        ValueError,
        "is a teacher cache of format version 4; this hf_kd reads versions 2 (unpacked) and 3 (packed)",
    ),
    Case(
        "cache-processes-disagree",
        "`write_teacher_cache` under `torchrun` with 2 processes that pass different `top_k`",
        _processes_disagree,
        ValueError,
        "write_teacher_cache was called with different ['top_k'] in the processes of this launch",
    ),
]
