"""Several trained models in one run — peers trained together, a network and its exits — as the one
:class:`~hf_kd.DistillationTrainer` trains them.

The trainer's model is then a :class:`MemberModule`: one module (one optimizer, one DDP wrapper, one checkpoint) whose
forward runs every *member* on the batch and returns each one's outputs (with its own label loss) and logits. A
:class:`TrainedMembers` says who teaches whom: a member's loss is its label loss, plus the configured response losses
towards the *detached* predictions of the members that teach it, plus terms of the scheme (a feature hint); the
run's loss is the sum over members. Since teachers are read detached, a member's parameters that only it uses receive
gradients from its own loss alone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_compatible, check_logit_width
from ..config import DistillationConfig
from ..evaluation import count_parameters
from ..features import ModelFeatures
from ..objective import CONFIDENT_PREFIX, LABEL_TERM, Objective, check_finite, record_confident
from ..positions import ItemCounts, split_sample_index
from ..teachers.ensemble import TeacherAggregator
from ..views import split_views
from .batch_loss import _drop_last_position, label_term, record_terms

MEMBERS = "members"  # the one teacher name the objective's terms read: whichever members teach a member
RESPONSE_ONLY = "kl, reverse_kl, jsd, soft_ce, tvd, prob_mse, logit_mse, dkd"


class MemberModule(nn.Module):
    """A module of named members trained together. Subclasses define :meth:`forward` (``{member: (outputs with
    its label loss, ModelFeatures with its logits)}``), and how a checkpoint holds them
    (:meth:`save_checkpoint`, :meth:`load_checkpoint`: e.g. one ``from_pretrained`` folder per peer)."""

    members: list[str]

    def signature_columns(self) -> list[str]:
        """The data columns the members' forwards take (the Trainer keeps those)."""
        raise NotImplementedError

    def save_checkpoint(self, folder: str, processing_class=None) -> None:
        """Write every member into the checkpoint ``folder``.

        Args:
            folder: the checkpoint folder.
            processing_class: the trainer's tokenizer or processor, saved beside each member.
        """
        raise NotImplementedError

    def load_checkpoint(self, folder: str) -> None:
        """Read every member back from a checkpoint :meth:`save_checkpoint` wrote.

        Args:
            folder: the checkpoint folder.
        """
        raise NotImplementedError


