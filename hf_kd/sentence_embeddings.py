"""Sentence encoders as hf_kd models: token ids in, one embedding per text out.

:class:`SentenceEmbeddingModel` wraps a ``sentence_transformers.SentenceTransformer`` (the format embedding models
are shared in) or a transformers model's token states with a pooling, so that a ``DistillationTrainer`` trains one
as the student and runs one as the teacher. Its forward returns ``embeddings`` (``B×D``; losses read them with
``source="embeddings"``) and, when asked, the encoder's ``hidden_states`` (for intermediate losses). Saving writes a
SentenceTransformer folder, which ``SentenceTransformer(path)`` and :meth:`SentenceEmbeddingModel.from_pretrained`
load; checkpoints resume from the same folders.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .features import pool

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
POOLING_MODES = ("mean", "max", "cls", "last")  # sentence-transformers calls last "lasttoken"
_ST_POOLING = {"mean": "mean", "max": "max", "cls": "cls", "last": "lasttoken"}


@dataclass
class SentenceEmbeddingOutput(ModelOutput):
    """What :class:`SentenceEmbeddingModel` returns.

    Args:
        embeddings: One embedding per text, ``B×D``.
        hidden_states: The encoder's hidden states (embedding output first), when asked for.
    """

    embeddings: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def _sentence_transformers():
    try:
        import sentence_transformers
    except ImportError as error:  # an extra of the recipes, not of the core
        raise ImportError(
            "SentenceTransformer models need sentence-transformers: pip install sentence-transformers "
            "(or hf_kd[recipes])."
        ) from error
    return sentence_transformers


def _st_modules():
    try:  # sentence-transformers ≥ 6 moved its modules; 3–5 have them under models
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Normalize, Pooling, Transformer


def pool_tokens(states: torch.Tensor, pooling: str, attention_mask: torch.Tensor) -> torch.Tensor:
    """One embedding per text from token states ``B×T×H``.

    Args:
        states: Token states ``B×T×H``.
        pooling: ``mean``, ``cls`` or ``last`` (:func:`hf_kd.features.pool`), or ``max``: each channel's largest
            value over the real tokens (sentence-transformers' max pooling).
        attention_mask: ``B×T``, marks real tokens.

    Returns:
        ``B×H`` embeddings.
    """
    if pooling == "max":
        padding = ~attention_mask.bool().unsqueeze(-1)
        return states.masked_fill(padding, torch.finfo(states.dtype).min).max(1).values
    return pool(states, pooling, attention_mask)


def token_encoder(model: PreTrainedModel) -> PreTrainedModel:
    """The part of a transformers model whose forward gives token states (``last_hidden_state``).

    The model itself, or the body of a model with a task head (``model.base_model``).

    Args:
        model: A transformers model.

    Returns:
        Its body.

    Raises:
        ValueError: an encoder-decoder: its forward needs decoder inputs, and its text states are its encoder's.
    """
    body = model.base_model
    if getattr(body.config, "is_encoder_decoder", False) and isinstance(getattr(body, "decoder", None), nn.Module):
        raise ValueError(
            f"SentenceEmbeddingModel got {type(model).__name__}, an encoder-decoder: its forward needs decoder inputs "
            "and gives no sentence's token states. Wrap its encoder: SentenceEmbeddingModel(model.get_encoder())."
        )
    return body


def set_pooling(model, pooling: str | None, normalize: bool | None) -> None:
    """Make a SentenceTransformer pool and normalise as asked, so that what it saves embeds as it trained.

    Replaces its ``Pooling`` module and adds or removes ``Normalize``; changes ``model`` in place.

    Args:
        model: A ``sentence_transformers.SentenceTransformer``.
        pooling: One of :data:`POOLING_MODES`; ``None``: keep its pooling.
        normalize: Unit-length embeddings or not; ``None``: as its modules do.

    Raises:
        ValueError: ``pooling`` is set and the model has no single ``Pooling`` module.
    """
    Normalize, Pooling, _ = _st_modules()
    if pooling is not None:
        found = [index for index, module in enumerate(model) if isinstance(module, Pooling)]
        if len(found) != 1:
            names = [type(module).__name__ for module in model]
            raise ValueError(
                f"pooling={pooling!r} replaces the Pooling module of the SentenceTransformer, and it has {len(found)} "
                f"(modules {names}). Leave pooling unset to keep how it pools, or wrap its encoder: "
                f"SentenceEmbeddingModel(model[0].auto_model, pooling={pooling!r})."
            )
        (index,) = found
        old = model[index]
        width = getattr(old, "embedding_dimension", None) or old.word_embedding_dimension  # named so before v6
        model[index] = Pooling(width, _ST_POOLING[pooling], include_prompt=old.include_prompt)
    if normalize is not None:
        normalizing = [index for index, module in enumerate(model) if isinstance(module, Normalize)]
        if normalize and not normalizing:
            model.append(Normalize())
        for index in reversed(normalizing if not normalize else []):
            del model[index]


class SentenceEmbeddingModel(nn.Module):
    """A sentence encoder the trainer can distil into or from.

    A bare encoder pools by ``mean`` and does not normalise unless told; a SentenceTransformer keeps its own
    pooling, normalisation and dense modules unless told, and is otherwise changed in place to pool and normalise as
    asked (so that it saves so too).

    Args:
        encoder: A ``SentenceTransformer`` whose first module is a transformers ``Transformer``, or a transformers
            model whose token states are pooled here: an encoder (``AutoModel``), or a model with a task head
            (``BertForSequenceClassification``, ``GPT2LMHeadModel``), read through its body (``model.base_model``: the
            head plays no part in an embedding, and is not saved); an encoder-decoder's encoder
            (``model.get_encoder()``).
        pooling: ``mean`` over real tokens, ``max`` over real tokens, ``cls`` or ``last``.
        normalize: Scale embeddings to unit length.

    Raises:
        ValueError: an unknown pooling, a SentenceTransformer that does not start with a ``Transformer``, or an
            encoder-decoder.
        TypeError: an encoder that is neither a SentenceTransformer nor a transformers model.
    """

    def __init__(self, encoder: nn.Module, pooling: str | None = None, normalize: bool | None = None):
        super().__init__()
        if pooling is not None and pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}.")
        st = _sentence_transformers() if not isinstance(encoder, PreTrainedModel) else None
        if st is not None and isinstance(encoder, st.SentenceTransformer):
            first = encoder[0]
            if not isinstance(getattr(first, "auto_model", None), PreTrainedModel):
                raise ValueError(
                    "SentenceEmbeddingModel needs a SentenceTransformer whose first module is a transformers "
                    f"Transformer; this one starts with {type(first).__name__}."
                )
            set_pooling(encoder, pooling, normalize)
            self.sentence_transformer, self.encoder = encoder, first.auto_model
        elif isinstance(encoder, PreTrainedModel):
            self.sentence_transformer, self.encoder = None, token_encoder(encoder)
            pooling, normalize = pooling or "mean", bool(normalize)
        else:
            raise TypeError(
                "SentenceEmbeddingModel wraps a sentence_transformers.SentenceTransformer or a transformers model "
                f"(AutoModel, or one with a task head), got {type(encoder).__name__}."
            )
        # A SentenceTransformer's: as asked, None where its own modules decide.
        self.pooling, self.normalize = pooling, normalize
        self.config = self.encoder.config  # what the Trainer and the model card read

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = "cpu") -> SentenceEmbeddingModel:
        """A saved SentenceTransformer folder (a student saved by the trainer, or a shared model).

        Args:
            path: The folder (or Hub id).
            device: Where to load it.

        Returns:
            The wrapped model.
        """
        return cls(_sentence_transformers().SentenceTransformer(path, device=device))

    @property
    def tokenizer(self):
        """The SentenceTransformer's tokenizer (``None`` for a bare encoder: pass yours)."""
        return getattr(self.sentence_transformer, "tokenizer", None)

    @property
    def embedding_dimension(self) -> int:
        """The width D of the embeddings."""
        if self.sentence_transformer is not None:
            return self.sentence_transformer.get_sentence_embedding_dimension()
        return self.encoder.config.hidden_size

    def signature_columns(self) -> list[str]:
        """The inputs the forward takes (the Trainer keeps those data columns).

        Returns:
            ``["input_ids", "attention_mask", "token_type_ids"]``.
        """
        return list(ENCODER_INPUTS)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, output_hidden_states=False, **ignored):
        """Embed a batch of texts.

        Args:
            input_ids: Token ids ``B×T``.
            attention_mask: ``B×T``; ``None``: every token is real.
            token_type_ids: ``B×T``, for encoders that take them.
            output_hidden_states: Also return the encoder's hidden states (for intermediate losses).
            **ignored: Other batch columns.

        Returns:
            The embeddings (and hidden states) as a :class:`SentenceEmbeddingOutput`.

        Raises:
            ValueError: hidden states asked of a SentenceTransformer whose first module does not give them.
        """
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if attention_mask is None:
            inputs["attention_mask"] = torch.ones_like(input_ids)
        if self.sentence_transformer is None:
            outputs = self.encoder(**inputs, output_hidden_states=output_hidden_states, return_dict=True)
            embeddings = pool_tokens(outputs.last_hidden_state, self.pooling, inputs["attention_mask"])
            if self.normalize:
                embeddings = nn.functional.normalize(embeddings, dim=-1)
            return SentenceEmbeddingOutput(embeddings=embeddings, hidden_states=outputs.hidden_states)
        if not output_hidden_states:
            return SentenceEmbeddingOutput(embeddings=self.sentence_transformer(inputs)["sentence_embedding"])
        # The Transformer module keeps only the last states (and calls the encoder's forward past any hook): the
        # encoder runs here, and its last states go on through the other modules as the Transformer's would.
        first, rest = self.sentence_transformer[0], list(self.sentence_transformer)[1:]
        text = getattr(first, "modality_config", {}).get("text", {})
        if text.get("method", "forward") != "forward" or text.get("method_output_name", "last_hidden_state") != (
            "last_hidden_state"
        ):
            raise ValueError(
                f"hidden states of this SentenceTransformer's {type(first).__name__} (text modality {text}) are not "
                "available: use losses on source='embeddings'."
            )
        outputs = self.encoder(**inputs, output_hidden_states=True, return_dict=True)
        features = {**inputs, getattr(first, "module_output_name", "token_embeddings"): outputs.last_hidden_state}
        for module in rest:
            features = module(features)
        return SentenceEmbeddingOutput(embeddings=features["sentence_embedding"], hidden_states=outputs.hidden_states)

    # ---- saving: a SentenceTransformer folder, for the final student and for every checkpoint ----

    def check_saveable(self, processing_class) -> None:
        """Refuse a bare encoder that could not be saved with ``processing_class``.

        The trainer asks before training, so that no run is lost at its first checkpoint.

        Args:
            processing_class: The trainer's tokenizer, or ``None``.

        Raises:
            ValueError: a bare encoder and no tokenizer.
        """
        if self.sentence_transformer is None and processing_class is None:
            raise ValueError(
                f"SentenceEmbeddingModel({type(self.encoder).__name__}) is saved as a SentenceTransformer folder, "
                "which needs its tokenizer, and processing_class is None: give the trainer "
                "processing_class=tokenizer, or wrap a SentenceTransformer (it carries its own)."
            )

    def to_sentence_transformer(self, folder: str, processing_class=None):
        """This model as a ``SentenceTransformer``.

        A bare encoder is first written to ``folder`` with its tokenizer, ``processing_class``, and read back with a
        pooling module.

        Args:
            folder: Where a bare encoder is written.
            processing_class: A bare encoder's tokenizer.

        Returns:
            The ``SentenceTransformer`` (the wrapped one itself, when there is one).

        Raises:
            ValueError: a bare encoder and no tokenizer (:meth:`check_saveable`).
        """
        if self.sentence_transformer is not None:
            return self.sentence_transformer
        st = _sentence_transformers()
        self.check_saveable(processing_class)
        self.encoder.save_pretrained(folder)
        processing_class.save_pretrained(folder)
        Normalize, Pooling, Transformer = _st_modules()
        modules = [Transformer(folder), Pooling(self.encoder.config.hidden_size, _ST_POOLING[self.pooling])]
        if self.normalize:
            modules.append(Normalize())
        return st.SentenceTransformer(modules=modules, device=str(self.encoder.device))

    def save_checkpoint(self, folder: str, processing_class=None) -> None:
        """Save as a SentenceTransformer folder (without sentence-transformers' model card; hf_kd writes its own on
        push).

        Args:
            folder: The folder to write.
            processing_class: A bare encoder's tokenizer.
        """
        os.makedirs(folder, exist_ok=True)
        # hf_kd's card (distillation details, the comparison) is written on push; no sentence-transformers card.
        self.to_sentence_transformer(folder, processing_class).save(folder, create_model_card=False)

    def load_checkpoint(self, folder: str) -> None:
        """Read back the weights :meth:`save_checkpoint` wrote.

        Args:
            folder: A SentenceTransformer folder.

        Raises:
            ValueError: the folder has no ``modules.json``.
        """
        if not os.path.exists(os.path.join(folder, "modules.json")):
            raise ValueError(f"{folder} is not a SentenceTransformer folder (no modules.json).")
        saved = SentenceEmbeddingModel.from_pretrained(folder, device=str(self.encoder.device))
        self.encoder.load_state_dict(saved.encoder.state_dict())
        if self.sentence_transformer is not None:
            self.sentence_transformer.load_state_dict(saved.sentence_transformer.state_dict())


# ---- using an encoder: embeddings of many texts, and how fast ----


@torch.no_grad()
def encode(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    """``len(texts) × D`` float32 embeddings from a :class:`SentenceEmbeddingModel` (evaluation mode, no grad).

    Args:
        model: The encoder; its training mode is restored afterwards.
        tokenizer: Its tokenizer.
        texts: The texts.
        batch_size: Texts per forward pass.
        max_length: Tokens kept per text.

    Returns:
        The embeddings as a numpy array.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batch = {key: value.to(device) for key, value in batch.items() if key in ENCODER_INPUTS}
            chunks.append(model(**batch).embeddings.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


def encoding_speed(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128):
    """Texts encoded per second (one warm-up batch first, then ``texts`` in batches).

    Args:
        model: The encoder.
        tokenizer: Its tokenizer.
        texts: The texts to time.
        batch_size: Texts per forward pass.
        max_length: Tokens kept per text.

    Returns:
        Texts per second.
    """
    encode(model, tokenizer, texts[:batch_size], batch_size, max_length)
    start = time.perf_counter()
    encode(model, tokenizer, texts, batch_size, max_length)
    return len(texts) / (time.perf_counter() - start)
