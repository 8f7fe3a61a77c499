"""Whisper models in CTranslate2's format (faster-whisper's) back to a transformers ``WhisperForConditionalGeneration``.

CTranslate2 stores a model as one ``model.bin``: a header (binary version, spec name, spec revision), then every
variable as (name, shape, dtype, bytes), then aliases (one name standing for another, e.g. the output projection tied
to the token embeddings). Its Whisper layout differs from transformers' in one way that matters: a self-attention
keeps q, k and v as one packed ``linear_0`` of 3·d rows (a cross-attention: q as ``linear_0``, k and v packed as
``linear_1``), and k's missing bias is stored as zeros. Everything else is a renaming.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field

import torch

SUPPORTED_BINARY_VERSION = 6  # what CTranslate2 3.x-4.x write (CURRENT_BINARY_VERSION in ctranslate2/specs)

# CTranslate2's DataType enum order (include/ctranslate2/types.h); quantised int8/int16 weights carry scales that
# cannot be undone exactly, so only the float types are converted.
_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class CTranslate2Model:
    """The contents of a CTranslate2 ``model.bin``.

    Attributes:
        binary_version: The file format's version (6 for CTranslate2 3.x and 4.x).
        spec: The model specification's name, e.g. ``"WhisperSpec"``.
        revision: The specification's revision.
        variables: Every stored variable by its name (``encoder/layer_0/self_attention/linear_0/weight``), as tensors
            of the stored dtype; scalars have shape ``()``.
        aliases: Names that stand for another variable (``decoder/projection/weight`` → the token embeddings when
            the output projection is tied).
    """

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.variables[self.aliases.get(name, name)]


def read_ctranslate2_model(path: str | os.PathLike) -> CTranslate2Model:
    """Read a CTranslate2 ``model.bin`` (or the folder holding it) without CTranslate2 installed.

    Args:
        path: The ``model.bin`` file or its folder.

    Returns:
        The header, every variable as a tensor of its stored dtype, and the aliases.

    Raises:
        FileNotFoundError: When there is no ``model.bin`` at ``path``.
        ValueError: When the file is not CTranslate2's binary format version 6, or ends early.
    """
    path = os.path.join(path, "model.bin") if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no CTranslate2 model at {path} (a folder with model.bin, or the model.bin file)")
    with open(path, "rb") as handle:
        data = handle.read()
    reader = _Reader(data, path)
    version = reader.unpack("I")
    if version != SUPPORTED_BINARY_VERSION:
        raise ValueError(
            f"{path} is CTranslate2 binary format version {version}; this reader knows version "
            f"{SUPPORTED_BINARY_VERSION} (CTranslate2 3.x and 4.x): re-convert the model with a current CTranslate2"
        )
    model = CTranslate2Model(binary_version=version, spec=reader.string(), revision=reader.unpack("I"))
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        dtype_id = reader.unpack("B")
        if dtype_id not in _DTYPES:
            raise ValueError(f"{path}: variable {name!r} has an unknown CTranslate2 dtype id {dtype_id}")
        raw = reader.take(reader.unpack("I"))
        # Copy out of the file's bytes: the tensors outlive them and must be writable.
        model.variables[name] = torch.frombuffer(bytearray(raw), dtype=_DTYPES[dtype_id]).reshape(shape)
    for _ in range(reader.unpack("I")):
        alias = reader.string()
        model.aliases[alias] = reader.string()
    return model


class _Reader:
    """Little-endian fields of CTranslate2's format, with a clear error when the file ends early."""

    def __init__(self, data: bytes, path: str):
        self.data, self.path, self.offset = data, path, 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ValueError(f"{self.path} ends at byte {len(self.data)}, inside a field (truncated download?)")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("H"))[:-1].decode("utf-8")  # the length counts a trailing NUL


def _layer_count(model: CTranslate2Model, stack: str) -> int:
    indices = {int(match.group(1)) for name in model.variables if (match := re.match(rf"{stack}/layer_(\d+)/", name))}
    return len(indices)


