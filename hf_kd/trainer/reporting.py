"""What a distillation run reports and shares: its summary (``distillation_config.json``), the teacher-vs-student
comparison, the model card and the push to the Hub. Functions of a :class:`~hf_kd.DistillationTrainer`."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time

from huggingface_hub import HfApi
from torch import nn
from transformers import Trainer

from ..evaluation import count_parameters, draw
from ..hub import render_student_card
from ..model_kinds import auto_class_for
from ..plots import plot_quality_latency

DISTILLATION_CONFIG_NAME = "distillation_config.json"
# The distillation settings of a DistillationConfig that decide a run's result (recorded in set-ups, compared on
# resuming and when a chain reruns a finished stage).
SETUP_FIELDS = (
    "losses",
    "temperature",
    "label_loss_weight",
    "distillation_weight",
    "teacher_aggregation",
    "teacher_weights",
)
HUB_UPLOAD_FOLDER = "_hub_upload"  # what push_to_hub uploads; "_*" is skipped by the Trainer's own pushes
STUDENT_ROLE = "student"


def write_summary(output_dir: str, summary: dict) -> None:
    """``output_dir/distillation_config.json``: the one writer of every saved student's summary (a trainer's
    :meth:`distillation_summary`, a peer's, a model with exits').

    Args:
        output_dir: the folder the student was saved in.
        summary: the JSON-serialisable summary.
    """
    with open(os.path.join(output_dir, DISTILLATION_CONFIG_NAME), "w") as handle:
        json.dump(summary, handle, indent=2)


def distillation_summary(trainer) -> dict:
    """What was distilled from what, with which losses: the content of ``distillation_config.json``. One teacher's
    description is at the top level (``teacher``, ``teacher_class``, ``teacher_parameters``); several teachers
    are listed under ``teachers`` by name.

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.

    Returns:
        The teachers' description followed by :func:`run_summary`'s entries.
    """
    descriptions = {name: source.describe() for name, source in trainer.teachers.items()}
    if len(descriptions) == 1:
        (described,) = descriptions.values()
        teachers = {**described, "teacher": described["teacher"] or trainer.args.teacher_model_name_or_path}
    else:
        teachers = {
            "teacher": ", ".join(description["teacher"] or name for name, description in descriptions.items()),
            "teacher_class": ", ".join(
                dict.fromkeys(description["teacher_class"] for description in descriptions.values())
            ),
            "teacher_parameters": _total_parameters(descriptions.values()),
            "teachers": descriptions,
            "teacher_aggregation": trainer.args.teacher_aggregation,
            **({"teacher_weights": trainer.args.teacher_weights} if trainer.args.teacher_weights else {}),
        }
    return {**teachers, **run_summary(trainer, trainer.student)}


def run_summary(trainer, student: nn.Module) -> dict:
    """The part of a summary about the student and how it was trained (everything but its teachers).

    Args:
        trainer: the trainer that trained ``student`` (its arguments, state and a scheme's stage details).
        student: the unwrapped student.

    Returns:
        The student's class and size, losses, weights, steps, engine, and the adapter, lineage, metrics, stage,
            scheme and set-up where there are any.
    """
    return {
        "student_class": type(student).__name__,
        "student_parameters": count_parameters(student),
        "losses": trainer.args.losses,
        "temperature": trainer.args.temperature,
        "label_loss_weight": trainer.args.label_loss_weight,
        "distillation_weight": trainer.args.distillation_weight,
        "token_level": trainer.token_level,
        "steps": trainer.state.global_step,
        "engine": engine_description(trainer),
        **({"adapter": adapter} if (adapter := adapter_summary(student)) else {}),
        # Set by the multi-stage schemes (hf_kd.schemes.stages): every teacher before this stage, and its metrics.
        **({"lineage": trainer.lineage} if getattr(trainer, "lineage", None) else {}),
        **({"metrics": trainer.stage_metrics} if getattr(trainer, "stage_metrics", None) else {}),
        **({"stage": trainer.stage_details} if getattr(trainer, "stage_details", None) else {}),
        # Set by hf_kd.schemes: the scheme and its settings, and a stage's set-up (compared when a chain reruns).
        **({"scheme": trainer.scheme_config.to_dict()} if getattr(trainer, "scheme_config", None) else {}),
        **({"setup": trainer.stage_setup} if getattr(trainer, "stage_setup", None) else {}),
    }


def engine_description(trainer) -> str:
    """How the student was trained: ``"DeepSpeed ZeRO-3, 8 processes"``, ``"1 process (cuda)"``...

    Args:
        trainer: the Trainer.

    Returns:
        The engine and the number of processes, in words.
    """
    processes = trainer.accelerator.num_processes
    if trainer.is_deepspeed_enabled:
        engine = f"DeepSpeed ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    elif trainer.is_fsdp_enabled:
        engine = f"FSDP{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    elif processes > 1:
        engine = "DDP"
    else:
        return f"1 process ({trainer.args.device.type})"
    return f"{engine}, {processes} processes"


def adapter_summary(model: nn.Module) -> dict | None:
    """Type, base model and trainable parameters of a PEFT student (``None`` for a plain model).

    Args:
        model: the unwrapped student.

    Returns:
        ``{"type", "base_model", "parameters"}`` of the active adapter, or ``None`` for a model without adapters.
    """
    if not hasattr(model, "peft_config") or not hasattr(model, "get_base_model"):
        return None
    config = model.peft_config[getattr(model, "active_adapter", "default")]
    return {
        "type": str(getattr(config.peft_type, "value", config.peft_type)),
        "base_model": config.base_model_name_or_path or getattr(model.get_base_model(), "name_or_path", None),
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def compare_with_teacher(trainer, eval_dataset=None) -> dict[str, dict]:
    """Rows of every teacher that covers evaluation data (a cache does not) and of the student: metrics
    (``compute_metrics``), parameters and ms per example, each model run alone by the trainer's own evaluation loop
    (so under DDP, ZeRO-3 or FSDP every process takes part as in training).

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer` (``comparison`` and ``comparison_examples`` are set).
        eval_dataset: the data to measure on (default: the trainer's ``eval_dataset``).

    Returns:
        One row per model by name (each covering teacher's, then ``"student"``), as :func:`measure_alone` makes.

    Raises:
        ValueError: no evaluation set, here or in the trainer.
    """
    dataset = eval_dataset if eval_dataset is not None else trainer.eval_dataset
    if dataset is None:
        raise ValueError("compare_with_teacher needs an eval_dataset (here or in DistillationTrainer).")
    roles = [name for name, source in trainer.teachers.items() if source.covers_eval] + [STUDENT_ROLE]
    rows = {role: measure_alone(trainer, role, dataset) for role in roles}
    trainer.comparison, trainer.comparison_examples = rows, len(dataset)
    return rows


def measure_alone(trainer, role: str, dataset) -> dict[str, float]:
    """One model's row: its metrics on ``dataset``, parameters and wall-clock ms per example (after one warm-up
    batch, so the latency is not the first call's).

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.
        role: ``"student"``, a teacher's or a member's name.
        dataset: the evaluation data.

    Returns:
        The model's metrics (without loss and timings), ``parameters`` and ``ms_per_example``.
    """
    trainer._comparing = role
    try:
        if hasattr(dataset, "select"):
            warm_up = dataset.select(range(min(trainer.args.per_device_eval_batch_size, len(dataset))))
            trainer.evaluation_loop(trainer.get_eval_dataloader(warm_up), role, metric_key_prefix=role)
        start = time.perf_counter()
        output = trainer.evaluation_loop(trainer.get_eval_dataloader(dataset), role, metric_key_prefix=role)
        seconds = time.perf_counter() - start
    finally:
        trainer._comparing = None
    prefix = f"{role}_"
    row = {
        key.removeprefix(prefix): value
        for key, value in output.metrics.items()
        if key.removeprefix(prefix) not in ("loss", "runtime", "samples_per_second", "steps_per_second")
        and not key.endswith("model_preparation_time")
    }
    row["parameters"] = trainer.parameters_of(role)
    row["ms_per_example"] = 1000 * seconds / len(dataset)
    return row


def create_model_card(trainer, output_dir: str | None = None, **card) -> None:
    """See :meth:`DistillationTrainer.create_model_card`; those of its arguments left out (``None``) fall back to
    ``trainer.model_card_kwargs``.

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.
        output_dir: where ``README.md`` (and the quality-latency plot) are written (default ``args.output_dir``).
        **card: the other arguments of :meth:`~hf_kd.DistillationTrainer.create_model_card`, by name.

    Raises:
        ValueError: ``tasks`` names more than one task.
    """
    if trainer.comparison is None and trainer.eval_dataset is not None:
        compare_with_teacher(trainer)  # on every process: the evaluation is collective
    if not trainer.is_world_process_zero():
        return
    card = {key: value if value is not None else trainer.model_card_kwargs.get(key) for key, value in card.items()}
    tasks, tags = card["tasks"], card["tags"]
    if isinstance(tasks, (list, tuple)) and len(tasks) > 1:
        raise ValueError(f"a model card has one pipeline_tag; tasks={tasks!r} names {len(tasks)}.")
    repo_id = (
        trainer.hub_model_id
        or trainer.args.hub_model_id
        or card["model_name"]
        or os.path.basename(os.path.abspath(trainer.args.output_dir))
    )
    folder = output_dir or trainer.args.output_dir
    picture = None
    if trainer.comparison:  # the teacher-vs-student plane, uploaded beside the card
        first_row = next(iter(trainer.comparison.values()))
        metric = next((key for key in first_row if key not in ("parameters", "ms_per_example")), None)
        stem = os.path.join(folder, "quality_latency")
        if metric is not None and draw(plot_quality_latency, trainer.comparison, metric, stem, formats=("png",)):
            picture = "quality_latency.png"
    rendered = render_student_card(
        trainer.distillation_summary(),
        list(trainer.distillation_losses),
        repo_id=repo_id,
        auto_class=auto_class_for(trainer.student).__name__,
        comparison=trainer.comparison,
        eval_examples=trainer.comparison_examples,
        dataset=card["dataset_tags"] if card["dataset_tags"] is not None else card["dataset"],
        dataset_description=card["dataset_description"],
        dataset_configs=card["dataset_args"],
        tags=[tags] if isinstance(tags, str) else tags,
        license=card["license"],
        language=card["language"],
        device=str(trainer.args.device),
        base_model=card["finetuned_from"],
        pipeline_tag=tasks[0] if isinstance(tasks, (list, tuple)) else tasks,
        picture=picture,
        teacher_name=card["teacher_name"],
        teacher_lineage=card["teacher_lineage"],
    )
    rendered.save(os.path.join(folder, "README.md"))


def push_to_hub(trainer, commit_message, blocking, token, revision, private, create_pr, card_kwargs):
    """See :meth:`DistillationTrainer.push_to_hub`.

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.
        commit_message: the commit's message.
        blocking: wait for the upload (``False``: a future).
        token: the Hub token (None: ``args.hub_token``).
        revision: the branch (None: ``args.hub_revision``).
        private: whether a newly created repository is private.
        create_pr: open a pull request instead of committing.
        card_kwargs: passed to :meth:`~hf_kd.DistillationTrainer.create_model_card`.

    Returns:
        ``upload_folder``'s commit information (or its future); ``None`` on processes other than the main one.

    Raises:
        RuntimeError: the upload failed (the files stay in ``OUTPUT_DIR/_hub_upload``, which the message names).
    """
    folder = os.path.join(trainer.args.output_dir, HUB_UPLOAD_FOLDER)
    if trainer.args.should_save and os.path.isdir(folder):  # the whole folder is uploaded: no earlier push's files
        shutil.rmtree(folder)
    trainer.save_model(folder, _internal_call=True)  # an internal save: the Trainer would push again
    trainer.create_model_card(output_dir=folder, **card_kwargs)  # every process: it may evaluate collectively
    if not trainer.is_world_process_zero():
        return None
    for name in os.listdir(folder):  # what the save wrote beside the student (a self-distilled model's exits)
        if any(fnmatch.fnmatch(name, pattern) for pattern in trainer.unshared_files):
            os.remove(os.path.join(folder, name))
    try:
        if trainer.hub_model_id is None:
            Trainer.init_hf_repo(trainer, token=token, private=private)
        return HfApi().upload_folder(
            repo_id=trainer.hub_model_id,
            folder_path=folder,
            commit_message=commit_message,
            token=token if token is not None else trainer.args.hub_token,
            revision=revision if revision is not None else trainer.args.hub_revision,
            create_pr=create_pr,
            run_as_future=not blocking,
        )
    except Exception as error:  # offline mode, connection refused, HTTP errors: keep the files, say where
        raise RuntimeError(
            f"pushing the student to the Hub failed ({type(error).__name__}: {error}). Nothing local was lost: "
            f"the student, its card and distillation_config.json are in {folder}; push them again with "
            "trainer.push_to_hub() or huggingface_hub.upload_folder."
        ) from error


def _total_parameters(descriptions) -> int | None:
    """The teachers' parameters together; None when one's is unknown (a served teacher without ``parameters=``)."""
    counts = [description["teacher_parameters"] for description in descriptions]
    return None if any(count is None for count in counts) else sum(counts)
