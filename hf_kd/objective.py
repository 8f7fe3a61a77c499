"""The distillation objective: terms (name, weight, loss, teacher) and the one mix of them into the total.

``total = label_weight·CE + distillation_weight·Σ wᵢ·Lᵢ`` (see :class:`~hf_kd.DistillationConfig`). The plain and the
chunked path of the trainer compute the terms' values differently and hand them here to be normalised and mixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .checks import compares_logits_entrywise
from .config import LossSpec
from .features import ModelFeatures, SparseDistribution, finite_outputs, non_finite_fields
from .losses import DistillationLoss, get_loss
from .losses.registry import with_default_temperature
from .losses.response import thresholded
from .positions import ItemCounts
from .teachers.ensemble import ENSEMBLE, TeacherAggregator

LABEL_TERM = "ce"
WEIGHT_PREFIX = "teacher_weight/"  # each teacher's mean weight in the ensemble, logged
CONFIDENT_PREFIX = "confident/"  # the share of positions a confidence_threshold keeps, logged per term


@dataclass(frozen=True)
class Term:
    """One distillation term.

    Args:
        name: Its log name (``kl``, ``hidden_mse/vit``, ``kl_2`` for a repeated id).
        weight: Its weight wᵢ in the total.
        loss: The loss module.
        teacher: The name of the teacher it reads (:data:`~hf_kd.teachers.ensemble.ENSEMBLE` for the combined one).
    """

    name: str
    weight: float
    loss: DistillationLoss
    teacher: str


class Objective:
    """The configured terms over named teachers; ``losses`` holds their modules (learned parts included).

    With several teachers, a logit loss that names none reads their combination (:data:`ENSEMBLE`, made by
    ``aggregator``: one term, logged under the loss's name); any other loss that names none is one term per
    teacher (``hidden_mse/vit``), each with its own layer map and projector. A loss that names a teacher reads it.

    Args:
        specs: The configured losses.
        teachers: The teachers' names, in order.
        args: The :class:`~hf_kd.DistillationConfig` (its temperature, distillation weight and ramp-up).
        aggregator: Combines several teachers' logits for the logit losses; ignored with one teacher.

    Raises:
        ValueError: a loss names a teacher that is not among ``teachers``, or an option the loss refuses.
    """

    def __init__(self, specs: list[LossSpec], teachers: list[str], args, aggregator: TeacherAggregator | None = None):
        unknown = sorted({spec.teacher for spec in specs if spec.teacher is not None} - set(teachers))
        if unknown:
            raise ValueError(f"losses name the teachers {unknown}, which are not among the teachers {teachers}.")
        temperature, self.distillation_weight = args.temperature, args.distillation_weight
        self.rampup_steps = args.distillation_rampup_steps
        self.teachers = list(teachers)
        self.aggregator = aggregator if len(self.teachers) > 1 else None
        terms, earlier = [], []
        for spec in specs:
            probe = get_loss(spec.name, **with_default_temperature(spec, temperature))
            if spec.teacher is not None:
                readers = [spec.teacher]
            elif len(self.teachers) > 1 and compares_logits_entrywise(probe):
                readers = [ENSEMBLE]
            else:
                readers = self.teachers
            for index, teacher in enumerate(readers):
                loss = probe if index == 0 else get_loss(spec.name, **with_default_temperature(spec, temperature))
                base = _log_name(spec.name, [name for other, name in earlier if other == teacher])
                earlier.append((teacher, spec.name))
                name = base if teacher == ENSEMBLE or len(self.teachers) == 1 else f"{base}/{teacher}"
                terms.append(Term(name, spec.weight, loss, teacher))
        self.terms = terms
        self.losses = nn.ModuleList(term.loss for term in terms)

    @property
    def names(self) -> list[str]:
        """The terms' log names, in order."""
        return [term.name for term in self.terms]

    @property
    def logged_names(self) -> list[str]:
        """Every name the term log carries: the label loss, the terms, each teacher's mean ensemble weight."""
        weights = [f"{WEIGHT_PREFIX}{name}" for name in self.teachers] if self.reads_ensemble else []
        return [LABEL_TERM, *self.names, *weights, *self.confident_names]

    @property
    def confident_names(self) -> list[str]:
        """``confident/TERM`` for each term with a ``confidence_threshold``: the share of positions it keeps."""
        return [f"{CONFIDENT_PREFIX}{term.name}" for term in self.terms if thresholded(term.loss)]

    @property
    def reads_ensemble(self) -> bool:
        """Whether a term reads the combined teacher."""
        return any(term.teacher == ENSEMBLE for term in self.terms)

    def terms_of(self, teacher: str) -> list[Term]:
        """The terms that read ``teacher``'s outputs: its own, and the ensemble's, which combine its logits.

        Args:
            teacher: A teacher's name.

        Returns:
            The terms, in order.
        """
        return [term for term in self.terms if term.teacher in (teacher, ENSEMBLE)]

    def needs(self, side: str, teacher: str | None = None) -> frozenset[str]:
        """The features the terms read from the student or from one teacher.

        Args:
            side: ``"student"`` or ``"teacher"``.
            teacher: With ``side="teacher"``, the teacher whose terms count; ``None``: every term.

        Returns:
            The union of the terms' feature needs.
        """
        terms = self.terms if teacher is None else self.terms_of(teacher)
        return frozenset().union(*(term.loss.side_needs(side) for term in terms))

    def ensemble(self, teachers: dict[str, ModelFeatures], labels, mask=None, accelerator=None):
        """The combined teacher for the ensemble terms, and each teacher's mean weight.

        The teachers' logits are combined per position by the aggregator, once per temperature a term softens at.

        Args:
            teachers: Each teacher's features.
            labels: The batch's labels (class ids of the logits' positions are evidence for adaptive weights).
            mask: The distilled positions, over which the mean weights are taken; ``None``: all.
            accelerator: Sums the aggregator's reliability statistics over processes.

        Returns:
            ``({temperature: combined teacher features}, {"teacher_weight/NAME": mean weight})``.
        """
        outputs = [teachers[name].logits for name in self.teachers]
        outputs = [z if z is not None else teachers[name].sparse_logits for z, name in zip(outputs, self.teachers)]
        shape = teachers[self.teachers[0]].logits_shape
        flat = [z.reshape(-1) if isinstance(z, SparseDistribution) else z.reshape(-1, shape[-1]) for z in outputs]
        position_labels = None
        if labels is not None and not labels.is_floating_point() and tuple(labels.shape) == tuple(shape[:-1]):
            position_labels = labels.reshape(-1)
        weights = self.aggregator(flat, position_labels, accelerator)
        combined = {}
        for term in self.terms:
            temperature = float(getattr(term.loss, "temperature", 1.0))
            if term.teacher == ENSEMBLE and temperature not in combined:
                mixed = self.aggregator.combine(flat, weights, temperature)
                if isinstance(mixed, SparseDistribution):
                    combined[temperature] = ModelFeatures(sparse_logits=mixed.reshape(*shape[:-1]))
                else:
                    combined[temperature] = ModelFeatures(logits=mixed.reshape(shape))
        if mask is not None and tuple(mask.shape) == tuple(shape[:-1]) and mask.any():
            weights = weights[mask.reshape(-1).bool()]
        mean_weights = {f"{WEIGHT_PREFIX}{name}": weights[:, k].mean() for k, name in enumerate(self.teachers)}
        return combined, mean_weights

    def normalise(self, term: Term, value: torch.Tensor, counts: ItemCounts, accumulation: int) -> torch.Tensor:
        """A term's value per item of the whole step.

        Per-position losses return sums (divided by the step's positions, over processes), batch-level losses means
        (divided by the micro-batches).

        Args:
            term: The term.
            value: Its value on one micro-batch.
            counts: The step's item counts.
            accumulation: The number of micro-batches in the step.

        Returns:
            The normalised value.
        """
        if term.loss.per_position:
            return value * counts.scale / counts.positions.clamp(min=1)
        return value / accumulation

    def ramp(self, step: int | None) -> float:
        """The distillation weight's ramp-up factor after ``step`` optimizer steps.

        Args:
            step: Optimizer steps done; ``None`` outside training.

        Returns:
            ``exp(−5(1 − step/N)²)`` for ``N = distillation_rampup_steps``; 1 without a ramp, at and after step N, and
                outside training.
        """
        if not self.rampup_steps or step is None or step >= self.rampup_steps:
            return 1.0
        return math.exp(-5.0 * (1.0 - step / self.rampup_steps) ** 2)

    def total(
        self, terms: dict[str, torch.Tensor], label_weight: float, step: int | None = None
    ) -> torch.Tensor | None:
        """The weighted mix of the computed terms.

        Args:
            terms: Normalised values by term name (``ce`` for the label loss); terms not computed are absent.
            label_weight: The label loss's weight.
            step: Optimizer steps done, for the ramp-up; ``None`` outside training.

        Returns:
            ``label_weight·ce + distillation_weight·ramp·Σ wᵢ·Lᵢ`` over the terms present, or ``None`` when none is.
        """
        total = label_weight * terms[LABEL_TERM] if LABEL_TERM in terms else None
        scale = self.distillation_weight * self.ramp(step)
        for term in self.terms:
            if term.name in terms:
                weighted = scale * term.weight * terms[term.name]
                total = weighted if total is None else total + weighted
        return total


def check_finite(where: str, terms: dict, student: ModelFeatures | None, teachers: dict, mask, device) -> None:
    """Raise before the backward pass (so no update is made) when a term or a teacher's outputs are not finite.

    The error says which term and which model; one host sync when all is well.

    Args:
        where: Where the check runs (``"train step 12"``, ...), for the message.
        terms: The computed terms by name.
        student: The student's features (``None`` on a path that has none).
        teachers: Each teacher's features.
        mask: The distilled positions (logits elsewhere are not checked).
        device: Where to gather the flags.

    Raises:
        FloatingPointError: a non-finite term or teacher output, naming the term and its likely cause.
    """
    flags = [torch.isfinite(value.detach()).all() for value in terms.values()]
    flags += [finite_outputs(features, mask) for features in teachers.values()]
    if not flags or bool(torch.stack([flag.to(device) for flag in flags]).all()):
        return
    bad_terms = {
        name: float(value.detach()) for name, value in terms.items() if not torch.isfinite(value.detach()).all()
    }
    what = ", ".join(f"{name} = {value}" for name, value in bad_terms.items()) or "every loss term is finite"
    broken_teachers = {
        name: fields for name, features in teachers.items() if (fields := non_finite_fields(features, mask))
    }
    broken_student = non_finite_fields(student, mask) if student is not None else []
    if broken_teachers:
        name, fields = next(iter(broken_teachers.items()))
        role = "the teacher" if len(teachers) == 1 else f"the teacher {name!r}"
        cause = (
            f"{role}'s {', '.join(fields)} hold NaN or +inf (a broken teacher, or one that overflows in its dtype: "
            "try teacher_dtype='float32')"
        )
    elif broken_student:
        cause = (
            f"the student's {', '.join(broken_student)} hold NaN or +inf (it diverged: lower learning_rate, set "
            "max_grad_norm, or train in bf16/fp32 rather than fp16)"
        )
    elif LABEL_TERM in bad_terms:  # the student's own label loss: its targets, not a temperature
        cause = (
            f"both models' outputs are finite, so the student's label loss ({LABEL_TERM}) overflowed on the batch's "
            "labels (regression targets too large to square in float32? rescale them)"
        )
    else:
        cause = "both models' outputs are finite, so the loss itself overflowed (a very low temperature?)"
    raise FloatingPointError(
        f"{where}: non-finite distillation ({what}): {cause}. Training stopped before this step's update; the "
        "student's weights hold no NaN."
    )


def _log_name(name: str, earlier: list[str]) -> str:
    """Log name of a loss: its id, its class name for dotted paths, numbered when an id repeats."""
    short = name.rpartition(".")[2]
    repeats = sum(1 for other in earlier if other.rpartition(".")[2] == short)
    return short if repeats == 0 else f"{short}_{repeats + 1}"


def record_confident(term_log, mode: str, name: str, loss: nn.Module, teachers, mask) -> None:
    """Log the share of ``mask``'s positions where ``teachers`` reach ``loss``'s confidence threshold as ``name``:
    kept positions over counted ones, summed over micro-batches and processes (the exact share, not a mean of
    shares). Nothing for a loss without a threshold.

    Args:
        term_log: the trainer's :class:`~hf_kd.term_log.TermLog`.
        mode: ``"train"`` or ``"eval"``.
        name: the logged name (``confident/kl``, ``confident/kl/peer0``).
        loss: the term's loss.
        teachers: the teacher features the term compares with (one, or several averaged by a member).
        mask: bool over the counted positions, or ``None``: all.
    """
    if not thresholded(loss):
        return
    kept = counted = 0.0
    for teacher in teachers:
        confident = loss.confident_mask(teacher, mask)
        kept = kept + confident.float().sum()
        counted = counted + (confident.numel() if mask is None else mask.float().sum())
    term_log.record(mode, {name: kept}, {name: counted})