def whisper_state_dict(model: CTranslate2Model) -> dict[str, torch.Tensor]:
    """``WhisperForConditionalGeneration``'s state dict from a CTranslate2 WhisperSpec, in the stored dtype.

    Args:
        model: A CTranslate2 Whisper model (:func:`read_ctranslate2_model`).

    Returns:
        The weights under transformers' names (``model.encoder.layers.0.self_attn.q_proj.weight``, ...);
            ``proj_out.weight`` is included only when the CTranslate2 model does not tie it to the token embeddings.

    Raises:
        ValueError: When the model is not a WhisperSpec, or holds quantised (int8/int16) weights.
    """
    if model.spec != "WhisperSpec":
        raise ValueError(f"the CTranslate2 model is a {model.spec}, not a WhisperSpec (a Whisper model)")
    quantised = sorted(name for name, value in model.variables.items() if name.endswith("weight_scale"))
    if quantised:
        raise ValueError(
            f"the CTranslate2 model's weights are quantised (e.g. {quantised[0]}); only float16/bfloat16/float32 "
            "models convert exactly: re-convert it with --quantization float16"
        )
    state: dict[str, torch.Tensor] = {}

    def linear(target: str, source: str, packed: tuple[str, ...] = ()):
        weight, bias = model[f"{source}/weight"], model.variables.get(f"{source}/bias")
        if not packed:
            state[f"{target}.weight"], state[f"{target}.bias"] = weight, bias
            return
        # Equal parts in order; transformers' Whisper k_proj has no bias (CTranslate2 stores zeros there, and a key
        # bias adds one constant per query row, which softmax ignores).
        for part, part_weight, part_bias in zip(packed, weight.chunk(len(packed)), bias.chunk(len(packed))):
            state[f"{target}.{part}.weight"] = part_weight
            if part != "k_proj":
                state[f"{target}.{part}.bias"] = part_bias

    def layer_norm(target: str, source: str):
        state[f"{target}.weight"], state[f"{target}.bias"] = model[f"{source}/gamma"], model[f"{source}/beta"]

    for side in ("encoder", "decoder"):
        state[f"model.{side}.embed_positions.weight"] = model[f"{side}/position_encodings/encodings"]
        layer_norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for index in range(_layer_count(model, side)):
            target, source = f"model.{side}.layers.{index}", f"{side}/layer_{index}"
            linear(f"{target}.self_attn", f"{source}/self_attention/linear_0", packed=("q_proj", "k_proj", "v_proj"))
            linear(f"{target}.self_attn.out_proj", f"{source}/self_attention/linear_1")
            layer_norm(f"{target}.self_attn_layer_norm", f"{source}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{target}.encoder_attn.q_proj", f"{source}/attention/linear_0")
                linear(f"{target}.encoder_attn", f"{source}/attention/linear_1", packed=("k_proj", "v_proj"))
                linear(f"{target}.encoder_attn.out_proj", f"{source}/attention/linear_2")
                layer_norm(f"{target}.encoder_attn_layer_norm", f"{source}/attention/layer_norm")
            linear(f"{target}.fc1", f"{source}/ffn/linear_0")
            linear(f"{target}.fc2", f"{source}/ffn/linear_1")
            layer_norm(f"{target}.final_layer_norm", f"{source}/ffn/layer_norm")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    state["model.decoder.embed_tokens.weight"] = model["decoder/embeddings/weight"]
    if not _projection_is_tied(model):
        state["proj_out.weight"] = model["decoder/projection/weight"]
    return state


def _projection_is_tied(model: CTranslate2Model) -> bool:
    return model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"


