"""``DistillationConfig``: the training arguments plus everything distillation adds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import TrainingArguments

from .losses import get_loss, resolve_loss_class
from .losses.registry import check_loss_options, with_default_temperature

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LossSpec:
    """One configured loss.

    Args:
        name: The loss's registry id (``"kl"``, ``"hidden_mse"``, ...) or the dotted path of a loss class.
        weight: Its weight wᵢ in the total; ``None``: the loss class's ``default_weight`` (the value of its paper).
        options: Keyword arguments of the loss class (``{"beta": 0.9}``, ``{"layer_map": "last"}``).
        teacher: The name (in ``teacher_model``'s mapping) of the teacher it reads; ``None``: every teacher, one
            term each (or the combined teacher, with several teachers and a logit loss).
    """

    name: str
    weight: float | None = None  # None: the loss class's default_weight (the value of its paper)
    options: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec as one flat dict, the form ``losses`` takes and JSON stores.

        Returns:
            ``{"name": ..., "weight": ..., "teacher": ... (only when set), **options}``.
        """
        teacher = {} if self.teacher is None else {"teacher": self.teacher}
        return {"name": self.name, "weight": self.weight, **teacher, **self.options}


def parse_losses(value: str | list | None, *, trust_imports: bool = False) -> list[LossSpec]:
    """Read losses from Python, YAML or the command line.

    Accepted forms: a list of ``{"name": ..., "weight": ..., "teacher": ..., **options}`` dicts (or bare names); a
    JSON list of such dicts; or the compact command-line form ``"kl:1.0,jsd:0.5:beta=0.9,hint:1:teacher=vit"``
    (``name[:weight][:key=value ...]`` separated by commas). Every name is resolved here: a registered id, or a
    dotted path to a class of an imported module (``trust_imports``: of any module, imported if need be; see
    :func:`~hf_kd.losses.resolve_loss_class`).

    Args:
        value: The losses in one of the forms above; ``None``: ``kl`` with weight 1.
        trust_imports: Let a dotted class path import its module.

    Returns:
        A list of :class:`LossSpec`, one per loss, in order; a weight left unset is the loss class's
            ``default_weight``.

    Raises:
        ValueError: JSON that does not parse, an entry without a name, a weight that is not a number, an entry of
            another type, or a name that resolves to no loss.
    """
    if value is None:
        return [LossSpec("kl", 1.0)]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"losses looks like a JSON list but does not parse ({error.msg} at character {error.pos}): "
                    f'{text!r}. Write it as JSON, e.g. \'[{{"name": "kl", "weight": 1.0}}]\', or in the '
                    "compact form 'kl:1.0,hidden_mse:0.5:layer_map=last'."
                ) from None
        else:
            value = [_parse_compact(item) for item in text.split(",") if item.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"losses must be a list or a string such as 'kl:1.0,logit_mse:0.5', got {value!r}.")
    specs = []
    for item in value:
        if isinstance(item, LossSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.append(LossSpec(item))
        elif isinstance(item, dict):
            options = dict(item)
            if "name" not in options:
                raise ValueError(f"each entry of losses needs a 'name', got {item!r}.")
            name = options.pop("name")
            weight = options.pop("weight", None)
            teacher = options.pop("teacher", None)
            options.update(options.pop("kwargs", {}) or {})
            try:
                weight = None if weight is None else float(weight)
            except (TypeError, ValueError):
                raise ValueError(f"the weight of loss {name!r} must be a number, got {weight!r}.") from None
            specs.append(LossSpec(str(name), weight, options, None if teacher is None else str(teacher)))
        else:
            raise ValueError(f"cannot read loss entry {item!r}: give a name, a dict or a LossSpec.")
    classes = [resolve_loss_class(spec.name, trust_imports=trust_imports) for spec in specs]
    return [
        spec if spec.weight is not None else LossSpec(spec.name, cls.default_weight, spec.options, spec.teacher)
        for spec, cls in zip(specs, classes)
    ]


def _parse_compact(item: str) -> dict[str, Any]:
    name, *rest = item.strip().split(":")
    entry: dict[str, Any] = {"name": name.strip()}
    for part in rest:
        if "=" in part:
            key, _, raw = part.partition("=")
            entry[key.strip()] = yaml.safe_load(raw)
        else:
            try:
                entry["weight"] = float(part)
            except ValueError:
                raise ValueError(f"in losses entry {item!r}: {part!r} is neither a weight nor key=value.") from None
    return entry


# The convex mix used when neither alpha nor hard_label_weight is set: with kl, 0.1·CE + 0.9·KD beat 0.5/0.5 (and the
# former default CE + KD) at τ 1, 2 and 4 on label-starved digits, BBC News and tweets over 3 seeds
# (benchmarks/defaults_sweep.py; the table in docs/loss.md).
DEFAULT_ALPHA = 0.9


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments for :class:`~hf_kd.DistillationTrainer`.

    The total loss is ``(1 − alpha)·CE + alpha·Σ wᵢ·Lᵢ`` (convex form; alpha is :data:`DEFAULT_ALPHA` = 0.9 unless
    set), or ``hard_label_weight·CE + Σ wᵢ·Lᵢ`` when ``hard_label_weight`` is set (additive form). CE is the
    student's own loss on the labels (cross-entropy for classification and language modelling); it is skipped for
    batches without labels, e.g. an unlabeled transfer set. Every argument of
    :class:`transformers.TrainingArguments` is accepted too; the arguments below are what distillation adds (each
    documented by its command-line help).

    Args:
        teacher_model_name_or_path: Teacher to load with from_pretrained when DistillationTrainer gets no teacher_model.
        teacher_dtype: dtype to run the teacher in: auto (a loaded teacher keeps its saved dtype, a given model its
            own), float32, bfloat16 or float16.
        temperature: Softmax temperature τ shared by the losses (a loss's own 'temperature' option wins).
        alpha: Convex mix (1 - alpha)·CE + alpha·KD with 0 <= alpha <= 1; 0.9 when neither alpha nor
            hard_label_weight is set. At 0 the student trains on its labels alone and the teachers are not run in
            training (evaluation still reports the terms).
        hard_label_weight: γ in the additive form γ·CE + Σ wᵢ·Lᵢ (1 gives CE + KD). Cannot be combined with alpha.
        losses: Distillation losses: 'kl:1.0,logit_mse:0.5' (`name[:weight][:key=value]`) or a JSON/YAML list of
            {name, weight, ...options}. Default: kl with weight 1.
        trust_loss_imports: Let a dotted loss path (my_pkg.losses.MyLoss) import its module. Off by default: a path
            resolves only in a module your code has already imported, since importing runs the module's top-level
            code (and would pick up a .py of that name in the working directory).
        distillation_rampup_steps: Ramp the distillation terms' weight up over the first N optimizer steps by
            exp(-5(1 - t/N)^2) (Laine & Aila 2017; the mean teacher's consistency ramp-up), 1 afterwards. 0: no ramp.
        chunk_size: Causal LMs: compute the label loss and logit losses from the final hidden states and LM heads in
            chunks of this many supervised tokens, never holding the B×T×V logits of either model (values and
            gradients equal the plain path). Logit losses only.
        on_policy_fraction: GKD's λ: the fraction of optimizer steps whose batches are replaced by the student's own
            sampled continuations of their prompts, scored by the teacher (causal and seq2seq LMs; labels must be
            -100 on the prompt). Use with jsd/reverse_kl for on-policy distillation.
        generation_max_new_tokens: On-policy rollouts: tokens the student samples per prompt.
        generation_temperature: On-policy rollouts: sampling temperature (0 for greedy decoding).
        generation_top_k: On-policy rollouts: top-k sampling.
        generation_top_p: On-policy rollouts: nucleus sampling.
        teacher_aggregation: Several teachers: how logit losses combine them, per position: mean_probs (the mean of
            their softened distributions), mean_logits, weighted (by teacher_weights), adaptive (from each teacher's
            cross-entropy on the labels) or best (the teacher that is right, most confidently). See
            hf_kd.teachers.ensemble.
        teacher_weights: teacher_aggregation='weighted': one weight per teacher, in teacher_model's order.
        adaptive_temperature: teacher_aggregation='adaptive': τ_w in the weights softmax(−CE/τ_w).
        adaptive_confidence: teacher_aggregation='adaptive': on unlabeled positions, also weigh each teacher by its
            confidence (max probability) there, beside its reliability on the labels so far.
        check_finite: Stop training with an error naming the term (and whether the teacher or the student produced
            it) as soon as a loss term or the teacher's outputs are NaN or infinite (-inf logits of masked vocabulary
            entries are allowed). One device-to-host sync and one pass over the teacher's outputs per micro-batch;
            turn off only to measure that cost.
        token_level: Whether logits are per token (B×T×V). Default: detected from the student's class (causal LM,
            seq2seq LM, masked LM, token classification).

    Raises:
        ValueError: a setting out of its range or that cannot take effect (no losses, an unknown loss or option, a
            negative or non-finite weight, temperature <= 0, alpha outside [0, 1] or set with hard_label_weight,
            teacher-aggregation settings :func:`~hf_kd.teachers.ensemble.check_aggregation` refuses, chunk_size
            with label smoothing, an unknown teacher_dtype, ...), naming the value and what to set instead.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher to load with from_pretrained when DistillationTrainer gets no teacher_model."},
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype to run the teacher in: auto (a loaded teacher keeps its saved dtype, a given model its "
            "own), float32, bfloat16 or float16.",
            "choices": list(TEACHER_DTYPES),
        },
    )
    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature τ shared by the losses (a loss's own 'temperature' option wins)."},
    )
    alpha: float | None = field(
        default=None,
        metadata={
            "help": "Convex mix (1 - alpha)·CE + alpha·KD with 0 <= alpha <= 1; 0.9 when neither alpha nor "
            "hard_label_weight is set. At 0 the student trains on its labels alone and the teachers are not run in "
            "training (evaluation still reports the terms)."
        },
    )
    hard_label_weight: float | None = field(
        default=None,
        metadata={"help": "γ in the additive form γ·CE + Σ wᵢ·Lᵢ (1 gives CE + KD). Cannot be combined with alpha."},
    )
    losses: list[dict] | str | None = field(
        default=None,
        metadata={
            "help": "Distillation losses: 'kl:1.0,logit_mse:0.5' (`name[:weight][:key=value]`) or a JSON/YAML "
            "list of {name, weight, ...options}. Default: kl with weight 1."
        },
    )
    trust_loss_imports: bool = field(
        default=False,
        metadata={
            "help": "Let a dotted loss path (my_pkg.losses.MyLoss) import its module. Off by default: a path "
            "resolves only in a module your code has already imported, since importing runs the module's "
            "top-level code (and would pick up a .py of that name in the working directory)."
        },
    )
    distillation_rampup_steps: int = field(
        default=0,
        metadata={
            "help": "Ramp the distillation terms' weight up over the first N optimizer steps by exp(-5(1 - t/N)^2) "
            "(Laine & Aila 2017; the mean teacher's consistency ramp-up), 1 afterwards. 0: no ramp."
        },
    )
    chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Causal LMs: compute the label loss and logit losses from the final hidden states and LM "
            "heads in chunks of this many supervised tokens, never holding the B×T×V logits of either model "
            "(values and gradients equal the plain path). Logit losses only."
        },
    )
    on_policy_fraction: float = field(
        default=0.0,
        metadata={
            "help": "GKD's λ: the fraction of optimizer steps whose batches are replaced by the student's own "
            "sampled continuations of their prompts, scored by the teacher (causal and seq2seq LMs; labels must be "
            "-100 on the prompt). Use with jsd/reverse_kl for on-policy distillation."
        },
    )
    generation_max_new_tokens: int = field(
        default=64, metadata={"help": "On-policy rollouts: tokens the student samples per prompt."}
    )
    generation_temperature: float = field(
        default=1.0, metadata={"help": "On-policy rollouts: sampling temperature (0 for greedy decoding)."}
    )
    generation_top_k: int | None = field(default=None, metadata={"help": "On-policy rollouts: top-k sampling."})
    generation_top_p: float | None = field(default=None, metadata={"help": "On-policy rollouts: nucleus sampling."})
    teacher_aggregation: str = field(
        default="mean_probs",
        metadata={
            "help": "Several teachers: how logit losses combine them, per position: mean_probs (the mean of their "
            "softened distributions), mean_logits, weighted (by teacher_weights), adaptive (from each teacher's "
            "cross-entropy on the labels) or best (the teacher that is right, most confidently). See "
            "hf_kd.teachers.ensemble.",
            "choices": ["mean_probs", "mean_logits", "weighted", "adaptive", "best"],
        },
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={"help": "teacher_aggregation='weighted': one weight per teacher, in teacher_model's order."},
    )
    adaptive_temperature: float = field(
        default=1.0,
        metadata={"help": "teacher_aggregation='adaptive': τ_w in the weights softmax(−CE/τ_w)."},
    )
    adaptive_confidence: bool = field(
        default=False,
        metadata={
            "help": "teacher_aggregation='adaptive': on unlabeled positions, also weigh each teacher by its "
            "confidence (max probability) there, beside its reliability on the labels so far."
        },
    )
    check_finite: bool = field(
        default=True,
        metadata={
            "help": "Stop training with an error naming the term (and whether the teacher or the student produced "
            "it) as soon as a loss term or the teacher's outputs are NaN or infinite (-inf logits of masked "
            "vocabulary entries are allowed). One device-to-host sync and one pass over the teacher's outputs "
            "per micro-batch; turn off only to measure that cost."
        },
    )
    token_level: bool | None = field(
        default=None,
        metadata={
            "help": "Whether logits are per token (B×T×V). Default: detected from the student's class "
            "(causal LM, seq2seq LM, masked LM, token classification)."
        },
    )

    def __post_init__(self):
        if (
            isinstance(self.losses, str)
            and not self.losses.strip()
            or isinstance(self.losses, (list, tuple))
            and (len(self.losses) == 0)
        ):
            raise ValueError(
                f"losses is empty ({self.losses!r}): a DistillationTrainer needs at least one distillation loss "
                "(leave losses unset for kl). To train the student on its labels alone, use transformers.Trainer."
            )
        specs = parse_losses(self.losses, trust_imports=self.trust_loss_imports)  # unknown ids: lists the valid ones
        for spec in specs:
            if not (math.isfinite(spec.weight) and spec.weight >= 0):
                raise ValueError(
                    f"losses: the weight of {spec.name!r} must be a finite number >= 0, got {spec.weight}."
                )
            check_loss_options(spec.name, spec.options)  # a typo fails here, not at the first step
        # Stored as plain dicts so the config serialises to JSON (checkpoints, model cards).
        self.losses = [spec.to_dict() for spec in specs]
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be a finite number > 0, got {self.temperature}; 1.0 means no softening."
            )
        for spec in specs:  # the options' values too (sink_keys=-1, layer_map="middle"): refused at the parse
            try:
                get_loss(spec.name, **with_default_temperature(spec, self.temperature))
            except ValueError as error:
                raise ValueError(f"losses: {spec.name}: {error}") from error
        if self.alpha is not None:
            if not 0.0 <= self.alpha <= 1.0:  # False for NaN too
                raise ValueError(
                    f"alpha must lie in [0, 1], got {self.alpha}; or leave it unset and use "
                    "hard_label_weight for the additive form."
                )
            if self.hard_label_weight is not None:
                raise ValueError("set either alpha (convex form) or hard_label_weight (additive form), not both.")
        elif self.hard_label_weight is not None and not (
            math.isfinite(self.hard_label_weight) and self.hard_label_weight >= 0
        ):
            raise ValueError(f"hard_label_weight must be a finite number >= 0, got {self.hard_label_weight}.")
        from .teachers.ensemble import check_aggregation

        self.teacher_weights = check_aggregation(
            self.teacher_aggregation, self.teacher_weights, self.adaptive_temperature
        )
        if not (isinstance(self.distillation_rampup_steps, int) and self.distillation_rampup_steps >= 0):
            raise ValueError(
                "distillation_rampup_steps must be an integer >= 0 (0: no ramp), got "
                f"{self.distillation_rampup_steps!r}."
            )
        if self.chunk_size is not None and self.label_smoothing_factor > 0:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} is not applied on the chunk_size path, "
                "whose label loss is the plain cross-entropy: leave chunk_size unset to smooth the labels, or set "
                "label_smoothing_factor=0."
            )
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {self.chunk_size}.")
        if not 0.0 <= self.on_policy_fraction <= 1.0:  # False for NaN too
            raise ValueError(f"on_policy_fraction must lie in [0, 1], got {self.on_policy_fraction}.")
        if self.generation_max_new_tokens <= 0 or not (
            math.isfinite(self.generation_temperature) and self.generation_temperature >= 0
        ):
            raise ValueError(
                "generation_max_new_tokens must be > 0 and generation_temperature >= 0, got "
                f"{self.generation_max_new_tokens} and {self.generation_temperature}."
            )
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}.")
        super().__post_init__()

    @property
    def generation_kwargs(self) -> dict:
        """``generate`` arguments of on-policy rollouts (sampling options only when sampling)."""
        kwargs = {"max_new_tokens": self.generation_max_new_tokens, "do_sample": self.generation_temperature > 0}
        if self.generation_temperature > 0:
            kwargs["temperature"] = self.generation_temperature
            if self.generation_top_k is not None:
                kwargs["top_k"] = self.generation_top_k
            if self.generation_top_p is not None:
                kwargs["top_p"] = self.generation_top_p
        return kwargs

    @property
    def loss_specs(self) -> list[LossSpec]:
        """``losses`` read back as :class:`LossSpec` objects."""
        return parse_losses(self.losses, trust_imports=self.trust_loss_imports)

    @property
    def label_loss_weight(self) -> float:
        """The weight of the student's own label loss: 1 − alpha, or hard_label_weight in the additive form."""
        if self.hard_label_weight is not None:
            return self.hard_label_weight
        return 1.0 - (DEFAULT_ALPHA if self.alpha is None else self.alpha)

    @property
    def distillation_weight(self) -> float:
        """The factor on Σ wᵢ·Lᵢ: alpha in the convex form (:data:`DEFAULT_ALPHA` unless set), 1 in the additive
        form."""
        if self.hard_label_weight is not None:
            return 1.0
        return DEFAULT_ALPHA if self.alpha is None else self.alpha
