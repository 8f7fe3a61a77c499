"""GGUF language models (llama.cpp's format) dequantised into a plain transformers folder.

transformers reads a GGUF file with ``from_pretrained(folder, gguf_file=NAME)`` and dequantises it on every load
(~17 s for SmolLM2-135M on 2 cores), but will not ``save_pretrained`` the result: the model carries the GGUF
quantization config. Rebuilding the same architecture from the config without it and moving the weights over gives a
model that saves as ordinary safetensors, which every later load reads in about a second.
"""

from __future__ import annotations

import os

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def export_gguf_model(
    gguf_path: str | os.PathLike, folder: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> str:
    """Dequantise a GGUF causal language model and write it, with its tokenizer, as a transformers folder.

    float32 by default: a 4-bit (Q4_1) or 8-bit (Q8_0) GGUF weight is a float16 scale times a small integer plus a
    float16 offset, which float32 holds exactly, so the folder is the GGUF model itself; bfloat16 rounds every
    weight a second time (to 8 significant bits) for half the disk. A teacher kept in float32 on disk can still run
    in bfloat16 (``from_pretrained(folder, dtype=torch.bfloat16)``) where that is faster.

    Args:
        gguf_path: The ``.gguf`` file.
        folder: Where to write the transformers folder (created): ``config.json``, ``generation_config.json``,
            ``model.safetensors`` and the tokenizer (with its chat template).
        dtype: The weights' dtype in the folder: torch.float32, torch.bfloat16 or torch.float16.

    Returns:
        ``folder``, as a string.

    Raises:
        FileNotFoundError: When ``gguf_path`` is not a file.
        ValueError: When ``dtype`` is not a float dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16, got {dtype}")
    gguf_path, folder = os.fspath(gguf_path), os.fspath(folder)
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    source_dir, name = os.path.split(os.path.abspath(gguf_path))
    quantised = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
    settings = quantised.config.to_dict()
    settings.pop("quantization_config", None)
    settings["dtype"] = str(dtype).removeprefix("torch.")
    config = type(quantised.config).from_dict(settings)
    # Built on the CPU, not the meta device: buffers outside the state dict (rotary frequencies) are computed here.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({key: value.to(dtype) for key, value in quantised.state_dict().items()})
    model.tie_weights()
    model.generation_config = quantised.generation_config
    del quantised
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source_dir, gguf_file=name).save_pretrained(folder)
    return folder
