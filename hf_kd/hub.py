"""Model cards for distilled students, rendered with ``huggingface_hub.ModelCard`` from ``model_cards/``."""

from __future__ import annotations

import os
from importlib import resources

from huggingface_hub import ModelCard, ModelCardData

from .evaluation import markdown_table


def card_template_path(name: str = "student.md") -> str:
    """Path of a card template shipped in ``model_cards/`` (installed as ``hf_kd.model_cards``).

    Args:
        name: The template's file name.

    Returns:
        The template's path.
    """
    return str(resources.files("hf_kd.model_cards").joinpath(name))


def hub_url(model_id: str | None) -> str | None:
    """The Hub page of ``model_id`` when it looks like a repo id (``owner/name``) and not a local path.

    Args:
        model_id: A repo id, a local path or ``None``.

    Returns:
        ``https://huggingface.co/OWNER/NAME``, or ``None``.
    """
    if not model_id or os.path.exists(model_id) or model_id.count("/") != 1 or model_id.startswith((".", "/")):
        return None
    return f"https://huggingface.co/{model_id}"


def _parameters(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"


def _describe_data(description: str | None, datasets: list[str] | None, configs: str | list[str] | None) -> str:
    text = description or (", ".join(datasets) if datasets else "–")
    if configs:
        text += f" (configuration: {configs if isinstance(configs, str) else ', '.join(configs)})"
    return text


def render_student_card(
    summary: dict,
    losses: list,
    *,
    repo_id: str,
    auto_class: str,
    comparison: dict[str, dict] | None = None,
    eval_examples: int | None = None,
    dataset: str | list[str] | None = None,
    dataset_description: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    device: str | None = None,
    dataset_configs: str | list[str] | None = None,
    base_model: str | None = None,
    pipeline_tag: str | None = None,
    picture: str | None = None,
    teacher_name: str | None = None,
    teacher_lineage: str | None = None,
) -> ModelCard:
    """A card saying what the student was distilled from, with which losses, on what data, and how it compares.

    Args:
        summary: :meth:`DistillationTrainer.distillation_summary` (teacher, sizes, objective, losses, lineage,
            scheme).
        losses: The built loss modules, in ``summary["losses"]``'s order (for their papers).
        repo_id: The student's repo id (its last part names the model).
        auto_class: The Auto class that loads the student, for the card's usage snippet.
        comparison: Row names (teacher, student) → :func:`~hf_kd.evaluation.evaluate_model` rows.
        eval_examples: How many examples the comparison was measured on.
        dataset: The training data's Hub id(s), for the card's metadata.
        dataset_description: How to name the data in the text (by default, ``dataset``).
        tags: Tags added to ``hf_kd`` and ``knowledge-distillation``.
        license: The student's license.
        language: The student's language(s).
        device: The device the latencies were measured on.
        dataset_configs: The data's configurations, named beside the data.
        base_model: The card's base model (by default the teacher, or a PEFT student's base, when it is a Hub repo).
        pipeline_tag: The card's pipeline tag.
        picture: The file name of the comparison's quality–latency picture, uploaded beside the card.
        teacher_name: What the teacher is, where ``summary["teacher"]`` is only where it was loaded from (a local
            copy): its Hub id names and links it, and is the default base model. By default, for a folder that
            ``hf_kd.pretrained`` exported from a package, the original's Hub id
            (:func:`~hf_kd.pretrained.export_source`).
        teacher_lineage: How the teacher that taught relates to ``teacher_name`` (converted from the package it
            shipped in), said beside the teacher. By default, an exported folder's lineage.

    Returns:
        The rendered ``huggingface_hub.ModelCard``.
    """
    if teacher_name is None and teacher_lineage is None and summary["teacher"]:
        from .pretrained import export_source  # the packaged teachers: the card names the original, not the copy

        source = export_source(summary["teacher"]) if os.path.isdir(summary["teacher"]) else None
        if source is not None:
            teacher_name, teacher_lineage = source["hub_id"], source["lineage"]
    teacher = teacher_name or summary["teacher"] or "a teacher model"
    teacher_url = hub_url(teacher)
    tags = list(dict.fromkeys(["hf_kd", "knowledge-distillation", *(tags or [])]))
    adapter = summary.get("adapter")
    if adapter:
        adapter = {**adapter, "parameters": _parameters(adapter["parameters"])}
        default_base = adapter["base_model"] if hub_url(adapter["base_model"]) else None
    else:
        default_base = teacher if teacher_url else None
    card_data = ModelCardData(
        base_model=base_model if base_model is not None else default_base,
        pipeline_tag=pipeline_tag,
        library_name="peft" if adapter else "transformers",
        tags=tags,
        datasets=[dataset] if isinstance(dataset, str) else dataset,
        license=license,
        language=language,
        model_name=repo_id.split("/")[-1],
    )
    weight_ce, weight_kd = summary["label_loss_weight"], summary["distillation_weight"]
    objective = f"{weight_ce:g}·CE + {weight_kd:g}·Σ wᵢ·Lᵢ"
    rows = []
    for entry, loss in zip(summary["losses"], losses):
        options = {key: value for key, value in entry.items() if key not in ("name", "weight")}
        rows.append(
            {
                "name": entry["name"],
                "weight": f"{entry['weight']:g}",
                "options": ", ".join(f"{key}={value}" for key, value in options.items()) or "–",
                "paper": loss.paper or "–",
            }
        )
    columns = None
    if comparison:
        metric_names = [key for key in next(iter(comparison.values())) if key not in ("parameters", "ms_per_example")]
        columns = [*metric_names, "parameters", "ms_per_example"]
    return ModelCard.from_template(
        card_data,
        template_path=card_template_path(),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        teacher=teacher,
        teacher_url=teacher_url,
        teacher_lineage=teacher_lineage,
        teacher_class=summary["teacher_class"],
        teacher_parameters=_parameters(summary["teacher_parameters"]) if summary["teacher_parameters"] else None,
        student_parameters=_parameters(summary["student_parameters"]),
        # A served teacher's size is known only when given (ServedTeacher(parameters=...)): no share without it.
        compression=f"{summary['student_parameters'] / summary['teacher_parameters']:.1%}"
        if summary["teacher_parameters"]
        else None,
        objective=objective,
        temperature=summary["temperature"],
        dataset_description=_describe_data(dataset_description, card_data.datasets, dataset_configs),
        steps=summary.get("steps", "–"),
        engine=summary.get("engine"),
        losses=rows,
        comparison=markdown_table(comparison, columns) if comparison else None,
        picture=picture,
        eval_examples=eval_examples,
        device=device,
        auto_class=auto_class,
        adapter=adapter,
        papers=sorted({loss.paper for loss in losses if loss.paper}),
        lineage=_lineage_rows(summary),
        scheme=_scheme_line(summary.get("scheme")),
    )


def _scheme_line(scheme: dict | None) -> str | None:
    """``born_again (generations=3, ensemble_last=False)``: the scheme and its settings, for the card."""
    if not scheme:
        return None
    settings = ", ".join(f"{key}={value}" for key, value in scheme.items() if key != "name")
    return f"`{scheme['name']}`" + (f" ({settings})" if settings else "")


_TIMING_METRICS = ("runtime", "per_second", "epoch")


def _lineage_rows(summary: dict) -> list[dict] | None:
    """The card's lineage table: every stage before this student (teacher assistant, born-again, noisy student)
    and this student, with their evaluation metrics (timings left out)."""
    if not summary.get("lineage"):
        return None

    def metrics(values: dict) -> str:
        shown = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not k.endswith(_TIMING_METRICS)}
        return ", ".join(f"{key} {value:.4g}" for key, value in shown.items()) or "–"

    rows = []
    this = {
        "stage": "this student",
        "class": summary.get("student_class"),
        "parameters": summary["student_parameters"],
        "metrics": summary.get("metrics", {}),
    }
    for entry in [*summary["lineage"], this]:
        parameters = entry.get("parameters")
        rows.append(
            {
                "stage": entry["stage"],
                "model": entry.get("class") or entry.get("source") or "–",
                "parameters": _parameters(parameters) if parameters else "–",
                "metrics": metrics(entry.get("metrics", {})),
            }
        )
    return rows
