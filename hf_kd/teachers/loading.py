"""Loading, naming, freezing and placing teacher models (for one device, DDP, DeepSpeed ZeRO and FSDP2)."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ..model_kinds import auto_class_for
from .base import TeacherSource

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_teacher(teacher: nn.Module | str, student: nn.Module, dtype: str = "auto") -> nn.Module:
    """Load (from a path or hub id, through ``from_pretrained``), cast and freeze a teacher.

    Args:
        teacher: A model, or the folder or Hub repo id to load one from (with the auto class of ``student``'s task).
        student: The student, whose class picks the auto class the teacher loads with.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (``teacher_dtype``).

    Returns:
        The teacher, frozen (:func:`freeze`).

    Raises:
        FileNotFoundError: ``teacher`` can only be a local path, and no such folder exists.
        OSError: ``from_pretrained`` could not load it.
        TypeError: ``teacher`` is neither a model nor a path.
        ValueError: its weights are on the meta device (:func:`check_materialized`).
    """
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
    strings without '/', none of ``reserved``.

    Args:
        models: A dict of models, a list of them, or one model.
        prefix: The name of one model, and the stem of a list's names.
        reserved: Names a dict may not use.

    Returns:
        The models by name.

    Raises:
        ValueError: a dict's name is empty, not a string, contains '/' or is reserved.
    """
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
    a source) is ``{"teacher": ...}``, a list ``{"teacher0": ..., "teacher1": ...}``, a dict keeps its names.

    Args:
        teacher_model: One teacher (a model, a path, a :class:`TeacherSource`), a list or a dict of them.
        student: The student (models given as paths load with its task's auto class).
        dtype: The dtype to run loaded teachers in (:func:`load_teacher`).

    Returns:
        Each teacher by name: a frozen model, or the source as given.

    Raises:
        ValueError: a dict names a teacher ``"student"`` or otherwise badly (:func:`name_models`).
    """
    named = name_models(teacher_model, SINGLE_TEACHER, reserved=("student",))
    return {
        name: teacher if isinstance(teacher, TeacherSource) else load_teacher(teacher, student, dtype)
        for name, teacher in named.items()
    }


def place_teacher(teacher, trainer, losses) -> TeacherSource:
    """A frozen model placed for the way ``trainer``'s student is trained, or a source (a cache) checked against
    its student, training set, tokenizer and ``losses``.

    Args:
        teacher: A frozen model or a :class:`TeacherSource`.
        trainer: The trainer whose student the teacher teaches (its accelerator, model, data and tokenizer).
        losses: The losses that read this teacher (a cache checks it holds what they need).

    Returns:
        The teacher as a :class:`TeacherSource`: a model wrapped as a :class:`~hf_kd.teachers.LiveTeacher`, or the
            source itself, attached to ``trainer``.
    """
    if not isinstance(teacher, TeacherSource):
        from .live import LiveTeacher

        return LiveTeacher(prepare_teacher(teacher, trainer.accelerator))
    if hasattr(teacher, "check_compatible"):  # a cache: same examples, vocabulary and tokenizer
        # Several trained members (a graph's nodes) share one output space: the cache is checked against one.
        members = getattr(trainer, "members", None)
        student = members.reference if members is not None else trainer.accelerator.unwrap_model(trainer.model)
        teacher.check_compatible(
            student=student,
            train_dataset=trainer.train_dataset,
            tokenizer=trainer.processing_class,
            losses=list(losses),
        )
    teacher.attach(trainer)
    return teacher


def looks_like_local_path(name: str) -> bool:
    """A name that can only mean a folder: absolute, relative with ./ or ../, home-relative, or with more than one
    '/' (a Hub repo id is ``owner/name``).

    Args:
        name: A model's path or Hub repo id.

    Returns:
        Whether ``name`` can only be a local path.
    """
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def check_materialized(model: nn.Module, role: str) -> None:
    """Refuse a model whose weights are on the meta device (built under ``init_empty_weights`` or
    ``device_map="meta"``): its outputs would be empty tensors, not numbers.

    Args:
        model: The model to check.
        role: What the model is (``"teacher"``, ``"student"``), for the message.

    Raises:
        ValueError: some of its parameters are on the meta device.
    """
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

    Args:
        teacher: A frozen teacher model.
        accelerator: The trainer's :class:`accelerate.Accelerator`.

    Returns:
        The placed teacher: a DeepSpeed engine under DeepSpeed, else the model as Accelerate prepared it.

    Raises:
        ValueError: the DeepSpeed config sizes ZeRO buckets ``"auto"`` and the teacher's config has no hidden size.
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
    """The model inside a DeepSpeed engine or DDP wrapper.

    Args:
        model: A model, wrapped or not.

    Returns:
        Its ``module`` when it wraps one, else ``model``.
    """
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def use_eager_attention(model: nn.Module) -> None:
    """Switch a transformers model to eager attention: sdpa and flash kernels return no attention weights.

    Args:
        model: A transformers model (a PEFT model's base model is switched); a model without
            ``set_attn_implementation`` is left as it is.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation("eager")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the teacher is never trained.

    Args:
        model: The teacher.

    Returns:
        ``model`` itself, frozen in place.
    """
    model.eval()
    model.requires_grad_(False)
    return model
