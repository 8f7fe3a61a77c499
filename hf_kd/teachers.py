"""Where teacher outputs come from: loading, freezing and running a teacher model."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os

import torch
from torch import nn

from .evaluation import count_parameters
from .features import ModelFeatures, run_model
from .losses.chunked import FSDPModule, output_logits
from .model_kinds import (  # noqa: F401  (re-exported: where these lived before)
    auto_class_for,
    base_model_class_name,
    is_causal_lm,
    is_token_level,
    output_size,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_teacher(teacher: nn.Module | str, student: nn.Module, dtype: str = "auto") -> nn.Module:
    """Load (from a path or hub id, through ``from_pretrained``), cast and freeze a teacher."""
    torch_dtype = _DTYPES.get(dtype)
    if isinstance(teacher, str):
        if looks_like_local_path(teacher) and not os.path.isdir(teacher):
            raise FileNotFoundError(
                f"teacher_model {teacher!r} is not a folder (resolved: {os.path.abspath(os.path.expanduser(teacher))}):"
                " give the folder a teacher was saved to with save_pretrained, or a Hub repo id (owner/name)."
            )
        try:
            teacher = auto_class_for(student).from_pretrained(os.path.expanduser(teacher), dtype=torch_dtype or "auto")
        except OSError as error:  # not found on the Hub, offline, no weights in the folder
            raise OSError(f"could not load the teacher {teacher!r} with from_pretrained: {error}") from error
    elif not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher_model must be an nn.Module or a path, got {type(teacher).__name__}.")
    elif torch_dtype is not None:
        teacher = teacher.to(torch_dtype)
    check_materialized(teacher, "teacher")
    return freeze(teacher)


SINGLE_TEACHER = "teacher"  # the name of a lone teacher (a list's are teacher0, teacher1, ...)


def name_models(models, prefix: str, reserved: tuple[str, ...] = ()) -> dict:
    """Models by name: a dict keeps its names (checked), a list is numbered ``PREFIX0``, ``PREFIX1``, …, anything
    else is the one model ``PREFIX``. Names become log entries (``kl/NAME``), folders and card rows: non-empty
    strings without '/', none of ``reserved``."""
    if isinstance(models, dict):
        for name in models:
            if not isinstance(name, str) or not name or "/" in name or name in reserved:
                others = f" other than {', '.join(repr(r) for r in reserved)}" if reserved else ""
                raise ValueError(
                    f"{prefix} names must be non-empty strings without '/'{others} (they name log entries such as "
                    f"kl/NAME, folders and card rows), got {name!r}."
                )
        return dict(models)
    if isinstance(models, (list, tuple)):
        return {f"{prefix}{index}": model for index, model in enumerate(models)}
    return {prefix: models}


def build_teachers(teacher_model, student: nn.Module, dtype: str = "auto") -> dict:
    """``teacher_model`` as a mapping name → frozen model or :class:`TeacherSource`: one teacher (a model, a path,
    a source) is ``{"teacher": ...}``, a list ``{"teacher0": ..., "teacher1": ...}``, a dict keeps its names."""
    named = name_models(teacher_model, SINGLE_TEACHER, reserved=("student",))
    return {
        name: teacher if isinstance(teacher, TeacherSource) else load_teacher(teacher, student, dtype)
        for name, teacher in named.items()
    }


def place_teacher(teacher, trainer, losses) -> TeacherSource:
    """A frozen model placed for the way ``trainer``'s student is trained, or a source (a cache) checked against
    its student, training set, tokenizer and ``losses``."""
    if not isinstance(teacher, TeacherSource):
        return LiveTeacher(prepare_teacher(teacher, trainer.accelerator))
    if hasattr(teacher, "check_compatible"):  # a cache: same examples, vocabulary and tokenizer
        teacher.check_compatible(
            student=trainer.accelerator.unwrap_model(trainer.model),
            train_dataset=trainer.train_dataset,
            tokenizer=trainer.processing_class,
            losses=list(losses),
        )
    teacher.attach(trainer)
    return teacher


def looks_like_local_path(name: str) -> bool:
    """A name that can only mean a folder: absolute, relative with ./ or ../, home-relative, or with more than one
    '/' (a Hub repo id is ``owner/name``)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def check_materialized(model: nn.Module, role: str) -> None:
    """Refuse a model whose weights are on the meta device (built under ``init_empty_weights`` or
    ``device_map="meta"``): its outputs would be empty tensors, not numbers."""
    meta = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if meta:
        raise ValueError(
            f"the {role}'s weights are on the meta device ({len(meta)} tensors, e.g. {meta[0]!r}): it was built "
            "without loading them (init_empty_weights, device_map='meta'). Load it with from_pretrained, or "
            "load_state_dict(..., assign=True), before distillation."
        )


