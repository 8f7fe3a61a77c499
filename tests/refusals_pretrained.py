"""Refusals of hf_kd.pretrained: CTranslate2 files it cannot convert exactly, dtypes that are not floats, a packaged
model that is not installed. Each is refused before anything is written to the output folder."""

from __future__ import annotations

import torch
from refusal_cases import Case
from test_pretrained import write_ct2_model

from hf_kd.pretrained import convert_ctranslate2_whisper, export_gguf_model, packaged_path, read_ctranslate2_model


def _ct2(tmp_path, spec="WhisperSpec", version=6, extra=None):
    variables = {"decoder/embeddings/weight": torch.zeros(4, 2, dtype=torch.float16), **(extra or {})}
    return write_ct2_model(tmp_path / "ct2" / "model.bin", spec, variables, version=version).parent


def _truncated(tmp_path):
    path = _ct2(tmp_path) / "model.bin"
    path.write_bytes(path.read_bytes()[:-9])
    return read_ctranslate2_model(path)


CASES = [
    Case(
        "ct2-binary-version",
        "`read_ctranslate2_model` on a `model.bin` of an older binary version (5)",
        lambda p: read_ctranslate2_model(_ct2(p, version=5)),
        ValueError,
        "is CTranslate2 binary format version 5; this reader knows version 6",
    ),
    Case(
        "ct2-truncated",
        "`read_ctranslate2_model` on a cut-off `model.bin`",
        _truncated,
        ValueError,
        "inside a field (truncated download?)",
    ),
    Case(
        "ct2-not-whisper",
        "`convert_ctranslate2_whisper` on a CTranslate2 translation model (TransformerSpec)",
        lambda p: convert_ctranslate2_whisper(_ct2(p, spec="TransformerSpec"), p / "out"),
        ValueError,
        "is a TransformerSpec, not a WhisperSpec",
    ),
    Case(
        "ct2-quantised",
        "`convert_ctranslate2_whisper` on an int8-quantised CTranslate2 Whisper",
        lambda p: convert_ctranslate2_whisper(_ct2(p, extra={"encoder/conv1/weight_scale": torch.ones(2)}), p / "out"),
        ValueError,
        "the CTranslate2 model's weights are quantised",
    ),
    Case(
        "ct2-dtype",
        "`convert_ctranslate2_whisper(..., dtype=torch.int8)`",
        lambda p: convert_ctranslate2_whisper(_ct2(p), p / "out", dtype=torch.int8),
        ValueError,
        "dtype must be one of torch.float32, torch.float16, torch.bfloat16",
    ),
    Case(
        "gguf-dtype",
        "`export_gguf_model(..., dtype=torch.int8)`",
        lambda p: export_gguf_model(p / "model.gguf", p / "out", dtype=torch.int8),
        ValueError,
        "dtype must be one of torch.float32, torch.bfloat16, torch.float16",
    ),
    Case(
        "packaged-missing",
        "a packaged model whose package is not installed",
        lambda p: packaged_path("hf-kd-no-such-package", "no_such_package/model.bin"),
        ModuleNotFoundError,
        "is not installed (or has no no_such_package/model.bin): run `make install`",
    ),
]
