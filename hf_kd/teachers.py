"""Where teacher outputs come from: loading, freezing and running a teacher model."""

from __future__ import annotations

import copy
import inspect

import torch
import transformers
from torch import nn

from .features import ModelFeatures, run_model

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

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_model_class_name(model: nn.Module) -> str:
    """The class name of the model under any PEFT or DDP wrapper."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP and friends
            model = model.module
        else:
            return type(model).__name__


def is_token_level(model: nn.Module) -> bool:
    """Whether the model's logits are per token (B×T×V) rather than per example, judged from its class."""
    return base_model_class_name(model).endswith(_TOKEN_LEVEL_SUFFIXES)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether logits at position t predict token t + 1 (decoder-only LMs), so labels shift by one."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return base_model_class_name(model).endswith(("ForCausalLM", "LMHeadModel"))


def auto_class_for(student: nn.Module):
    """The ``AutoModelFor…`` class that loads a model with the same task head as ``student``."""
    name = base_model_class_name(student)
    for suffix, auto_name in _AUTO_CLASS_BY_SUFFIX:
        if name.endswith(suffix):
            return getattr(transformers, auto_name)
    raise ValueError(
        f"cannot tell which Auto class loads a teacher for a student of class {name}; "
        "load the teacher yourself and pass it as teacher_model=."
    )


def load_teacher(teacher: nn.Module | str, student: nn.Module, dtype: str = "auto") -> nn.Module:
    """Load (from a path or hub id, through ``from_pretrained``), cast and freeze a teacher."""
    torch_dtype = _DTYPES.get(dtype)
    if isinstance(teacher, str):
        teacher = auto_class_for(student).from_pretrained(teacher, dtype=torch_dtype or "auto")
    elif not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher_model must be an nn.Module or a path, got {type(teacher).__name__}.")
    elif torch_dtype is not None:
        teacher = teacher.to(torch_dtype)
    return freeze(teacher)


def prepare_teacher(teacher: nn.Module, accelerator) -> nn.Module:
    """Place a frozen teacher for the way the student is trained, with no optimizer state and no gradients.

    DeepSpeed ZeRO-3: an inference-only DeepSpeed engine with the student's ZeRO-3 settings, so the teacher is
    sharded across processes like the student. ZeRO-1/2 (stage 0 for the teacher), DDP and one device: the
    teacher is replicated, in eval mode, through ``accelerator.prepare_model(..., evaluation_mode=True)``.
    """
    if accelerator.state.deepspeed_plugin is None:
        return accelerator.prepare_model(teacher, evaluation_mode=True)
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for section in ("optimizer", "scheduler"):  # the teacher is never optimised
        config.pop(section, None)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}  # nothing to shard without optimizer state: replicate
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine or DDP wrapper."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def use_eager_attention(model: nn.Module) -> None:
    """Switch a transformers model to eager attention: sdpa and flash kernels return no attention weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation("eager")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the teacher is never trained."""
    model.eval()
    model.requires_grad_(False)
    return model


class LiveTeacher:
    """Teacher outputs computed on the fly by a frozen model, under ``no_grad``, on the student's inputs.

    Inputs the teacher's ``forward`` does not take (say ``token_type_ids`` for a teacher without them) are
    dropped, and labels are never passed: the teacher computes no loss.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self._accepted = None if takes_any else set(parameters)

    def __call__(self, inputs: dict, needs: frozenset[str]) -> ModelFeatures:
        """The teacher's features for a batch of student inputs."""
        self.model.eval()  # Trainer.train() may have switched every module it saw to train mode
        with torch.no_grad():
            return run_model(self.model, self.inputs(inputs), needs, module_root=unwrap(self.model))[1]

    def outputs(self, inputs: dict, **kwargs):
        """The teacher's raw outputs for a batch of student inputs, with extra forward arguments."""
        self.model.eval()
        with torch.no_grad():
            return self.model(**self.inputs(inputs), **kwargs)

    def inputs(self, inputs: dict) -> dict:
        """The student inputs the teacher takes: never labels, and only arguments its forward accepts."""
        return {
            key: value
            for key, value in inputs.items()
            if key != "labels" and (self._accepted is None or key in self._accepted)
        }
