"""What kind of model a network is, judged from its class and config: which positions its logits cover, whether
they shift, how many classes it predicts, and which Auto class loads another of its kind."""

from __future__ import annotations

import transformers
from torch import nn

# transformers names task models "<Arch><Suffix>"; the Auto class for a suffix loads a teacher with the same head.
_AUTO_CLASS_BY_SUFFIX = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForImageClassification", "AutoModelForImageClassification"),
    ("ForAudioClassification", "AutoModelForAudioClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
)

_TOKEN_LEVEL_SUFFIXES = (
    "ForCausalLM",
    "LMHeadModel",
    "ForConditionalGeneration",
    "ForMaskedLM",
    "ForTokenClassification",
)

# Heads whose logits are one score per class: config.num_labels is their width.
_CLASSIFIER_SUFFIXES = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForAudioClassification",
    "ForTokenClassification",
)


def base_model(model: nn.Module) -> nn.Module:
    """The model under any PEFT or DDP wrapper.

    Args:
        model: A model, possibly wrapped by PEFT or DDP.

    Returns:
        The innermost model.
    """
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP and friends
            model = model.module
        else:
            return model


def base_model_class_name(model: nn.Module) -> str:
    """The class name of the model under any PEFT or DDP wrapper.

    Args:
        model: A model, possibly wrapped by PEFT or DDP.

    Returns:
        E.g. ``"BertForSequenceClassification"``.
    """
    return type(base_model(model)).__name__


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(base_model(model), "config", None), "is_encoder_decoder", False))


def is_token_level(model: nn.Module) -> bool:
    """Whether the model's logits are per token (B×T×V) rather than per example, judged from its class.

    Args:
        model: A model, possibly wrapped by PEFT or DDP.

    Returns:
        True for causal, seq2seq and masked LMs and token classifiers.
    """
    return base_model_class_name(model).endswith(_TOKEN_LEVEL_SUFFIXES)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether logits at position t predict token t + 1, so labels shift by one.

    Decoder-only LMs, and the decoder-only ``…ForConditionalGeneration`` models (vision-language models such as
    Llava), which are not encoder-decoders.

    Args:
        model: A model, possibly wrapped by PEFT or DDP.

    Returns:
        Whether the model is a causal LM.
    """
    if _is_encoder_decoder(model):
        return False
    return base_model_class_name(model).endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))


def is_classifier(model: nn.Module) -> bool:
    """Whether the logits are one score per class of ``config.num_labels`` (per example or per token).

    Args:
        model: A model, possibly wrapped by PEFT or DDP.

    Returns:
        True for sequence, image, audio and token classifiers.
    """
    return base_model_class_name(model).endswith(_CLASSIFIER_SUFFIXES)


def labels_mark_distilled_positions(model: nn.Module) -> bool:
    """Whether a token-level model's labels decide which tokens carry distillation.

    LMs (causal, seq2seq, masked): the supervised tokens — the completion, not the prompt; the masked tokens.
    Token classifiers: every attended token, labeled or not, so an unlabeled transfer set is distilled too
    (their -100 marks rows or sub-words without a gold tag, not tokens without a prediction).

    Args:
        model: A model, possibly wrapped by PEFT or DDP.

    Returns:
        False for token classifiers, True otherwise.
    """
    return not base_model_class_name(model).endswith("ForTokenClassification")


def output_size(model: nn.Module) -> int | None:
    """Rows of the model's LM head (its vocabulary size as the logits see it), also when ZeRO-3 has sharded it.

    Args:
        model: A model.

    Returns:
        The number of rows, or ``None`` for a model without output embeddings.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        return None
    return tuple(getattr(weight, "ds_shape", weight.shape))[0]


def num_classes(model: nn.Module) -> int | None:
    """The width of the logits as the config states it.

    Args:
        model: A model, possibly wrapped by PEFT or DDP.

    Returns:
        The vocabulary of an LM, ``num_labels`` of a classifier, ``None`` when neither is known.
    """
    size = output_size(model)
    if size is not None:
        return size
    if is_classifier(model):
        return getattr(getattr(base_model(model), "config", None), "num_labels", None)
    return None


def auto_class_for(student: nn.Module):
    """The ``AutoModelFor…`` class that loads a model with the same task head as ``student``.

    Args:
        student: A transformers task model, possibly wrapped.

    Returns:
        The Auto class (``AutoModelForImageTextToText`` for decoder-only multimodal LMs).

    Raises:
        ValueError: the class name ends in no known task suffix.
    """
    name = base_model_class_name(student)
    if name.endswith("ForConditionalGeneration") and not _is_encoder_decoder(student):
        return transformers.AutoModelForImageTextToText  # decoder-only multimodal LMs (Llava, PaliGemma, ...)
    for suffix, auto_name in _AUTO_CLASS_BY_SUFFIX:
        if name.endswith(suffix):
            return getattr(transformers, auto_name)
    raise ValueError(
        f"cannot tell which Auto class loads a teacher for a student of class {name}; "
        "load the teacher yourself and pass it as teacher_model=."
    )


def is_regression(model: nn.Module) -> bool:
    """A regression head, as transformers decides it.

    Args:
        model: A model, possibly wrapped by PEFT or DDP.

    Returns:
        True for ``problem_type="regression"``, or one label without a problem type.
    """
    config = getattr(base_model(model), "config", None)
    problem = getattr(config, "problem_type", None)
    return problem == "regression" or (problem is None and getattr(config, "num_labels", None) == 1)
