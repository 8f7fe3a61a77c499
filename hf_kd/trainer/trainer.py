"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss adds distillation terms from its teachers."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import find_labels

from ..checkpoints import check_run_setup, last_complete_checkpoint
from ..checks import check_chunkable, check_on_policy, check_setup, check_teachers
from ..config import DistillationConfig
from ..data import model_inputs
from ..evaluation import count_parameters
from ..features import output_field
from ..generation import ON_POLICY_KEY
from ..model_kinds import is_causal_lm, is_regression, is_token_level, labels_mark_distilled_positions
from ..noise import compose_noise
from ..objective import Objective
from ..positions import ItemCounts, distillation_mask, split_sample_index
from ..teachers import TeacherSource, build_teachers, place_teacher, use_eager_attention
from ..teachers.ensemble import TeacherAggregator
from ..term_log import TermLog
from ..views import split_views
from . import reporting
from .batch_loss import chunked_terms, plain_terms, record_terms, unlabeled_prediction, with_decoder_inputs
from .compat import TrainerCompat
from .loss_parts import LossParts, LossPartsCallback
from .members import TrainedMembers, check_member_engine, check_members_setup, member_parameters, members_loss

_LOOP_FIELDS = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time", "_loss")


class DistillationTrainer(TrainerCompat):
    """Trains ``model`` (the student) with its own label loss plus distillation losses against its teachers.

    ``loss = w_ce·CE + w_kd·Σᵢ wᵢ·Lᵢ(student, teacherᵢ)`` with the weights of :class:`DistillationConfig`.
    ``teacher_model`` is one teacher (a model, a path, a :class:`~hf_kd.teachers.TeacherSource`) or a list or dict
    of them; a loss reads the teacher it names (``{"name": "hint", "teacher": "vit"}``), else every teacher, one
    term each. Everything ``transformers.Trainer`` accepts keeps working. Live teachers are frozen, kept in eval
    mode, run under ``no_grad``, placed by Accelerate, and never saved into checkpoints or the output model.

    ``student_noise`` (a callable ``batch → batch`` or a list, see :mod:`hf_kd.noise`) perturbs the student's
    training inputs only: teachers, distilled positions and evaluation read the clean batch (noisy student).

    Each term is logged under its own name (``ce``, ``kl``, ...; ``kl/vit`` with several teachers; ``eval_kl``
    during evaluation); ``loss`` is the weighted total that is backpropagated.
    """

    # Every term is divided by counts taken over the whole accumulated batch (see ``ItemCounts``).
    loss_is_scaled_for_ga = True
    _tag_names = ["hf_kd", "knowledge-distillation"]
    # Files (glob patterns) a save of the student writes that are never pushed with it, by push_to_hub or from a
    # checkpoint: the pickled arguments (distillation_config.json records the set-up).
    unshared_files: tuple[str, ...] = (TRAINING_ARGS_NAME,)

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | str | TeacherSource | list | dict | None = None,
        args: DistillationConfig | None = None,
        student_noise=None,
        *,
        members: TrainedMembers | None = None,
        **kwargs,
    ):
        """Args:
            model: the student, or with ``members`` the :class:`~hf_kd.trainer.members.MemberModule` of the models
                trained together.
            teacher_model: one teacher or a list or dict of them (see the class docstring); default
                ``args.teacher_model_name_or_path``. None with ``members``: the members teach each other.
            args: the run's :class:`~hf_kd.DistillationConfig` (default: one writing to ``hf_kd_output``).
            student_noise: a callable ``batch → batch`` (or a list of them) applied to the student's training inputs.
            members: several trained models in one module and who teaches whom among them (mutual learning's peers,
                self-distillation's exits); None: one student.
            **kwargs: everything ``transformers.Trainer`` takes (``train_dataset``, ``data_collator``, ...).

        Raises:
            ValueError: on a set-up that could not train as configured (e.g. ``student_noise`` with
                ``chunk_size``), before anything is loaded.
            TypeError: on a model, teacher or argument of the wrong kind, before anything is loaded.
        """
        args = args if args is not None else DistillationConfig(output_dir="hf_kd_output")
        if members is None:
            teacher_model = (
                teacher_model if teacher_model is not None else getattr(args, "teacher_model_name_or_path", None)
            )
            check_setup(model, teacher_model, args, kwargs)
            self.student_noise = compose_noise(student_noise)  # training only; teachers read the clean batch
            if self.student_noise is not None and args.chunk_size is not None:
                raise ValueError("student_noise does not work with chunk_size (both models read one batch); unset one.")
            teachers = build_teachers(teacher_model, model, args.teacher_dtype)  # name → source or frozen model
            aggregator = TeacherAggregator.from_config(list(teachers), args) if len(teachers) > 1 else None
            objective = Objective(args.loss_specs, list(teachers), args, aggregator)
            check_teachers(model, teachers, objective, args, kwargs.get("train_dataset"))  # before any repo is made
            reference = model
        else:
            check_members_setup(model, teacher_model, args, members, student_noise, kwargs)
            self.student_noise, aggregator = None, None
            teachers = {}
            if teacher_model is not None:  # frozen nodes beside the members (a graph's)
                teachers = build_teachers(teacher_model, members.reference, args.teacher_dtype)
            objective = members.objective(args)
            reference = members.reference
        check_saveable(model, kwargs.get("processing_class"))
        # transformers' Trainer turns the model's key-value cache off for training (config.use_cache =
        # args.use_cache, False by default); the student leaves training and is saved with the setting it came with,
        # so it generates at full speed afterwards (TrainerCompat._save, train).
        self.given_use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        super().__init__(model=model, args=args, **kwargs)

        self.members = members
        if members is not None:
            check_member_engine(self, members)
            if args.label_names is None:  # the module's forward hides the members' label arguments
                self.label_names = find_labels(type(reference))
        self.distillation_objective = objective
        self.distillation_losses = objective.losses.to(self.args.device)
        if "attentions" in objective.needs("student") | objective.needs("teacher"):
            for network in [model, *(teacher for teacher in teachers.values() if isinstance(teacher, nn.Module))]:
                use_eager_attention(network)
        self.token_level = args.token_level if args.token_level is not None else is_token_level(reference)
        self.shift_labels = is_causal_lm(reference)
        self.labels_mark_positions = labels_mark_distilled_positions(reference)
        self.regression = is_regression(reference)  # its label loss: MSE over the given targets (NaN: unlabeled)
        if args.chunk_size is not None:
            check_chunkable(
                self.distillation_losses,
                self.shift_labels,
                self.token_level,
                self.is_fsdp_enabled,
                self.accelerator.is_fsdp2,
            )
        self.teachers: dict[str, TeacherSource] = {
            name: place_teacher(teacher, self, objective.losses) for name, teacher in teachers.items()
        }
        for name, source in self.teachers.items():
            source.check_needs(objective.needs("teacher", name))
        if members is None:
            check_on_policy(
                args, self.token_level, self.shift_labels, self.accelerator.unwrap_model(model), self.teachers
            )
        self.teacher_model = self.teacher.model if len(self.teachers) == 1 else None  # a network in memory, or None
        self.loss_parts = LossParts(
            self.distillation_losses, aggregator.to(self.args.device) if aggregator else None, self.teachers
        )
        self.loss_parts.setup(self, objective.terms)
        if members is None:
            self.term_log = TermLog(objective.logged_names, self.args.device)
        else:  # every term per member: ce/peer0, kl/peer0, hint/exit1, ...
            self.term_log = TermLog(members.logged_names(objective), self.args.device)
        self._warned_unlabeled_eval = False
        self.add_callback(LossPartsCallback(self.loss_parts, self.accelerator))
        self.add_callback(TermLogReset(self.term_log))
        self.comparison: dict[str, dict] | None = None
        self.model_card_kwargs: dict = {}
        self.comparison_examples: int | None = None
        self._comparing: str | None = None  # a teacher's name or "student" while compare_with_teacher runs

    @property
    def teacher(self) -> TeacherSource:
        """The teacher, when there is one (several: :attr:`teachers`)."""
        if len(self.teachers) != 1:
            raise AttributeError(f"this trainer has {len(self.teachers)} teachers: use trainer.teachers[name].")
        return next(iter(self.teachers.values()))

    @property
    def student(self) -> nn.Module:
        """The student model as saved and shared (unwrapped from DDP or an engine)."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def teachers_cover_eval(self) -> bool:
        """Whether every teacher has outputs for evaluation data (a cache covers the data it was written for)."""
        return all(source.covers_eval for source in self.teachers.values())

    def parameters_of(self, role: str) -> int:
        """The parameter count of ``"student"`` or of a teacher, by its name (for comparison rows).

        Args:
            role: ``"student"``, a teacher's name, or with several members a member's name.

        Returns:
            The number of parameters (``None`` for a teacher whose size is unknown, e.g. a served one).
        """
        if self.members is not None:
            return member_parameters(self, role)
        if role == reporting.STUDENT_ROLE:
            return count_parameters(self.student)
        return self.teachers[role].describe()["teacher_parameters"]

    def loss_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the losses (projectors, regressors, heads), optimised beside the student.

        Returns:
            The parameters, each once.
        """
        return self.loss_parts.parameters()

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # those engines: the parts' own optimizer
            self.loss_parts.join(optimizer)
        return optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the last *complete* checkpoint in the output
        folder (one that a kill inside its save left without ``trainer_state.json`` is skipped with a warning).

        Args:
            resume_from_checkpoint: a checkpoint folder, ``True`` for the last complete one in ``args.output_dir``,
                or ``None``/``False`` to start afresh.
            trial: the hyper-parameter search trial, as for ``Trainer.train``.
            ignore_keys_for_eval: output keys the evaluations during training leave out.
            **kwargs: passed to ``Trainer.train``.

        Returns:
            ``Trainer.train``'s ``TrainOutput`` (global step, training loss, metrics).

        Raises:
            ValueError: ``resume_from_checkpoint=True`` and the output folder has no complete checkpoint; or the
                checkpoint was saved by a run with another set-up (:meth:`run_setup`: losses, weights, teachers, a
                graph's edges, the scheme's settings), which resuming would continue instead of this run.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir} has no complete checkpoint-N folder: "
                    "train without resume_from_checkpoint to start afresh."
                )
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            count_field = getattr(getattr(self, "scheme_config", None), "stage_count_field", None)
            check_run_setup(str(resume_from_checkpoint), self.run_setup(), count_field)
        try:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        finally:
            self._restore_use_cache()

    def run_setup(self) -> dict:
        """What decides this run besides its data and seed, recorded in every checkpoint (``hf_kd_run_setup.json``)
        and compared when a run resumes from one.

        Returns:
            The losses and their weights, the objective's terms, the teachers (class and size), the trained
                members (a graph's nodes and edges) and the scheme's settings, JSON-serialisable.
        """
        # A teacher's class and size: not its name, which differs when a rerun loads a chain's saved assistant
        # that the first run held in memory, nor a server's address, which may move.
        described = ("teacher_class", "teacher_parameters")
        scheme = getattr(self, "scheme_config", None)
        return {
            **{field: getattr(self.args, field) for field in reporting.SETUP_FIELDS},
            "terms": [[term.name, term.teacher, term.weight] for term in self.distillation_objective.terms],
            "teachers": {
                name: {key: source.describe().get(key) for key in described} for name, source in self.teachers.items()
            },
            "members": self.members.setup() if self.members is not None else None,
            "scheme": scheme.setup() if scheme is not None else None,
        }

    # ---- loss -----------------------------------------------------------------------------------------------

    def _distillation_mask(self, inputs: dict) -> torch.Tensor | None:
        return distillation_mask(inputs, self.token_level, self.shift_labels, self.labels_mark_positions)

    def training_step(self, model, inputs, num_items_in_batch=None):
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:  # after the backward pass, which recomputed the chunks' logits
            if self.args.chunk_size is not None:
                self.teacher.release()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.members is not None:
            return members_loss(self, model, inputs, return_outputs, num_items_in_batch)
        counts = num_items_in_batch
        if not isinstance(counts, ItemCounts):  # called outside the training loop
            counts = self._get_num_items_in_batch([inputs], self.args.device)
        mode = "train" if model.training else "eval"
        self.distillation_losses.train(mode == "train")  # e.g. crd writes its memory banks in training only
        on_policy = bool(inputs.get(ON_POLICY_KEY))
        inputs, teacher_inputs = split_views({k: v for k, v in inputs.items() if k != ON_POLICY_KEY})
        clean_inputs = None
        if self.student_noise is not None and mode == "train":
            clean_inputs, inputs = inputs, self.student_noise(inputs)
        # The share of an optimizer step this micro-batch stands for; outside training there is no accumulation.
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if mode == "train" else 1
        label_weight = 0.0 if on_policy else self.args.label_loss_weight
        if teacher_inputs is not None and self.args.chunk_size is not None:
            raise ValueError("chunk_size does not support teacher_input_ids (different tokenizers); leave it unset.")
        if self.args.chunk_size is not None:
            terms, outputs, distilled = chunked_terms(self, model, inputs, counts, label_weight > 0, mode)
        else:
            terms, outputs, distilled = plain_terms(
                self, model, inputs, teacher_inputs, counts, label_weight, accumulation, mode, clean_inputs
            )
        total = self.distillation_objective.total(
            terms, label_weight, self.state.global_step if mode == "train" else None
        )
        if total is None and mode == "eval" and not self.teachers_cover_eval:
            # A cache has no outputs for evaluation data: evaluation reports the student's own label loss.
            total = output_field(outputs, "loss")
        if total is None:
            raise ValueError(
                "no loss term was computed: the batch has no labels and no distillation loss is "
                "configured, or every loss weight is 0."
            )
        labeled = label_weight > 0 and inputs.get("labels") is not None
        record_terms(self, mode, terms, counts, accumulation, distilled, labeled)
        return (total, outputs) if return_outputs else total

    # ---- logging and evaluation -----------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (evaluation terms go into the evaluation's metrics)
            # Train terms are normalised per optimizer step: the mean over the window's steps, like "loss".
            logs.update(self.term_log.reduce("train", self.accelerator))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, **kwargs):
        """The Trainer's loop, plus each term's mean per item over the evaluation set under the loop's own prefix
        (``eval_kl``; ``test_kl`` from ``predict``; ``eval_NAME_kl`` for a dict of eval sets): ``exp(eval_ce)`` of
        an LM is its per-token perplexity.

        Args:
            dataloader: the evaluation batches.
            description: the loop's name in the progress log (``"Evaluation"``, ``"Prediction"``, a model's name).
            prediction_loss_only: only compute the loss (``None``: ``args.prediction_loss_only``).
            ignore_keys: output keys left out of the predictions.
            **kwargs: passed to ``Trainer.evaluation_loop`` (``metric_key_prefix``, default ``"eval"``).

        Returns:
            The Trainer's ``EvalLoopOutput``, its metrics holding each term's mean under the prefix.
        """
        prefix = kwargs.get("metric_key_prefix", "eval")
        self.term_log.reset("eval")
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, **kwargs)
        terms = self.term_log.reduce("eval", self.accelerator)  # every process: the loop runs on all of them
        output.metrics.update({f"{prefix}_{name}": value for name, value in terms.items()})
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """``Trainer.evaluate``; with several members, plus ``compute_metrics`` of each member alone under
        ``{prefix}_{member}_`` (``eval_peer0_accuracy``).

        Args:
            eval_dataset: the evaluation set, or a dict of them (default: the trainer's ``eval_dataset``).
            ignore_keys: output keys left out of the predictions.
            metric_key_prefix: the prefix of every metric's name.

        Returns:
            The metrics by name (with several members, each member's as well).
        """
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.members is None or self.compute_metrics is None or isinstance(dataset, dict):
            return metrics  # a dict: evaluate() was called per set
        member_metrics = {}
        for name in self.members.names:
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
        if self.members is not None and self._comparing in self.members.names:  # one member alone
            plain = split_sample_index(self._prepare_inputs(inputs))[0]
            with torch.no_grad():
                logits = self.members.logits_alone(
                    self.accelerator.unwrap_model(self.model),
                    self._comparing,
                    {key: value for key, value in plain.items() if key != "labels"},
                )
            return None, logits, plain.get("labels")
        has_labels = bool(self.label_names) and all(inputs.get(name) is not None for name in self.label_names)
        if self._comparing is None and has_labels:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        plain, teacher_inputs = split_views(split_sample_index(inputs)[0])
        with torch.no_grad():
            if self._comparing is None:  # an unlabeled batch: the Trainer would report no loss at all
                return unlabeled_prediction(self, model, inputs, plain, prediction_loss_only)
            # compare_with_teacher: one model's logits alone, no distillation loss.
            plain = with_decoder_inputs(self, model, plain)
            if self._comparing in self.teachers:
                teacher = self.teachers[self._comparing]
                logits = teacher(teacher_inputs or plain, frozenset({"logits"})).dense_logits()
            else:
                logits = output_field(
                    model(**model_inputs({k: v for k, v in plain.items() if k != "labels"})), "logits"
                )
        return None, logits, plain.get("labels")

    # ---- saving and sharing ---------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student only — no teacher, no projectors or other learned loss parts — plus
        ``distillation_config.json`` describing how it was distilled.

        Args:
            output_dir: the folder (default ``args.output_dir``).
            _internal_call: set by the Trainer's own saves, which then do not push to the Hub.
        """
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            reporting.write_summary(output_dir or self.args.output_dir, self.distillation_summary())

    def distillation_summary(self) -> dict:
        """What was distilled from what, with which losses: the content of ``distillation_config.json``.

        Returns:
            The summary, a JSON-serialisable dict (see :func:`~hf_kd.trainer.reporting.distillation_summary`).
        """
        return reporting.distillation_summary(self)

    def compare_with_teacher(self, eval_dataset=None) -> dict[str, dict]:
        """Metrics (``compute_metrics``), parameters and ms per example of each teacher and of the student, each
        run alone by this trainer's own evaluation loop (cached teachers have no row); kept in ``self.comparison``
        for the model card's table. With several members: each member's row, measured alone.

        Args:
            eval_dataset: the data to measure on (default: the trainer's ``eval_dataset``).

        Returns:
            One row per model by name (each teacher's, ``"student"``, or each member's): its metrics,
                ``parameters`` and ``ms_per_example``.

        Raises:
            ValueError: no evaluation set, here or in the trainer.
        """
        if self.members is None:
            return reporting.compare_with_teacher(self, eval_dataset)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError(f"compare_with_teacher needs an eval_dataset (here or in {type(self).__name__}).")
        self.comparison = {name: reporting.measure_alone(self, name, dataset) for name in self.members.names}
        self.comparison_examples = len(dataset)
        return self.comparison

    def set_model_card_details(
        self, comparison: dict[str, dict] | None = None, eval_examples: int | None = None, **card_kwargs
    ) -> None:
        """Give the model card what the trainer cannot know: a teacher-vs-student ``comparison`` already measured
        (rows named ``teacher`` and ``student``, as :meth:`compare_with_teacher` returns) on ``eval_examples``
        examples, and defaults for :meth:`create_model_card` (``dataset``, ``dataset_description``, ...).

        Args:
            comparison: rows by model name, as :meth:`compare_with_teacher` returns (``None``: keep the current).
            eval_examples: how many examples ``comparison`` was measured on.
            **card_kwargs: defaults for :meth:`create_model_card`'s arguments.
        """
        if comparison is not None:
            self.comparison, self.comparison_examples = comparison, eval_examples
        self.model_card_kwargs.update(card_kwargs)

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
        *,
        dataset_description: str | None = None,
        teacher_name: str | None = None,
        teacher_lineage: str | None = None,
        output_dir: str | None = None,
    ) -> None:
        """Write ``README.md``: teachers, losses with their papers, data, and the teacher-vs-student table.

        The arguments are ``Trainer.create_model_card``'s, in its order (``finetuned_from`` sets the card's
        ``base_model``, ``tasks`` its ``pipeline_tag``, ``dataset_tags`` its ``datasets``, ``dataset_args`` the
        configurations named beside the data), plus ``dataset_description`` and ``output_dir`` (default: the
        output folder). The table comes from :meth:`compare_with_teacher`, run here when an eval set is known and
        it has not been. Arguments left out fall back to ``self.model_card_kwargs``, which also reach the card when
        ``save_model`` pushes because ``push_to_hub=True``.

        Args:
            language: the card's language(s).
            license: the card's license.
            tags: extra tags (a string or a list).
            model_name: the repository name when no Hub id is set (default: the output folder's name).
            finetuned_from: the card's ``base_model``.
            tasks: the card's ``pipeline_tag`` (one task, or a list of one).
            dataset_tags: the card's ``datasets`` (preferred over ``dataset``).
            dataset: the data the student was distilled on.
            dataset_args: the dataset configurations named beside the data.
            dataset_description: a sentence about the data.
            teacher_name: what the teacher is (a Hub id, linked, and the default ``base_model``) where the run loaded
                it from a local copy; a folder ``hf_kd.pretrained`` exported is named by its original without it.
            teacher_lineage: how the teacher that taught relates to ``teacher_name`` (e.g. "dequantised from a
                4-bit GGUF file"), on the card's Teacher line.
            output_dir: where ``README.md`` is written (default ``args.output_dir``).
        """
        card = dict(locals())  # every argument above, by its name
        del card["self"]
        reporting.create_model_card(self, **card)

    def push_to_hub(
        self,
        commit_message: str = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        *,
        create_pr: bool = False,
        **card_kwargs,
    ):
        """Upload the student — weights (or a PEFT adapter), config, processor, ``distillation_config.json`` and
        a model card — to ``args.hub_model_id``, and nothing else from the output folder (no pickled
        ``training_args.bin``: ``distillation_config.json`` records the set-up).

        The files are first written to ``OUTPUT_DIR/_hub_upload``, emptied first; if the upload fails (offline, server
        down, no permission) they stay there and the error says so. ``revision`` (default ``args.hub_revision``) and
        ``create_pr`` go to ``upload_folder``; ``private`` (default ``args.hub_private_repo``) applies when the repo
        is created. Other keyword arguments go to :meth:`create_model_card`, which refuses unknown ones.

        Args:
            commit_message: the commit's message.
            blocking: wait for the upload (``False``: run it in the background and return a future).
            token: the Hub token (default ``args.hub_token``).
            revision: the branch to push to (default ``args.hub_revision``).
            private: whether a newly created repository is private (default ``args.hub_private_repo``).
            create_pr: open a pull request instead of committing to the branch.
            **card_kwargs: passed to :meth:`create_model_card`.

        Returns:
            ``upload_folder``'s commit information (a future when not ``blocking``); ``None`` on processes other
                than the main one.
        """
        return reporting.push_to_hub(self, commit_message, blocking, token, revision, private, create_pr, card_kwargs)


def check_saveable(model: nn.Module | None, processing_class) -> None:
    """Refuse, before anything trains, a student that ``save_model`` or the first checkpoint could not write: every
    part of it that saves itself (``check_saveable``, e.g. a sentence encoder that needs its tokenizer) is asked.

    Args:
        model: the student (``None``: nothing to check).
        processing_class: the trainer's tokenizer or processor, which some parts need to save.
    """
    for module in model.modules() if isinstance(model, nn.Module) else ():
        if hasattr(module, "check_saveable"):
            module.check_saveable(processing_class)


class TermLogReset(TrainerCallback):
    """Each train() call, fresh or resumed, logs terms from its own first step.

    Args:
        term_log: the trainer's :class:`~hf_kd.term_log.TermLog`, reset at the start of training.
    """

    def __init__(self, term_log: TermLog):
        self.term_log = term_log

    def on_train_begin(self, args, state, control, **kwargs):
        self.term_log.reset("train")