class TrainedMembers:
    """Who teaches whom among the members of a :class:`MemberModule`, and how one member predicts alone.

    Args:
        names: the members, in the module's order.
        reference: one member's model, which tells the task (token level, causal LM, label names).
        extra_terms: names of the scheme's own terms (logged per member as ``NAME/MEMBER``).

    ``scheme`` and ``kind`` name the scheme and its members in messages (``"mutual learning"``, ``"peer"``).
    """

    scheme, kind = "online distillation", "member"
    takes_teachers = False  # whether frozen teachers (live, cached) are nodes beside the members (a graph)

    def __init__(self, names: list[str], reference: nn.Module, extra_terms: tuple[str, ...] = ()):
        self.names, self.reference, self.extra_term_names = list(names), reference, tuple(extra_terms)

    def setup(self) -> dict:
        """What a checkpoint records about the members, compared when a run resumes from it.

        Returns:
            The members' class and names (a graph adds its nodes and edges).
        """
        return {"class": type(self).__name__, "names": self.names}

    def gate(self, term, sources: dict[str, ModelFeatures], labels, progress: float | None):
        """How much of ``term`` a member takes this step: ``(scale, keep)``, ``keep`` a boolean mask of the rows
        (or positions) it reads, or None for all. The base takes all of every term.

        Args:
            term: the objective's term.
            sources: every member's detached prediction (and the frozen teachers'), by name.
            labels: the batch's labels, aligned with the logits' positions (None: unlabeled).
            progress: the share of training done (None outside it).

        Returns:
            ``(scale, keep)``: the factor on the term and the mask of what it reads (None: everything).
        """
        return 1.0, None

    def term_value(self, term, student, teacher, mask, labels, sources: dict[str, ModelFeatures]) -> torch.Tensor:
        """One term of a member against one teacher on a micro-batch (the base: the term's loss as it is; a graph
        weighs a learned edge's positions).

        Args:
            term: the objective's term.
            student: the member's features.
            teacher: the teacher's detached features.
            mask: the positions that count (None: all).
            labels: the batch's labels, aligned with the logits' positions (None: unlabeled).
            sources: every member's detached prediction (and the frozen teachers'), by name.

        Returns:
            The term's value, as its loss returns it (a sum over positions, or a batch mean).
        """
        return term.loss(student, teacher, mask=mask, labels=labels)

    def log_name(self, term: str, member: str) -> str:
        """The logged name of ``member``'s term ``term`` (``kl/peer0``).

        Args:
            term: the term's name (``ce``, ``kl``, ...).
            member: the member's name.

        Returns:
            ``TERM/MEMBER``.
        """
        return f"{term}/{member}"

    def logged_names(self, objective: Objective) -> list[str]:
        """Every name the run logs: each member's label loss, terms and scheme terms.

        Args:
            objective: the run's :class:`~hf_kd.objective.Objective`.

        Returns:
            The names, member by member.
        """
        terms = [LABEL_TERM, *objective.names, *self.extra_term_names, *objective.confident_names]
        return [self.log_name(term, member) for member in self.names for term in terms]

    def teachers_of(self, member: str, detached: dict[str, ModelFeatures], term) -> list[ModelFeatures]:
        """The detached predictions ``member`` learns from with ``term`` (none: it only learns from its labels).

        Args:
            member: the member's name.
            detached: every member's detached prediction (and the frozen teachers'), by name.
            term: the objective's term.

        Returns:
            The predictions of the members that teach ``member`` with ``term``.
        """
        raise NotImplementedError

    def extra_terms(
        self, member: str, results: dict[str, tuple], sources: dict[str, ModelFeatures]
    ) -> dict[str, torch.Tensor]:
        """The scheme's own batch-level terms for ``member`` (named in ``extra_terms``), already weighted.

        Args:
            member: the member's name.
            results: the module's forward output, ``{member: (outputs, ModelFeatures)}``.
            sources: this batch's detached predictions of every member and frozen node, as ``teachers_of`` read
                them.

        Returns:
            Each term's value by name (the base: none).
        """
        return {}

    def logits_alone(self, module: MemberModule, member: str, inputs: dict) -> torch.Tensor:
        """``member``'s logits alone, for its evaluation (called under ``no_grad``).

        Args:
            module: the trainer's (unwrapped) :class:`MemberModule`.
            member: the member's name.
            inputs: the batch, without labels.
        """
        raise NotImplementedError

    def model_of(self, module: MemberModule, member: str) -> nn.Module:
        """The model (or part) that is ``member``, for its parameter count.

        Args:
            module: the trainer's (unwrapped) :class:`MemberModule`.
            member: the member's name.
        """
        raise NotImplementedError

    def evaluation_logits(self, detached: dict[str, ModelFeatures]) -> torch.Tensor:
        """What evaluation's ``compute_metrics`` reads for the whole run: the members' mean prediction.

        Args:
            detached: every member's detached prediction, by name.

        Returns:
            Logits whose softmax is the mean of the members' probabilities.
        """
        return mean_prediction(list(detached.values()), 1.0)

    def objective(self, args: DistillationConfig) -> Objective:
        """The configured losses, each read between a member and the members that teach it.

        Args:
            args: the run's :class:`~hf_kd.DistillationConfig`.

        Returns:
            The run's objective (:class:`~hf_kd.objective.Objective`), its one teacher named ``members``.

        Raises:
            ValueError: a loss reads more than logits (members exchange predictions only), or the logits' width
                does not fit a loss.
        """
        objective = Objective(args.loss_specs, [MEMBERS], args)
        other = [term.loss.name for term in objective.terms if term.loss.side_needs("student") != {"logits"}]
        if other:
            raise ValueError(
                f"{self.scheme} exchanges predictions, and {other} read other features (hidden states, embeddings) "
                f"with learned parts sized for one teacher: use response losses ({RESPONSE_ONLY})."
            )
        check_logit_width(self.reference, objective.losses)
        return objective