def prepare_teacher(teacher: nn.Module, accelerator) -> nn.Module:
    """Place a frozen teacher for the way the student is trained, with no optimizer state and no gradients.

    DeepSpeed ZeRO-3: an inference-only DeepSpeed engine with the student's ZeRO-3 settings, so the teacher is
    sharded across processes like the student. FSDP2: sharded with the student's FSDP plugin (``fully_shard``
    per layer, as Accelerate wraps the student), frozen. ZeRO-1/2 (stage 0 for the teacher), DDP, FSDP1 and one
    device: the teacher is replicated, in eval mode, through ``accelerator.prepare_model(...,
    evaluation_mode=True)``.
    """
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        teacher = fsdp2_prepare_model(accelerator, teacher)
        # No backward follows a teacher forward: every unit, the root included, must free its gathered weights
        # right after its forward, or the whole teacher stays unsharded in memory after the first step.
        teacher.set_reshard_after_forward(True)
        return freeze(teacher)
    if accelerator.state.deepspeed_plugin is None:
        return accelerator.prepare_model(teacher, evaluation_mode=True)
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for section in ("optimizer", "scheduler"):  # the teacher is never optimised
        config.pop(section, None)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}  # nothing to shard without optimizer state: replicate
    _size_zero_buckets(config["zero_optimization"], teacher)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def _size_zero_buckets(zero: dict, model: nn.Module) -> None:
    """Fill the ``"auto"`` ZeRO bucket sizes from the teacher's width, by the rule transformers applies to the
    student at ``train()`` (left as they are, DeepSpeed would take them as 500M-element defaults)."""
    auto = [key for key, value in zero.items() if value == "auto"]
    if not auto:
        return
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    hidden = getattr(config, "hidden_size", None) or max(getattr(config, "hidden_sizes", None) or [0]) or None
    if hidden is None:
        raise ValueError(
            f"the DeepSpeed config sets {auto} to 'auto', sized from the model's hidden_size, which the teacher's "
            "config lacks: give them numbers."
        )
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    zero.update({key: sizes[key] for key in auto if key in sizes})


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


class TeacherSource:
    """Where the teacher's outputs come from: a model run live, a cache on disk, the student's own base model.

    ``model`` is a separate teacher network held in memory (``None`` for a cache or the student's own base).
    ``covers_eval`` says whether outputs exist for evaluation data too (a cache covers the data it was written for
    only); ``compare_with_teacher`` measures the teacher through ``__call__``.
    """

    model: nn.Module | None = None
    covers_eval: bool = True
    provides: frozenset[str] | None = None  # the feature needs it can serve; None: anything a model returns

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        """The teacher's features for a batch of student inputs."""
        raise NotImplementedError

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        """For chunked causal-LM KD: ``(rows, to_logits)`` where ``rows`` is a tuple of tensors with one row per
        position of ``mask`` (over logits positions 0..T−2) and ``to_logits(*row_chunk)`` gives those positions'
        logits (called under ``no_grad``)."""
        raise NotImplementedError

    def release(self) -> None:
        """Free what ``token_rows`` held for the chunks once the backward pass that recomputes them is done."""

    def attach(self, trainer) -> None:
        """Called once by the trainer that will read this source (a teacher that learns during training places
        itself on the trainer's device and adds its callbacks here)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State that changes during training (a mean teacher's weights): checkpointed and resumed with the loss
        parts. Frozen teachers and caches have none."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def describe(self) -> dict:
        """``teacher`` (name or path), ``teacher_class`` and ``teacher_parameters`` for summaries and cards."""
        raise NotImplementedError

    def check_needs(self, needs: frozenset[str]) -> None:
        if self.provides is not None and not needs <= self.provides:
            raise ValueError(
                f"the configured losses need teacher {sorted(needs - self.provides)}, which a "
                f"{type(self).__name__} does not provide (it provides {sorted(self.provides)}); use logit losses "
                "or a live teacher model."
            )


class LiveTeacher(TeacherSource):
    """Teacher outputs computed on the fly by a frozen model, under ``no_grad``, on the student's inputs.

    Inputs the teacher's ``forward`` does not take (say ``token_type_ids`` for a teacher without them) are
    dropped, and labels are never passed: the teacher computes no loss.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self._accepted = None if takes_any else set(parameters)

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
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

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        # logits_to_keep=1: the model projects only its last position; the chunks project the rest.
        outputs = self.outputs(inputs, output_hidden_states=True, logits_to_keep=1)
        model = unwrap(self.model)
        if isinstance(self.model, FSDPModule):
            # The chunks call the LM head outside the teacher's forward (and again when the backward pass recomputes
            # them): gather the unit holding it (Accelerate gives the head its own) until release().
            self._head_unit().unshard()
        head, config = model.get_output_embeddings(), model.config
        return (outputs.hidden_states[-1][:, :-1][mask],), lambda hidden: output_logits(hidden, head, config)

    def release(self) -> None:
        if isinstance(self.model, FSDPModule):
            self._head_unit().reshard()

    def _head_unit(self) -> nn.Module:
        """The FSDP2 unit whose parameters include the LM head's: its own when it has one, else the root."""
        head = self.model.get_output_embeddings()
        return head if isinstance(head, FSDPModule) else self.model

    def describe(self) -> dict:
        model = unwrap(self.model)
        return {
            "teacher": getattr(model, "name_or_path", None) or None,
            "teacher_class": type(model).__name__,
            "teacher_parameters": count_parameters(model),
        }


