"""The schemes whose teachers train in the same module as the student (online distillation): peers trained together
(:mod:`~hf_kd.schemes.mutual_learning`) and a network's own exits (:mod:`~hf_kd.schemes.self_distillation`).

The module has named *members*, each producing logits and its own label loss. A member's loss is its label loss,
plus the configured response losses towards the detached predictions of the members that teach it, plus terms of
its scheme (a feature hint); the module's loss is the sum over members. Since teachers are read detached, a member's
parameters that only it uses receive gradients from its own loss alone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import find_labels

from ..checks import check_compatible, check_logit_width
from ..config import DistillationConfig
from ..evaluation import count_parameters
from ..features import ModelFeatures
from ..model_kinds import is_causal_lm, is_regression, is_token_level, labels_mark_distilled_positions
from ..objective import LABEL_TERM, Objective, check_finite
from ..positions import ItemCounts, split_sample_index
from ..teachers.ensemble import TeacherAggregator
from ..term_log import TermLog
from ..trainer import DistillationTrainer
from ..trainer.batch_loss import _drop_last_position, label_term, record_terms
from ..trainer.compat import TrainerCompat
from ..trainer.loss_parts import LossParts
from ..trainer.reporting import measure_alone
from ..trainer.trainer import TermLogReset

_MEMBERS = "members"  # the one teacher name the objective's terms read: whichever members teach a member
_LOOP_FIELDS = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time", "_loss")


class OnlineTrainer(DistillationTrainer):
    """Shares :class:`~hf_kd.DistillationTrainer`'s loss bookkeeping, logging, evaluation and checkpoints; its model
    is a module of several members. Subclasses say how the members run (:meth:`forward_members`), who teaches whom
    (:meth:`teachers_of`), what else a member pays (:meth:`extra_terms`) and how one member predicts alone
    (:meth:`member_logits`, :meth:`member_model`).

    Logged per member: ``ce/NAME``, ``kl/NAME``, … in training and ``eval_ce/NAME``, … in evaluation. With
    ``compute_metrics``, evaluation reports :meth:`evaluation_logits` (``eval_accuracy``: the members' mean
    prediction, unless the scheme says otherwise) and each member alone (``eval_NAME_accuracy``).
    """

    scheme, member_kind = "online distillation", "member"  # in messages

    def __init__(
        self,
        module: nn.Module,
        members: list[str],
        reference: nn.Module,
        args: DistillationConfig | None,
        extra_terms: tuple[str, ...] = (),
        **kwargs,
    ):
        """``reference``: a member's model, for what the task is (token level, causal, label names)."""
        args = args if args is not None else DistillationConfig(output_dir="hf_kd_output")
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}.")
        if kwargs.get("compute_loss_func") is not None or kwargs.get("model") is not None:
            raise ValueError(f"{type(self).__name__} trains the models it is given, with its own loss.")
        if args.load_best_model_at_end:
            raise ValueError(
                f"load_best_model_at_end reloads one model; {self.scheme} keeps every {self.member_kind}: leave it "
                "False."
            )
        check_online_options(self.scheme, self.member_kind, args, kwargs.pop("student_noise", None))
        objective = Objective(args.loss_specs, [_MEMBERS], args)
        other = [term.loss.name for term in objective.terms if term.loss.side_needs("student") != {"logits"}]
        if other:
            raise ValueError(
                f"{self.scheme} exchanges predictions, and {other} read other features (hidden states, embeddings) "
                "with learned parts sized for one teacher: use response losses (kl, reverse_kl, jsd, soft_ce, tvd, "
                "prob_mse, logit_mse, dkd)."
            )
        check_logit_width(reference, objective.losses)
        TrainerCompat.__init__(self, model=module, args=args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"{self.scheme} is not supported under DeepSpeed or FSDP: they wrap one model per engine, and the "
                f"{self.member_kind}s train as one module. Use one device or DDP (accelerate launch without a "
                "DeepSpeed or FSDP config)."
            )
        if args.label_names is None:  # the module's forward hides the members' label arguments
            self.label_names = find_labels(type(reference))
        self.objective, self.extra_term_names = objective, tuple(extra_terms)
        self.distillation_losses = objective.losses.to(self.args.device)
        self.token_level = args.token_level if args.token_level is not None else is_token_level(reference)
        self.shift_labels = is_causal_lm(reference)
        self.labels_mark_positions = labels_mark_distilled_positions(reference)
        self.regression = is_regression(reference)
        self.teachers, self.student_noise = {}, None
        self.loss_parts = LossParts(nn.ModuleList())  # response losses learn nothing; the hooks expect the parts
        self.members = list(members)
        logged = [LABEL_TERM, *objective.names, *self.extra_term_names]
        self.term_log = TermLog([f"{term}/{member}" for member in members for term in logged], self.args.device)
        self.add_callback(TermLogReset(self.term_log))
        self._warned_unlabeled_eval, self._comparing = False, None
        self.comparison, self.comparison_examples, self.model_card_kwargs = None, None, {}

    # ---- what a scheme defines ------------------------------------------------------------------------------

    def forward_members(self, model, inputs: dict) -> dict[str, tuple]:
        """``{member: (outputs with its label loss, ModelFeatures with its logits)}`` for one batch."""
        raise NotImplementedError

    def teachers_of(self, member: str, detached: dict[str, ModelFeatures], term) -> list[ModelFeatures]:
        """The detached predictions ``member`` learns from with ``term`` (none: it only learns from its labels)."""
        raise NotImplementedError

    def extra_terms(self, member: str, results: dict[str, tuple]) -> dict[str, torch.Tensor]:
        """A scheme's own batch-level terms for ``member`` (named in ``extra_terms``), already weighted."""
        return {}

    def member_logits(self, member: str, inputs: dict) -> torch.Tensor:
        """``member``'s logits alone, for its evaluation (under ``no_grad``)."""
        raise NotImplementedError

    def member_model(self, member: str) -> nn.Module:
        raise NotImplementedError

    def parameters_of(self, role: str) -> int:
        return count_parameters(self.member_model(role))

    # ---- loss -----------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = num_items_in_batch
        if not isinstance(counts, ItemCounts):  # called outside the training loop
            counts = self._get_num_items_in_batch([inputs], self.args.device)
        mode = "train" if model.training else "eval"
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if mode == "train" else 1
        inputs, _ = split_sample_index(inputs)
        labels, label_weight = inputs.get("labels"), self.args.label_loss_weight
        results = self.forward_members(model, inputs)  # every member once; each computes its own label loss
        mask = self._distillation_mask(inputs)
        features = {name: member_features for name, (_, member_features) in results.items()}
        position_labels = labels
        if self.token_level and self.shift_labels:
            features = {name: _drop_last_position(member_features) for name, member_features in features.items()}
            position_labels = None if labels is None else labels[:, 1:]
        detached = {name: ModelFeatures(logits=each.logits.detach()) for name, each in features.items()}
        step = self.state.global_step if mode == "train" else None
        labeled = label_weight > 0 and labels is not None
        total = None
        for name, (outputs, _) in results.items():
            student = features[name]
            terms = label_term(self, outputs, labels, counts) if label_weight > 0 else {}
            taught = False
            for term in self.objective.terms:
                teachers = self.teachers_of(name, detached, term)
                if not teachers:
                    continue
                values = []
                for teacher in teachers:
                    check_compatible(student, teacher)
                    values.append(term.loss(student, teacher, mask=mask, labels=position_labels))
                terms[term.name] = self.objective.normalise(term, sum(values) / len(values), counts, accumulation)
                taught = True
            extra = {key: value / accumulation for key, value in self.extra_terms(name, results).items()}
            if self.args.check_finite:
                where = f"{mode} step {self.state.global_step + 1}, {name}"
                check_finite(where, {**terms, **extra}, student, {}, mask, self.args.device)
            member_total = self.objective.total(terms, label_weight, step)
            for value in extra.values():
                member_total = value if member_total is None else member_total + value
            if member_total is not None:  # None: an unlabeled batch for a member that no one teaches
                total = member_total if total is None else total + member_total
            record_terms(self, mode, terms, counts, accumulation, taught, labeled, suffix=f"/{name}", extra=extra)
        if total is None:
            raise ValueError("no loss term was computed: the batch has no labels and no member learns from another.")
        if not return_outputs:
            return total
        return total, {"logits": self.evaluation_logits(detached)}

    def evaluation_logits(self, detached: dict[str, ModelFeatures]) -> torch.Tensor:
        """What evaluation's ``compute_metrics`` reads (each member alone: :meth:`evaluate`): the members' mean
        prediction."""
        return mean_prediction(list(detached.values()), 1.0)

    # ---- evaluation -----------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The Trainer's evaluation of the module (every member's terms; with ``compute_metrics`` the members' mean
        prediction), plus ``compute_metrics`` of each member alone under ``{prefix}_{member}_``."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.compute_metrics is None or isinstance(dataset, dict):  # a dict: evaluate() was called per set
            return metrics
        member_metrics = {}
        for name in self.members:
            self._comparing = name
            try:
                output = self.evaluation_loop(
                    self.get_eval_dataloader(dataset), name, metric_key_prefix=f"{metric_key_prefix}_{name}"
                )
            finally:
                self._comparing = None
            member_metrics.update(
                {key: value for key, value in output.metrics.items() if not key.endswith(_LOOP_FIELDS)}
            )
        self.log(member_metrics)
        return {**metrics, **member_metrics}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self._comparing not in self.members:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        plain = split_sample_index(self._prepare_inputs(inputs))[0]
        with torch.no_grad():
            logits = self.member_logits(
                self._comparing, {key: value for key, value in plain.items() if key != "labels"}
            )
        return None, logits, plain.get("labels")

    def compare_with_teacher(self, eval_dataset=None) -> dict[str, dict]:
        """Each member's row (metrics, parameters, ms per example), measured alone."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError(f"compare_with_teacher needs an eval_dataset (here or in {type(self).__name__}).")
        self.comparison = {name: measure_alone(self, name, dataset) for name in self.members}
        self.comparison_examples = len(dataset)
        return self.comparison


def check_online_options(scheme: str, member_kind: str, args: DistillationConfig, student_noise) -> None:
    """Refuse, at construction, the :class:`~hf_kd.DistillationConfig` options an online scheme cannot honour (they
    failed mid-training or were ignored): each names the scheme and the reason."""
    refusals = []
    if args.chunk_size is not None:
        refusals.append(
            f"chunk_size={args.chunk_size}: the chunked loss runs one student against one frozen teacher's LM head; "
            f"here every {member_kind} reads the others' full logits. Leave chunk_size unset"
        )
    if args.on_policy_fraction > 0:
        refusals.append(
            f"on_policy_fraction={args.on_policy_fraction}: on-policy batches are one student's generations scored by "
            f"frozen teachers; the {member_kind}s all learn. Leave it 0"
        )
    if args.label_smoothing_factor > 0:
        refusals.append(
            f"label_smoothing_factor={args.label_smoothing_factor}: each {member_kind} computes its own label loss "
            "(its model's loss), unsmoothed. Leave it 0"
        )
    if student_noise is not None:
        refusals.append(
            f"student_noise: every {member_kind} reads the same batch, and the ones that teach read it detached. "
            "Noise the inputs in the data collator instead"
        )
    if args.teacher_aggregation != "mean_probs" or args.teacher_weights is not None:
        refusals.append(
            f"teacher_aggregation={args.teacher_aggregation!r} / teacher_weights={args.teacher_weights}: the "
            f"{member_kind}s that teach are combined by the scheme itself (mutual learning: towards='peers' or "
            "'ensemble'). Leave both unset"
        )
    if refusals:
        raise ValueError(f"{scheme} cannot take " + "; ".join(refusals) + ".")


def mean_prediction(features: list[ModelFeatures], temperature: float) -> torch.Tensor:
    """Logits that soften at ``temperature`` into the mean of the members' softened probabilities."""
    shape = features[0].logits.shape
    flat = [member.logits.reshape(-1, shape[-1]) for member in features]
    weights = torch.full((flat[0].shape[0], len(flat)), 1.0 / len(flat), device=flat[0].device)
    combined = TeacherAggregator([str(k) for k in range(len(flat))]).combine(flat, weights, temperature)
    return combined.reshape(shape)


def best_member(metrics: dict[str, dict], metric: str | None, greater_is_better: bool | None) -> str | None:
    """The member with the best ``metric`` (``accuracy`` by default; none when a member lacks it)."""
    metric = (metric or "accuracy").removeprefix("eval_")
    scored = {name: row[metric] for name, row in metrics.items() if metric in row}
    if len(scored) != len(metrics) or not scored:
        return None
    higher = greater_is_better if greater_is_better is not None else not metric.endswith("loss")
    return (max if higher else min)(scored, key=scored.get)