def check_member_options(members: TrainedMembers, args: DistillationConfig, student_noise) -> None:
    """Refuse, at construction, the :class:`~hf_kd.DistillationConfig` options a run of several trained members
    cannot honour (they failed mid-training or were ignored): each names the scheme and the reason.

    Args:
        members: who teaches whom (its ``scheme`` and ``kind`` name the run in messages).
        args: the run's :class:`~hf_kd.DistillationConfig`.
        student_noise: the trainer's ``student_noise`` argument.

    Raises:
        ValueError: ``load_best_model_at_end``, ``chunk_size``, ``on_policy_fraction``, ``label_smoothing_factor``,
            ``student_noise``, ``teacher_aggregation`` or ``teacher_weights`` set.
    """
    scheme, kind = members.scheme, members.kind
    if args.load_best_model_at_end:
        raise ValueError(f"load_best_model_at_end reloads one model; {scheme} keeps every {kind}: leave it False.")
    refusals = []
    if args.chunk_size is not None:
        refusals.append(
            f"chunk_size={args.chunk_size}: the chunked loss runs one student against one frozen teacher's LM head; "
            f"here every {kind} reads the others' full logits. Leave chunk_size unset"
        )
    if args.on_policy_fraction > 0:
        refusals.append(
            f"on_policy_fraction={args.on_policy_fraction}: on-policy batches are one student's generations scored by "
            f"frozen teachers; the {kind}s all learn. Leave it 0"
        )
    if args.label_smoothing_factor > 0:
        refusals.append(
            f"label_smoothing_factor={args.label_smoothing_factor}: each {kind} computes its own label loss "
            "(its model's loss), unsmoothed. Leave it 0"
        )
    if student_noise is not None:
        refusals.append(
            f"student_noise: every {kind} reads the same batch, and the ones that teach read it detached. "
            "Noise the inputs in the data collator instead"
        )
    if args.teacher_aggregation != "mean_probs" or args.teacher_weights is not None:
        refusals.append(
            f"teacher_aggregation={args.teacher_aggregation!r} / teacher_weights={args.teacher_weights}: the "
            f"{kind}s that teach are combined by the scheme itself (mutual learning: towards='peers' or "
            "'ensemble'). Leave both unset"
        )
    if refusals:
        raise ValueError(f"{scheme} cannot take " + "; ".join(refusals) + ".")


def check_members_setup(module, teacher_model, args, members: TrainedMembers, student_noise, trainer_kwargs) -> None:
    """What a trainer of several members refuses before anything is built (beside :func:`check_member_options`).

    Args:
        module: the trainer's model, which must be a :class:`MemberModule`.
        teacher_model: the trainer's ``teacher_model`` (only schemes whose ``takes_teachers`` accept one).
        args: the run's :class:`~hf_kd.DistillationConfig`.
        members: who teaches whom.
        student_noise: the trainer's ``student_noise`` argument.
        trainer_kwargs: the other arguments given to the trainer (``train_dataset``, ``compute_loss_func``, ...).

    Raises:
        TypeError: ``members``, ``args`` or ``module`` of the wrong type.
        ValueError: a ``compute_loss_func``, a teacher the scheme does not take, an empty ``train_dataset``, or
            what :func:`check_member_options` refuses.
    """
    if not isinstance(members, TrainedMembers):
        raise TypeError(f"members must be a TrainedMembers, got {type(members).__name__}.")
    if not isinstance(args, DistillationConfig):
        raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}.")
    if trainer_kwargs.get("compute_loss_func") is not None:
        raise ValueError(f"{members.scheme} trains the models it is given, with its own loss.")
    if not isinstance(module, MemberModule):
        raise TypeError(
            f"with members, model must be the MemberModule that runs them (e.g. PeerCohort, EarlyExitModel), got "
            f"{type(module).__name__}."
        )
    if teacher_model is not None and not members.takes_teachers:
        raise ValueError(
            f"{members.scheme} takes no teacher_model: its {members.kind}s teach each other (for a frozen teacher, "
            "train one student with DistillationTrainer)."
        )
    check_member_options(members, args, student_noise)
    train_dataset = trainer_kwargs.get("train_dataset")
    if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
        raise ValueError("train_dataset is empty (0 rows): check the data loading and filtering before training.")


def check_member_engine(trainer, members: TrainedMembers) -> None:
    """Several members train as one module: DeepSpeed and FSDP wrap one model per engine.

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`, after the Trainer's set-up.
        members: who teaches whom (names the scheme in the message).

    Raises:
        ValueError: DeepSpeed or FSDP is enabled.
    """
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ValueError(
            f"{members.scheme} is not supported under DeepSpeed or FSDP: they wrap one model per engine, and the "
            f"{members.kind}s train as one module. Use one device or DDP (accelerate launch without a "
            "DeepSpeed or FSDP config)."
        )