class AdapterBaseTeacher(TeacherSource):
    """The teacher is the student's own base model with its adapters switched off (a PEFT/LoRA student on the
    teacher's weights): one copy of the base in memory, the teacher pass runs under ``disable_adapter()``."""

    def __init__(self, student: nn.Module):
        student = unwrap(student)
        if not hasattr(student, "disable_adapter") or not hasattr(student, "get_base_model"):
            raise ValueError(
                "AdapterBaseTeacher needs a PEFT student (peft.get_peft_model(base, LoraConfig(...))) whose base "
                f"model is the teacher; got {type(student).__name__}."
            )
        self.student = student
        self.model = None  # the base is not a separate network
        self._live = LiveTeacher(student)

    @contextlib.contextmanager
    def _base(self):
        was_training = self.student.training
        self.student.eval()  # no dropout in the teacher pass, as for a separate teacher
        try:
            with self.student.disable_adapter(), torch.no_grad():
                yield
        finally:
            self.student.train(was_training)

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        with self._base():
            return run_model(self.student, self._live.inputs(inputs), needs)[1]

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        with self._base():
            outputs = self.student(**self._live.inputs(inputs), output_hidden_states=True, logits_to_keep=1)
        base = self.student.get_base_model()
        head, config = base.get_output_embeddings(), base.config

        def to_logits(hidden):
            with self._base():  # a LoRA on the LM head must be off for the teacher's logits too
                return output_logits(hidden, head, config)

        return (outputs.hidden_states[-1][:, :-1][mask],), to_logits

    def describe(self) -> dict:
        base = self.student.get_base_model()
        return {
            "teacher": getattr(base, "name_or_path", None) or None,
            "teacher_class": type(base).__name__ + " (the student's base, adapters off)",
            # The adapters are the only trainable parameters (modules_to_save copies included): the rest is the base.
            "teacher_parameters": sum(p.numel() for p in base.parameters() if not p.requires_grad),
        }


class PrecomputedPredictions(nn.Module):
    """A teacher whose predictions were computed beforehand and travel with the rows as its view (:mod:`hf_kd.views`):
    the column ``teacher_COLUMN`` is returned as its logits — ranking scores, or the predictions a federated client
    sent for a public data set. Several such teachers (one column each) form a multi-teacher ensemble."""

    def __init__(self, column: str, hint: str = "give every row the teacher's predictions"):
        super().__init__()
        self.column, self.hint = column, hint
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # places the teacher (device, dtype)

    def forward(self, **view):
        if view.get(self.column) is None:
            raise ValueError(f"{type(self).__name__} reads the teacher_{self.column} column: {self.hint}.")
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=view[self.column].float())