def whisper_config(model: CTranslate2Model, ct2_config: dict | None = None):
    """The ``WhisperConfig`` whose shapes match a CTranslate2 WhisperSpec's variables.

    Args:
        model: A CTranslate2 Whisper model (:func:`read_ctranslate2_model`).
        ct2_config: The model folder's ``config.json`` (suppressed tokens), when there is one.

    Returns:
        A ``transformers.WhisperConfig``.
    """
    from transformers import WhisperConfig

    ct2_config = ct2_config or {}
    vocab_size, width = model["decoder/embeddings/weight"].shape
    suppress = ct2_config.get("suppress_ids")
    begin_suppress = ct2_config.get("suppress_ids_begin")
    return WhisperConfig(
        vocab_size=vocab_size,
        d_model=width,
        num_mel_bins=model["encoder/conv1/weight"].shape[1],
        encoder_layers=_layer_count(model, "encoder"),
        decoder_layers=_layer_count(model, "decoder"),
        encoder_attention_heads=int(model["encoder/num_heads"]),
        decoder_attention_heads=int(model["decoder/num_heads"]),
        encoder_ffn_dim=model["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=model["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=model["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=model["decoder/position_encodings/encodings"].shape[0],
        suppress_tokens=list(suppress) if suppress is not None else None,
        begin_suppress_tokens=list(begin_suppress) if begin_suppress is not None else [220, 50256],
        tie_word_embeddings=_projection_is_tied(model),
    )


def whisper_generation_settings(vocabulary: list[str], ct2_config: dict | None = None) -> dict:
    """Whisper's generation settings (special token ids, languages, tasks) read from the model's vocabulary.

    A vocabulary of 51,865 tokens or more is multilingual (as in OpenAI's Whisper): its language tokens are those
    between ``<|startoftranscript|>`` and ``<|translate|>``.

    Args:
        vocabulary: Every token of the model in id order (CTranslate2's ``vocabulary.txt``/``vocabulary.json``).
        ct2_config: The model folder's ``config.json`` (suppressed tokens, alignment heads), when there is one.

    Returns:
        Keyword arguments for ``transformers.GenerationConfig``.

    Raises:
        ValueError: When a special token Whisper needs is missing from the vocabulary.
    """
    ct2_config = ct2_config or {}
    ids = {token: index for index, token in enumerate(vocabulary)}
    needed = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
    missing = [token for token in needed if token not in ids]
    if missing:
        raise ValueError(f"the vocabulary has no {', '.join(missing)}: it is not a Whisper vocabulary")
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    settings = {
        "decoder_start_token_id": start,
        "bos_token_id": end,
        "eos_token_id": end,
        "pad_token_id": end,
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "is_multilingual": len(vocabulary) >= 51865,
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or [ids.get("Ġ", 220), end]),
    }
    if "<|startofprev|>" in ids:
        settings["prev_sot_token_id"] = ids["<|startofprev|>"]
    if ct2_config.get("alignment_heads"):
        settings["alignment_heads"] = [list(pair) for pair in ct2_config["alignment_heads"]]
    if settings["is_multilingual"]:
        languages = vocabulary[start + 1 : ids["<|translate|>"]]
        settings["lang_to_id"] = {token: ids[token] for token in languages}
        settings["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return settings


def read_vocabulary(ct2_dir: str | os.PathLike) -> list[str]:
    """The model's tokens in id order from ``vocabulary.json`` (a JSON list) or ``vocabulary.txt`` (one a line).

    Args:
        ct2_dir: The CTranslate2 model folder.

    Returns:
        The tokens.

    Raises:
        FileNotFoundError: When the folder has neither file.
    """
    json_path, text_path = os.path.join(ct2_dir, "vocabulary.json"), os.path.join(ct2_dir, "vocabulary.txt")
    if os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as handle:
            return json.load(handle)
    if os.path.isfile(text_path):
        with open(text_path, encoding="utf-8", newline="") as handle:  # one token per "\n"-ended line, kept verbatim
            tokens = handle.read().split("\n")
        return tokens[:-1] if tokens and tokens[-1] == "" else tokens
    raise FileNotFoundError(f"{ct2_dir} has no vocabulary.json or vocabulary.txt (CTranslate2 writes one of them)")


def whisper_tokenizer(ct2_dir: str | os.PathLike, vocabulary: list[str]):
    """A ``WhisperTokenizer`` from the folder's ``tokenizer.json``, completed to the model's vocabulary.

    faster-whisper's folders ship the tokenizer without the 1,501 timestamp tokens (``<|0.00|>`` … ``<|30.00|>``)
    that end Whisper's vocabulary; they are added here, as transformers' own Whisper tokenizers have them. The
    special tokens of ``tokenizer.json`` become the tokenizer's special tokens, so that decoding with timestamps
    finds where the timestamps begin.

    Args:
        ct2_dir: The CTranslate2 model folder.
        vocabulary: The model's tokens in id order (:func:`read_vocabulary`).

    Returns:
        A ``transformers.WhisperTokenizer`` whose token ids are the model's.

    Raises:
        FileNotFoundError: When the folder has no ``tokenizer.json``.
        ValueError: When the tokenizer's tokens disagree with the model's vocabulary.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    tokenizer_file = os.path.join(ct2_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"{ct2_dir} has no tokenizer.json (faster-whisper's folders ship one)")
    with open(tokenizer_file, encoding="utf-8") as handle:
        added = json.load(handle).get("added_tokens", [])
    specials = [token["content"] for token in added if token.get("special") and token["content"] != "<|endoftext|>"]
    tokenizer = WhisperTokenizer(tokenizer_file=tokenizer_file, extra_special_tokens=specials)
    missing = vocabulary[len(tokenizer) :]
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in missing])
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if tokens != vocabulary:
        first = next(
            (i for i, (a, b) in enumerate(zip(tokens, vocabulary)) if a != b), min(len(tokens), len(vocabulary))
        )
        seen = tokens[first] if first < len(tokens) else "(none)"
        wanted = vocabulary[first] if first < len(vocabulary) else "(none)"
        raise ValueError(
            f"{tokenizer_file} does not match the model's vocabulary: token {first} is {seen!r} in the tokenizer and "
            f"{wanted!r} in the model ({len(tokens)} vs {len(vocabulary)} tokens)"
        )
    return tokenizer


def convert_ctranslate2_whisper(
    ct2_dir: str | os.PathLike, folder: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> str:
    """Write a CTranslate2 Whisper model folder as a transformers Whisper folder.

    The folder then loads with ``WhisperForConditionalGeneration.from_pretrained`` and
    ``WhisperProcessor.from_pretrained`` (or ``pipeline("automatic-speech-recognition", model=folder)``), offline:
    weights (safetensors), config, generation config (special tokens, suppressed tokens, alignment heads, languages),
    feature extractor and tokenizer.

    Args:
        ct2_dir: A CTranslate2 Whisper folder: ``model.bin``, ``tokenizer.json``, ``vocabulary.txt`` or
            ``vocabulary.json``, and usually ``config.json`` (as faster-whisper's models ship).
        folder: Where to write the transformers folder (created).
        dtype: The weights' dtype in the folder. float32 by default: widening CTranslate2's float16 is exact, and
            float32 is what a CPU trains in.

    Returns:
        ``folder``, as a string.

    Raises:
        FileNotFoundError: When a file above is missing.
        ValueError: When the model is not a float Whisper model of binary version 6, its vocabulary and tokenizer
            disagree, or ``dtype`` is not a float dtype.
    """
    from transformers import (
        GenerationConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype}")
    ct2_dir, folder = os.fspath(ct2_dir), os.fspath(folder)
    model = read_ctranslate2_model(ct2_dir)
    config_path = os.path.join(ct2_dir, "config.json")
    ct2_config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            ct2_config = json.load(handle)
    state = whisper_state_dict(model)  # refuses other specs and quantised weights before anything else is read
    vocabulary = read_vocabulary(ct2_dir)
    config = whisper_config(model, ct2_config)
    if len(vocabulary) != config.vocab_size:
        raise ValueError(
            f"{ct2_dir}: the vocabulary has {len(vocabulary)} tokens, the model's embeddings {config.vocab_size} rows"
        )
    tokenizer = whisper_tokenizer(ct2_dir, vocabulary)
    settings = whisper_generation_settings(vocabulary, ct2_config)
    config.update({key: settings[key] for key in ("decoder_start_token_id", "bos_token_id", "eos_token_id")})

    # No random initialisation: every weight comes from the file (Whisper keeps no buffers outside its state dict).
    with torch.device("meta"):
        whisper = WhisperForConditionalGeneration(config)
    missing, unexpected = whisper.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    tied = {"proj_out.weight"} if config.tie_word_embeddings else set()
    if set(missing) != tied or unexpected:
        raise ValueError(
            f"the CTranslate2 Whisper layout did not fill the model: missing {missing}, extra {unexpected}"
        )
    whisper.tie_weights()
    whisper.generation_config = GenerationConfig(**settings, max_length=config.max_target_positions)
    whisper.save_pretrained(folder)
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=config.num_mel_bins), tokenizer)
    processor.save_pretrained(folder)
    return folder