def members_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``DistillationTrainer.compute_loss`` when the trainer trains several members: every member once, each with
    its label loss and its terms towards the members that teach it; logged per member (``kl/peer0``).

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.
        model: the (wrapped) :class:`MemberModule`.
        inputs: the batch.
        return_outputs: also return ``{"logits": the members' mean prediction}``.
        num_items_in_batch: the :class:`~hf_kd.positions.ItemCounts` of the accumulated batch (computed from
            ``inputs`` when called outside the training loop).

    Returns:
        The summed loss of every member, or ``(loss, outputs)`` with ``return_outputs``.

    Raises:
        ValueError: no term was computed (no labels, and no member learns from another).
    """
    members: TrainedMembers = trainer.members
    counts = num_items_in_batch
    if not isinstance(counts, ItemCounts):  # called outside the training loop
        counts = trainer._get_num_items_in_batch([inputs], trainer.args.device)
    mode = "train" if model.training else "eval"
    accumulation = getattr(trainer, "current_gradient_accumulation_steps", 1) if mode == "train" else 1
    inputs, sample_index = split_sample_index(inputs)
    inputs, teacher_inputs = split_views(inputs)  # members read the plain view; frozen nodes their own, if any
    labels, label_weight = inputs.get("labels"), trainer.args.label_loss_weight
    results = model(**inputs)  # every member once, through the module's (DDP) wrapper; each its own label loss
    mask = trainer._distillation_mask(inputs)
    features = {name: member_features for name, (_, member_features) in results.items()}
    # Frozen nodes beside the members (a graph's teachers) are read as a teacher is. A cache holds the training
    # rows only: evaluation then leaves the frozen nodes' edges out, as a single student's evaluation does.
    uncovered = mode == "eval" and not trainer.teachers_cover_eval
    frozen = {
        name: source(teacher_inputs or inputs, frozenset({"logits"}), sample_index=sample_index)
        for name, source in ({} if uncovered else trainer.teachers).items()
    }
    position_labels = labels
    if trainer.token_level and trainer.shift_labels:
        features = {name: _drop_last_position(member_features) for name, member_features in features.items()}
        frozen = {name: _drop_last_position(teacher) for name, teacher in frozen.items()}
        position_labels = None if labels is None else labels[:, 1:]
    detached = {name: ModelFeatures(logits=each.logits.detach()) for name, each in features.items()}
    sources = {**detached, **frozen}
    step = trainer.state.global_step if mode == "train" else None
    progress = step / max(trainer.state.max_steps, 1) if step is not None else None
    labeled = label_weight > 0 and labels is not None
    objective, total = trainer.distillation_objective, None
    for name, (outputs, _) in results.items():
        student = features[name]
        terms = label_term(trainer, outputs, labels, counts) if label_weight > 0 else {}
        taught = False
        for term in objective.terms:
            teachers = members.teachers_of(name, sources, term)
            if not teachers:
                continue
            scale, keep = members.gate(term, sources, position_labels, progress)
            term_mask = keep if mask is None else (mask if keep is None else mask & keep)
            values = []
            for teacher in teachers:
                check_compatible(student, teacher)
                values.append(members.term_value(term, student, teacher, term_mask, position_labels, sources))
            confident_name = members.log_name(CONFIDENT_PREFIX + term.name, name)
            record_confident(trainer.term_log, mode, confident_name, term.loss, teachers, term_mask)
            terms[term.name] = scale * objective.normalise(term, sum(values) / len(values), counts, accumulation)
            taught = True
        extra = {key: value / accumulation for key, value in members.extra_terms(name, results, sources).items()}
        if trainer.args.check_finite:
            where = f"{mode} step {trainer.state.global_step + 1}, {name}"
            check_finite(where, {**terms, **extra}, student, frozen, mask, trainer.args.device)
        member_total = objective.total(terms, label_weight, step)
        for value in extra.values():
            member_total = value if member_total is None else member_total + value
        if member_total is not None:  # None: an unlabeled batch for a member that no one teaches
            total = member_total if total is None else total + member_total
        record_terms(
            trainer,
            mode,
            terms,
            counts,
            accumulation,
            taught,
            labeled,
            extra=extra,
            log_name=lambda term, name=name: members.log_name(term, name),
        )
    if total is None:
        raise ValueError("no loss term was computed: the batch has no labels and no member learns from another.")
    if not return_outputs:
        return total
    return total, {"logits": members.evaluation_logits(detached)}


def member_parameters(trainer, member: str) -> int:
    """The parameter count of one member.

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer` of the members.
        member: the member's name.

    Returns:
        The number of parameters of the member's model (or part).
    """
    return count_parameters(trainer.members.model_of(trainer.accelerator.unwrap_model(trainer.model), member))


def mean_prediction(features: list[ModelFeatures], temperature: float) -> torch.Tensor:
    """Logits that soften at ``temperature`` into the mean of the members' softened probabilities.

    Args:
        features: the members' predictions, each with logits of one shape.
        temperature: the softening temperature.

    Returns:
        Logits of that shape.
    """
    shape = features[0].logits.shape
    flat = [member.logits.reshape(-1, shape[-1]) for member in features]
    weights = torch.full((flat[0].shape[0], len(flat)), 1.0 / len(flat), device=flat[0].device)
    combined = TeacherAggregator([str(k) for k in range(len(flat))]).combine(flat, weights, temperature)
    return combined.reshape(shape)
