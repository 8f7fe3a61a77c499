"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss adds distillation terms from a teacher."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, get_scheduler
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils import logging
from transformers.utils.hub import PushInProgress

from .checks import (
    check_batch_relations,
    check_chunkable,
    check_compatible,
    check_logit_width,
    check_sample_index,
    check_vocabularies,
    with_default_temperature,
)
from .config import DistillationConfig
from .cross_tokenizer import TEACHER_COLUMNS, aligned_positions, split_teacher_inputs
from .data import SAMPLE_INDEX
from .evaluation import count_parameters
from .features import ModelFeatures, finite_outputs, non_finite_fields, output_field, run_model
from .generation import ON_POLICY_KEY, student_rollout
from .hub import render_student_card
from .losses import DistillationLoss, get_loss
from .losses.chunked import chunked_token_terms
from .model_kinds import (
    auto_class_for,
    is_causal_lm,
    is_token_level,
    labels_mark_distilled_positions,
)
from .positions import ItemCounts, distillation_mask, num_positions, split_sample_index
from .teachers import LiveTeacher, TeacherSource, check_materialized, load_teacher, prepare_teacher, use_eager_attention
from .term_log import TermLog

logger = logging.get_logger(__name__)

DISTILLATION_CONFIG_NAME = "distillation_config.json"
HUB_UPLOAD_FOLDER = "_hub_upload"  # what push_to_hub uploads; "_*" is skipped by the Trainer's own pushes
LOSS_PARTS_NAME = "hf_kd_losses.safetensors"  # learned loss parts (projectors, banks) inside each checkpoint
LOSS_OPTIMIZER_NAME = "hf_kd_loss_optimizer.pt"  # their optimizer and schedule, under DeepSpeed and FSDP
# What a checkpoint holds beside the student: resumable state, never part of the student pushed to the repo root.
CHECKPOINT_ONLY_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    LOSS_PARTS_NAME,
    LOSS_OPTIMIZER_NAME,
    "global_step*",
    "latest",
    "zero_to_fp32.py",
    "pytorch_model_fsdp*",
    "optimizer_*",
)


class DistillationTrainer(Trainer):
    """Trains ``model`` (the student) with its own label loss plus distillation losses against a teacher.

    ``loss = w_ce·CE + w_kd·Σᵢ wᵢ·Lᵢ(student, teacher)`` with the weights of :class:`DistillationConfig`.
    Everything ``transformers.Trainer`` accepts keeps working. The teacher is frozen, kept in eval mode,
    run under ``no_grad``, placed by Accelerate, and never saved into checkpoints or the output model.

    Each term is logged under its own name (``ce``, ``kl``, ...; ``eval_kl`` during evaluation); ``loss`` is
    the weighted total that is backpropagated.
    """

    # Every term is divided by counts taken over the whole accumulated batch (see ``ItemCounts``).
    loss_is_scaled_for_ga = True
    _tag_names = ["hf_kd", "knowledge-distillation"]

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | str | TeacherSource | None = None,
        args: DistillationConfig | None = None,
        **kwargs,
    ):
        if args is None:
            args = DistillationConfig(output_dir="hf_kd_output")
        if not isinstance(args, DistillationConfig):
            raise TypeError(
                f"args must be a DistillationConfig, got {type(args).__name__}; "
                "DistillationConfig takes every TrainingArguments field."
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "DistillationTrainer computes its own loss; configure it with DistillationConfig.losses "
                "instead of compute_loss_func."
            )
        if model is None:
            raise ValueError("DistillationTrainer needs the student as model=.")
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "no teacher: pass teacher_model= (a model, a path, a TeacherCache or AdapterBaseTeacher) or set "
                "DistillationConfig.teacher_model_name_or_path."
            )
        if teacher_model is model:
            raise ValueError(
                "teacher_model is the student itself: it would be frozen with the teacher and learn nothing. For a "
                "frozen copy, pass copy.deepcopy(model); for a LoRA student taught by its own base, "
                "AdapterBaseTeacher(model)."
            )
        check_materialized(model, "student")
        train_dataset = kwargs.get("train_dataset")
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError("train_dataset is empty (0 rows): check the data loading and filtering before training.")
        # Built before the Trainer: a loss that cannot take effect with this model and batch fails here.
        specs = args.loss_specs
        losses = nn.ModuleList(
            get_loss(spec.name, **with_default_temperature(spec, args.temperature)) for spec in specs
        )
        check_batch_relations(losses, args.per_device_train_batch_size)
        check_logit_width(model, losses)
        check_sample_index(losses, train_dataset)
        source = teacher_model if isinstance(teacher_model, TeacherSource) else None
        teacher = None if source is not None else load_teacher(teacher_model, model, args.teacher_dtype)
        check_vocabularies(model, teacher, losses)
        super().__init__(model=model, args=args, **kwargs)

        self.distillation_losses = losses.to(self.args.device)
        self.loss_names = [_unique_name(spec.name, [s.name for s in specs[:i]]) for i, spec in enumerate(specs)]
        self.loss_weights = [spec.weight for spec in specs]
        self.needs = {
            side: frozenset().union(*(loss.side_needs(side) for loss in self.distillation_losses))
            for side in ("student", "teacher")
        }
        if any("attentions" in needs for needs in self.needs.values()):
            use_eager_attention(model)
            if teacher is not None:
                use_eager_attention(teacher)
        self.token_level = args.token_level if args.token_level is not None else is_token_level(model)
        self.shift_labels = is_causal_lm(model)
        self.labels_mark_positions = labels_mark_distilled_positions(model)

        if args.chunk_size is not None:
            check_chunkable(
                self.distillation_losses,
                self.shift_labels,
                self.token_level,
                self.is_fsdp_enabled,
                self.accelerator.is_fsdp2,
            )
        if source is None:
            self.teacher: TeacherSource = LiveTeacher(prepare_teacher(teacher, self.accelerator))
        else:
            self.teacher = source
            if hasattr(source, "check_compatible"):  # a cache: same examples, vocabulary and tokenizer
                source.check_compatible(
                    student=self.accelerator.unwrap_model(model),
                    train_dataset=self.train_dataset,
                    tokenizer=self.processing_class,
                    losses=list(self.distillation_losses),
                )
        self.teacher.check_needs(self.needs["teacher"])
        if args.on_policy_fraction > 0:
            student_config = getattr(self.accelerator.unwrap_model(model), "config", None)
            if not self.token_level or not (self.shift_labels or getattr(student_config, "is_encoder_decoder", False)):
                raise ValueError("on_policy_fraction applies to causal and seq2seq LMs, which generate.")
            if not self.teacher.covers_eval:
                raise ValueError(
                    "on-policy distillation scores the student's new samples, which a teacher cache has no outputs "
                    "for: use a live teacher, or on_policy_fraction=0."
                )
        self.teacher_model = self.teacher.model  # the teacher network in memory, None for a cache
        self._setup_learned_losses()
        self.term_log = TermLog(["ce", *self.loss_names], self.args.device)
        self._warned_unlabeled_eval = False
        self.add_callback(_DistillationCallback(self))
        self.comparison: dict[str, dict] | None = None
        self.model_card_kwargs: dict = {}
        self.comparison_examples: int | None = None
        self._comparing: str | None = None  # "teacher" / "student" while compare_with_teacher runs
        self.loss_optimizer: torch.optim.Optimizer | None = None  # DeepSpeed and FSDP (see _prepare_for_training)
        self.loss_lr_scheduler = None

    # ---- learned parts of losses ----------------------------------------------------------------------------

    def _setup_learned_losses(self) -> None:
        """Let losses with learned parts size them from one training batch (before any optimizer exists)."""
        pending = [loss for loss in self.distillation_losses if type(loss).setup is not DistillationLoss.setup]
        if not pending:
            return
        if self.train_dataset is None:
            names = [loss.name for loss in pending]
            raise ValueError(
                f"losses {names} size their learned parts from a first training batch: pass "
                "train_dataset to DistillationTrainer."
            )
        with torch.random.fork_rng(devices=[]):  # the dry run must not shift the training shuffle
            batch = self._prepare_inputs(next(iter(self.get_train_dataloader())))
        batch, sample_index = split_sample_index(batch)
        model_inputs = {key: value for key, value in batch.items() if key != "labels"}
        was_training = self.model.training
        self.model.eval()  # no dropout, no batch-norm statistics update in the dry run
        with torch.no_grad():
            _, student = run_model(self.model, model_inputs, self.needs["student"])
            teacher = self.teacher(batch, self.needs["teacher"], sample_index=sample_index)  # never sees labels
        self.model.train(was_training)
        num_samples = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        for loss in pending:
            loss.setup(student, teacher, num_samples=num_samples)
        self.distillation_losses.to(self.args.device)
        if self.accelerator.num_processes > 1:  # every process starts from rank 0's initialisation
            for tensor in self.distillation_losses.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        if self._engine_owns_optimizer() and self.args.fp16 and self.loss_parameters():
            raise ValueError(
                f"losses {[loss.name for loss in pending]} learn parameters beside the student, whose gradients "
                "DeepSpeed's or FSDP's fp16 loss scaling would leave scaled: use bf16 (or fp32) with these engines."
            )

    def loss_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the losses (projectors, regressors, heads), optimised beside the student."""
        return [parameter for parameter in self.distillation_losses.parameters() if parameter.requires_grad]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        parameters = self.loss_parameters()
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if parameters and not self._engine_owns_optimizer() and not known.issuperset(id(p) for p in parameters):
            # Same learning rate and schedule as the student, no weight decay (as for biases and norms).
            optimizer.add_param_group({"params": [p for p in parameters if id(p) not in known], "weight_decay": 0.0})
        return optimizer

    def _engine_owns_optimizer(self) -> bool:
        """DeepSpeed and FSDP build, shard and checkpoint the student's optimizer from the model's parameters alone."""
        return self.is_deepspeed_enabled or self.is_fsdp_enabled

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # Under DeepSpeed and FSDP the learned loss parts get an optimizer of their own, of the student's kind and
        # schedule, stepped with it (_DistillationCallback) and checkpointed beside it.
        self.loss_optimizer, self.loss_lr_scheduler = None, None
        parameters = self.loss_parameters()
        if self._engine_owns_optimizer() and parameters:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.loss_optimizer = optimizer_cls([{"params": parameters, "weight_decay": 0.0}], **optimizer_kwargs)
            self.loss_lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=self.loss_optimizer,
                num_warmup_steps=self.args.get_warmup_steps(max_steps),
                num_training_steps=max_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
        return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (SAMPLE_INDEX, *TEACHER_COLUMNS):  # read by CRD-style losses / the teacher, not the student
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ---- loss -----------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The micro-batches of one optimizer step; with ``on_policy_fraction`` λ, a fraction λ of steps gets
        the student's own continuations of their prompts instead (decided the same way on every process)."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        fraction = self.args.on_policy_fraction
        if fraction > 0 and batch_samples:
            draw = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
            if torch.rand((), generator=draw).item() < fraction:
                batch_samples = [self._rollout(batch) for batch in batch_samples]
        counts = self._get_num_items_in_batch(batch_samples, device)
        if batch_samples and self.token_level and (counts.scale > 1 or self.accelerator.num_processes == 1):
            # Counts over the whole step (every process): a step in which no token carries a label or
            # distillation has loss 0 and teaches nothing, which a mislabeled data set does at every step.
            if (counts.labels + counts.positions).item() == 0:
                raise ValueError(
                    f"step {self.state.global_step + 1}: none of the tokens of its "
                    f"{sum(len(next(v for v in b.values() if torch.is_tensor(v))) for b in batch_samples)} rows per "
                    "process carries a label or distillation (labels are -100 everywhere, so the loss would be 0). "
                    "Label the tokens to learn (the completion of a prompt), e.g. with "
                    "hf_kd.generation.tokenize_prompt_completion, or drop rows without supervised tokens."
                )
        return batch_samples, counts

    def _rollout(self, batch: dict) -> dict:
        if TEACHER_COLUMNS[0] in batch:
            raise ValueError(
                "on-policy distillation across tokenizers is not supported: the student's samples would need "
                "re-tokenising for the teacher. Use on_policy_fraction=0 with teacher_input_ids."
            )
        batch = self._prepare_inputs(batch)
        inputs, sample_index = split_sample_index(batch)
        deepspeed = self.accelerator.state.deepspeed_plugin
        # Sharded weights (ZeRO-3, FSDP): every decoding step gathers them collectively, so every process keeps
        # stepping until all are done (as transformers' Seq2SeqTrainer decides).
        sharded = (deepspeed is not None and deepspeed.zero_stage == 3) or self.is_fsdp_enabled
        rollout = student_rollout(
            self.accelerator.unwrap_model(self.model), inputs, self.args.generation_kwargs, synced_gpus=sharded
        )
        return rollout if sample_index is None else {**rollout, SAMPLE_INDEX: sample_index}

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> ItemCounts:
        """Count label entries and distillation positions over all micro-batches (and processes) of a step."""
        shift = self.shift_labels
        # Summed as tensors where the batches live: no host-device sync per micro-batch.
        counts = torch.zeros(2, dtype=torch.float32, device=device)
        for batch in batch_samples:
            if batch.get("labels") is not None and not batch.get(ON_POLICY_KEY):  # no label loss on own samples
                batch_labels = batch["labels"][..., 1:] if shift else batch["labels"]
                counts[0] += batch_labels.ne(-100).sum().to(device)
            batch, teacher_batch = split_teacher_inputs(batch)
            mask = self._distillation_mask(batch)
            if teacher_batch is not None and mask is not None:  # different tokenizers: the aligned positions
                mask = aligned_positions(mask, self._distillation_mask(teacher_batch))[0]
            counts[1] += mask.sum().to(device) if mask is not None else num_positions(batch, self.token_level, shift)
        scale = 1
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
            scale = self.accelerator.num_processes
        return ItemCounts(labels=counts[0], positions=counts[1], scale=scale)

    def _distillation_mask(self, inputs: dict) -> torch.Tensor | None:
        return distillation_mask(inputs, self.token_level, self.shift_labels, self.labels_mark_positions)

    def training_step(self, model, inputs, num_items_in_batch=None):
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:  # after the backward pass, which recomputed the chunks' logits
            if self.args.chunk_size is not None:
                self.teacher.release()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = num_items_in_batch
        if not isinstance(counts, ItemCounts):  # called outside the training loop
            counts = self._get_num_items_in_batch([inputs], self.args.device)
        mode = "train" if model.training else "eval"
        self.distillation_losses.train(mode == "train")  # e.g. crd writes its memory banks in training only
        on_policy = bool(inputs.get(ON_POLICY_KEY))
        inputs, teacher_inputs = split_teacher_inputs({k: v for k, v in inputs.items() if k != ON_POLICY_KEY})
        # The share of an optimizer step this micro-batch stands for; outside training there is no accumulation.
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if mode == "train" else 1
        label_weight = 0.0 if on_policy else self.args.label_loss_weight
        if teacher_inputs is not None and self.args.chunk_size is not None:
            raise ValueError("chunk_size does not support teacher_input_ids (different tokenizers); leave it unset.")
        if self.args.chunk_size is not None:
            total, terms, outputs, distilled = self._chunked_token_loss(
                model, inputs, counts, with_label_loss=label_weight > 0, mode=mode
            )
        else:
            total, terms, outputs, distilled = self._token_or_sequence_loss(
                model, inputs, teacher_inputs, counts, label_weight, accumulation, mode
            )
        self._record_terms(
            mode, terms, counts, accumulation, distilled, label_weight > 0 and inputs.get("labels") is not None
        )
        return (total, outputs) if return_outputs else total

    def _record_terms(self, mode, terms, counts: ItemCounts, accumulation: int, distilled: bool, labeled: bool):
        """Training: each term's share of its step, weighed 1 per step (the log is the mean per step). Evaluation:
        each term weighed by the items it averages (label tokens, distilled positions; 1 per batch for batch-level
        losses), so the log is the mean per item over the whole evaluation set, whatever the batch sizes.

        Weights come from the step's counts — every process's, when they were summed — so a process whose rows have
        no label still weighs the step in, and every process divides the same sums by the same weights."""
        if mode == "train":
            weights = {name: 1.0 / accumulation for name in self.loss_names} if distilled else {}
            if labeled:
                weights["ce"] = counts.labels.gt(0).float() / accumulation
            self.term_log.record(mode, terms, weights)
            return
        weights = {}
        if distilled:
            for name, loss in zip(self.loss_names, self.distillation_losses):
                weights[name] = counts.positions / counts.scale if loss.per_position else 1.0
        if labeled:
            weights["ce"] = counts.labels / counts.scale
        self.term_log.record(mode, {name: value * weights[name] for name, value in terms.items()}, weights)

    def _token_or_sequence_loss(self, model, inputs, teacher_inputs, counts, label_weight, accumulation, mode):
        """``(total, terms, student outputs, whether distillation ran)`` of one micro-batch on the plain path."""
        inputs, sample_index = split_sample_index(inputs)
        inputs = self._with_decoder_inputs(model, inputs)
        labels = inputs.get("labels")
        student_inputs = inputs if label_weight > 0 else {k: v for k, v in inputs.items() if k != "labels"}
        outputs, student = run_model(
            model, student_inputs, self.needs["student"], module_root=self.accelerator.unwrap_model(model)
        )

        terms: dict[str, torch.Tensor] = {}
        total = None
        if labels is not None and label_weight > 0 and output_field(outputs, "loss") is not None:
            batch_labels = labels[..., 1:] if self.shift_labels else labels
            local_count = batch_labels.ne(-100).sum()
            if local_count > 0:  # a batch of unlabeled transfer data has no label loss
                model_loss = output_field(outputs, "loss")
                if self.label_smoother is not None:  # label_smoothing_factor: the smoothed CE, same mean
                    model_loss = self.label_smoother(outputs, labels, shift_labels=self.shift_labels)
                # The model's loss is a mean over this micro-batch; re-normalise it by the step's count.
                terms["ce"] = model_loss * local_count * counts.scale / counts.labels
                total = label_weight * terms["ce"]

        teacher = mask = None
        distilled = bool(self.distillation_losses) and (mode == "train" or self.teacher.covers_eval)
        if distilled:
            teacher = self.teacher(teacher_inputs or inputs, self.needs["teacher"], sample_index=sample_index)
            mask = self._distillation_mask(inputs)
            position_labels = labels
            if self.token_level and self.shift_labels:
                student, teacher = _drop_last_position(student), _drop_last_position(teacher)
                position_labels = None if labels is None else labels[:, 1:]
            if teacher_inputs is not None:
                student, teacher, mask = self._align_tokenizations(student, teacher, mask, teacher_inputs)
                position_labels = None
            else:
                check_compatible(student, teacher)
            for name, weight, loss in zip(self.loss_names, self.loss_weights, self.distillation_losses):
                value = loss(student, teacher, mask=mask, labels=position_labels, sample_index=sample_index)
                if loss.per_position:
                    value = value * counts.scale / counts.positions.clamp(min=1)
                else:
                    value = value / accumulation
                terms[name] = value
                weighted = self.args.distillation_weight * weight * value
                total = weighted if total is None else total + weighted
        if self.args.check_finite:
            self._check_finite(mode, terms, student, teacher, mask)
        if total is None and mode == "eval" and not self.teacher.covers_eval:
            # A cache has no outputs for evaluation data: evaluation reports the student's own label loss.
            total = output_field(outputs, "loss")
        if total is None:
            raise ValueError(
                "no loss term was computed: the batch has no labels and no distillation loss is "
                "configured, or every loss weight is 0."
            )
        return total, terms, outputs, distilled

    def _check_finite(self, mode: str, terms: dict, student: ModelFeatures | None, teacher, mask) -> None:
        """Raise before the backward pass (so no update is made) when a term or the teacher's outputs are not
        finite, saying which term and which model; one host sync when all is well."""
        flags = [torch.isfinite(value.detach()).all() for value in terms.values()]
        flags += [finite_outputs(teacher, mask)] if teacher is not None else []
        if not flags or bool(torch.stack([flag.to(self.args.device) for flag in flags]).all()):
            return
        bad_terms = {
            name: float(value.detach()) for name, value in terms.items() if not torch.isfinite(value.detach()).all()
        }
        broken = {
            role: fields
            for role, features in (("teacher", teacher), ("student", student))
            if features is not None and (fields := non_finite_fields(features, mask))
        }
        what = ", ".join(f"{name} = {value}" for name, value in bad_terms.items()) or "every loss term is finite"
        if "teacher" in broken:
            cause = (
                f"the teacher's {', '.join(broken['teacher'])} hold NaN or +inf (a broken teacher, or one that "
                "overflows in its dtype: try teacher_dtype='float32')"
            )
        elif "student" in broken:
            cause = (
                f"the student's {', '.join(broken['student'])} hold NaN or +inf (it diverged: lower learning_rate, "
                "set max_grad_norm, or train in bf16/fp32 rather than fp16)"
            )
        else:
            cause = "both models' outputs are finite, so the loss itself overflowed (a very low temperature?)"
        raise FloatingPointError(
            f"{mode} step {self.state.global_step + 1}: non-finite distillation ({what}): {cause}. Training stopped "
            "before this step's update; the student's weights hold no NaN."
        )

    def _align_tokenizations(self, student, teacher, mask, teacher_inputs):
        """Different tokenizers: the k-th supervised student position meets the k-th supervised teacher position
        (see :mod:`hf_kd.cross_tokenizer`); returns flat ``N×V`` features of the aligned positions."""
        unaligned = [loss.name for loss in self.distillation_losses if not loss.cross_vocabulary]
        if unaligned:
            raise ValueError(
                f"the batch has teacher_input_ids (the teacher has its own tokenizer), which {unaligned} cannot "
                "compare: they need one vocabulary. Use the uld loss."
            )
        teacher_mask = self._distillation_mask(teacher_inputs)
        if mask is None or teacher_mask is None:
            raise ValueError("teacher_input_ids need labels or attention masks on both sides to align positions.")
        keep_student, keep_teacher = aligned_positions(mask, teacher_mask)
        return (
            ModelFeatures(logits=student.logits[keep_student]),
            ModelFeatures(logits=teacher.dense_logits()[keep_teacher]),
            None,
        )

    def _with_decoder_inputs(self, model, inputs: dict) -> dict:
        """Encoder-decoder models: the decoder inputs the student would derive from its labels, made explicit so
        the teacher (which never gets labels) and a student trained without the label loss decode the same
        sequence."""
        if "labels" not in inputs or "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs:
            return inputs
        student = self.accelerator.unwrap_model(model)
        student = student.get_base_model() if hasattr(student, "get_base_model") else student
        if not getattr(student.config, "is_encoder_decoder", False):
            return inputs
        decoder_input_ids = student.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
        return {**inputs, "decoder_input_ids": decoder_input_ids}

    def _chunked_token_loss(self, model, inputs, counts: ItemCounts, with_label_loss: bool, mode: str):
        """The causal-LM loss from final hidden states and LM heads, chunk by chunk (``chunk_size``).

        Only the supervised positions are projected to the vocabulary, by both models; the models themselves
        compute logits for their last position only (``logits_to_keep=1``).
        """
        inputs, sample_index = split_sample_index(inputs)
        labels = inputs.get("labels")
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**model_inputs, output_hidden_states=True, logits_to_keep=1)
        mask = distillation_mask(inputs, token_level=True, shift=True)  # chunk_size: causal LMs only
        student_hidden = outputs.hidden_states[-1][:, :-1]
        if mask is None:
            mask = torch.ones(student_hidden.shape[:2], dtype=torch.bool, device=student_hidden.device)
        targets = None if labels is None else labels[:, 1:][mask]
        with_label_loss = with_label_loss and labels is not None and self.args.label_loss_weight > 0
        if not model.training and not self.teacher.covers_eval:
            teacher_rows, teacher_logits, losses = (), None, []
        else:
            teacher_rows, teacher_logits = self.teacher.token_rows(model_inputs, mask, sample_index=sample_index)
            losses = list(self.distillation_losses)
        student = self.accelerator.unwrap_model(model)
        min_chunks = 0
        if self.is_deepspeed_enabled and self.accelerator.num_processes > 1:
            # ZeRO-3 gathers a sharded LM head on every call, collectively: all processes make the same number.
            chunks = torch.tensor(-(-int(mask.sum()) // self.args.chunk_size), device=mask.device)
            torch.distributed.all_reduce(chunks, op=torch.distributed.ReduceOp.MAX)
            min_chunks = int(chunks)
        sums = chunked_token_terms(
            student_hidden[mask],
            teacher_rows,
            targets,
            student_head=student.get_output_embeddings(),
            student_config=student.config,
            teacher_logits=teacher_logits,
            losses=losses,
            with_label_loss=with_label_loss,
            chunk_size=self.args.chunk_size,
            min_chunks=min_chunks,
        )
        if not model.training:  # no backward pass will recompute the chunks
            self.teacher.release()
        terms: dict[str, torch.Tensor] = {}
        total = sums.new_zeros(())
        if with_label_loss:
            terms["ce"] = sums[0] * counts.scale / counts.labels.clamp(min=1)
            total = total + self.args.label_loss_weight * terms["ce"]
        for index, (name, weight) in enumerate(zip(self.loss_names[: len(losses)], self.loss_weights)):
            terms[name] = sums[index + int(with_label_loss)] * counts.scale / counts.positions.clamp(min=1)
            total = total + self.args.distillation_weight * weight * terms[name]
        if self.args.check_finite:  # the rows the chunks read stand for each side's outputs
            rows = [row for row in teacher_rows if row.is_floating_point()]
            self._check_finite(
                mode,
                terms,
                ModelFeatures(hidden_states=(student_hidden[mask],)),
                ModelFeatures(hidden_states=tuple(rows)) if rows else None,
                None,
            )
        return total, terms, outputs, bool(losses)

    # ---- logging and saving ---------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (evaluation terms go into the evaluation's metrics)
            # Train terms are normalised per optimizer step: the mean over the window's steps, like "loss".
            logs.update(self.term_log.reduce("train", self.accelerator))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, **kwargs):
        """The Trainer's loop, plus each term's mean per item over the evaluation set under the loop's own prefix
        (``eval_kl``; ``test_kl`` from ``predict``; ``eval_NAME_kl`` for a dict of eval sets): ``exp(eval_ce)`` of
        an LM is its per-token perplexity."""
        prefix = kwargs.get("metric_key_prefix", "eval")
        self.term_log.reset("eval")
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, **kwargs)
        terms = self.term_log.reduce("eval", self.accelerator)  # every process: the loop runs on all of them
        output.metrics.update({f"{prefix}_{name}": value for name, value in terms.items()})
        return output

    def _save_checkpoint(self, model, trial):
        # Learned loss parts first: the Trainer pushes the checkpoint (hub_strategy) inside its own save.
        state = self.distillation_losses.state_dict()
        if state and self.args.should_save:  # learned loss parts resume with the student, outside its weights
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save_file(
                {key: value.detach().contiguous() for key, value in state.items()},
                os.path.join(folder, LOSS_PARTS_NAME),
            )
            if self.loss_optimizer is not None:
                torch.save(
                    {"optimizer": self.loss_optimizer.state_dict(), "scheduler": self.loss_lr_scheduler.state_dict()},
                    os.path.join(folder, LOSS_OPTIMIZER_NAME),
                )
        super()._save_checkpoint(model, trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # transformers' version pickles the arguments (training_args.bin) into both uploads; this one uploads the
        # student's files of the checkpoint to the repo root and, with hub_strategy checkpoint / all_checkpoints,
        # the checkpoint (learned loss parts included, so a run resumes from the Hub) — no pickle in either.
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(checkpoint_folder)
        step = self.state.global_step
        message = (
            f"Training in progress, step {step}"
            if self.args.save_strategy == "steps"
            else (f"Training in progress, epoch {int(self.state.epoch)}")
        )
        upload = dict(
            repo_id=self.hub_model_id, token=self.args.hub_token, run_as_future=True, revision=self.args.hub_revision
        )
        jobs = [
            HfApi().upload_folder(
                folder_path=checkpoint_folder,
                commit_message=message,
                ignore_patterns=[*CHECKPOINT_ONLY_FILES, TRAINING_ARGS_NAME],
                **upload,
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = (
                "last-checkpoint"
                if self.args.hub_strategy == HubStrategy.CHECKPOINT
                else (os.path.basename(checkpoint_folder))
            )
            jobs.append(
                HfApi().upload_folder(
                    folder_path=checkpoint_folder,
                    path_in_repo=path_in_repo,
                    commit_message=message + ", checkpoint",
                    ignore_patterns=[TRAINING_ARGS_NAME],
                    **upload,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:  # offline mode, connection refused, no permission
            raise RuntimeError(
                f"push_to_hub=True creates the Hub repo {self.args.hub_model_id or self.args.output_dir!r} when the "
                f"trainer is built, and that failed ({type(error).__name__}: {error}). Connect to the Hub (or unset "
                "HF_HUB_OFFLINE), or set push_to_hub=False and call trainer.push_to_hub() once it can be reached: "
                "save_model keeps the student locally meanwhile."
            ) from error

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Every engine resumes through here (DeepSpeed skips _load_from_checkpoint), after the optimizers exist.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, LOSS_PARTS_NAME)
        if os.path.exists(path):
            self.distillation_losses.load_state_dict(load_file(path))  # copied onto the parameters' device
        elif self.distillation_losses.state_dict():
            raise ValueError(
                f"{checkpoint} has no {LOSS_PARTS_NAME}: it was not written by a "
                "DistillationTrainer with these losses, whose learned parts would restart from scratch."
            )
        if self.loss_optimizer is not None:
            path = os.path.join(checkpoint, LOSS_OPTIMIZER_NAME)
            if not os.path.exists(path):
                raise ValueError(f"{checkpoint} has no {LOSS_OPTIMIZER_NAME} for the learned loss parts' optimizer.")
            state = torch.load(path, map_location="cpu", weights_only=True)  # moved to the parameters' device
            self.loss_optimizer.load_state_dict(state["optimizer"])
            self.loss_lr_scheduler.load_state_dict(state["scheduler"])

    def _save(self, output_dir: str | None = None, state_dict=None):
        if state_dict is not None:  # gathered by an engine (ZeRO-1/2, FSDP2): tied weights arrive as separate copies
            state_dict = _without_tied_copies(self.accelerator.unwrap_model(self.model), state_dict)
        super()._save(output_dir, state_dict)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student only — no teacher, no projectors or other learned loss parts — plus
        ``distillation_config.json`` describing how it was distilled."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            with open(os.path.join(output_dir, DISTILLATION_CONFIG_NAME), "w") as handle:
                json.dump(self.distillation_summary(), handle, indent=2)

    def distillation_summary(self) -> dict:
        """What was distilled from what, with which losses: the content of ``distillation_config.json``."""
        teacher = self.teacher.describe()
        return {
            **teacher,
            "teacher": teacher["teacher"] or self.args.teacher_model_name_or_path,
            "student_parameters": count_parameters(self.model),
            "losses": self.args.losses,
            "temperature": self.args.temperature,
            "label_loss_weight": self.args.label_loss_weight,
            "distillation_weight": self.args.distillation_weight,
            "token_level": self.token_level,
            "steps": self.state.global_step,
            "engine": self._engine_description(),
            **({"adapter": adapter} if (adapter := _adapter_summary(self.model)) else {}),
        }

    def _engine_description(self) -> str:
        """How the student was trained: ``"DeepSpeed ZeRO-3, 8 processes"``, ``"1 process (cuda)"``..."""
        processes = self.accelerator.num_processes
        if self.is_deepspeed_enabled:
            engine = f"DeepSpeed ZeRO-{self.accelerator.state.deepspeed_plugin.zero_stage}"
        elif self.is_fsdp_enabled:
            engine = f"FSDP{self.accelerator.state.fsdp_plugin.fsdp_version}"
        elif processes > 1:
            engine = "DDP"
        else:
            return f"1 process ({self.args.device.type})"
        return f"{engine}, {processes} processes"

    # ---- sharing --------------------------------------------------------------------------------------------

    def compare_with_teacher(self, eval_dataset=None) -> dict[str, dict]:
        """Metrics (``compute_metrics``), parameters and ms per example of the teacher and the student.

        Both are run by this trainer's own evaluation loop, each model alone, so under DDP, ZeRO-3 or FSDP every
        process takes part as in training. With a cached teacher there is no teacher network: only the student's
        row is measured. The rows go into the model card's teacher-vs-student table (kept in ``self.comparison``).
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("compare_with_teacher needs an eval_dataset (here or in DistillationTrainer).")
        roles = ("teacher", "student") if self.teacher.covers_eval else ("student",)
        rows = {role: self._measure_alone(role, dataset) for role in roles}
        self.comparison = rows
        self.comparison_examples = len(dataset)
        return rows

    def _measure_alone(self, role: str, dataset) -> dict[str, float]:
        """One model's row: its metrics on ``dataset``, parameters and wall-clock ms per example (after one
        warm-up batch, so the latency is not the first call's)."""
        self._comparing = role
        try:
            if hasattr(dataset, "select"):
                warm_up = dataset.select(range(min(self.args.per_device_eval_batch_size, len(dataset))))
                self.evaluation_loop(self.get_eval_dataloader(warm_up), role, metric_key_prefix=role)
            start = time.perf_counter()
            output = self.evaluation_loop(self.get_eval_dataloader(dataset), role, metric_key_prefix=role)
            seconds = time.perf_counter() - start
        finally:
            self._comparing = None
        prefix = f"{role}_"
        row = {
            key.removeprefix(prefix): value
            for key, value in output.metrics.items()
            if key.removeprefix(prefix) not in ("loss", "runtime", "samples_per_second", "steps_per_second")
            and not key.endswith("model_preparation_time")
        }
        teacher = role == "teacher"
        row["parameters"] = self.teacher.describe()["teacher_parameters"] if teacher else count_parameters(self.model)
        row["ms_per_example"] = 1000 * seconds / len(dataset)
        return row

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        has_labels = bool(self.label_names) and all(inputs.get(name) is not None for name in self.label_names)
        if self._comparing is None and not has_labels:
            return self._unlabeled_prediction_step(model, inputs, prediction_loss_only)
        if self._comparing is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # compare_with_teacher: one model's logits alone, no distillation loss.
        inputs, _ = split_sample_index(self._prepare_inputs(inputs))
        inputs, teacher_inputs = split_teacher_inputs(inputs)
        inputs = self._with_decoder_inputs(model, inputs)
        with torch.no_grad():
            if self._comparing == "teacher":
                inputs = teacher_inputs or inputs
                logits = self.teacher(inputs, frozenset({"logits"})).dense_logits()
            else:
                logits = output_field(model(**{k: v for k, v in inputs.items() if k != "labels"}), "logits")
        return None, logits, inputs.get("labels")

    def _unlabeled_prediction_step(self, model, inputs, prediction_loss_only):
        """An evaluation batch without labels (a transfer set): the Trainer would skip the loss, so no distillation
        term would be reported; here the loss is the distillation total. A cached teacher has nothing to compare
        on evaluation data: the loss is then None, and a warning says why nothing is reported."""
        if not self.teacher.covers_eval:
            if not self._warned_unlabeled_eval:
                logger.warning(
                    "the evaluation set has no labels and the teacher is a cache, which covers the training rows "
                    "only: evaluation reports neither a label loss nor distillation terms. Give the evaluation set "
                    "labels, or use a live teacher."
                )
                self._warned_unlabeled_eval = True
            with torch.no_grad():
                plain, _ = split_teacher_inputs(split_sample_index(self._prepare_inputs(inputs))[0])
                logits = output_field(model(**plain), "logits")
            return None, None if prediction_loss_only else logits, None
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            counts = self._get_num_items_in_batch([inputs], self.args.device)
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=counts)
        return loss.detach(), None if prediction_loss_only else output_field(outputs, "logits"), None

    def set_model_card_details(
        self, comparison: dict[str, dict] | None = None, eval_examples: int | None = None, **card_kwargs
    ) -> None:
        """Give the model card what the trainer cannot know: a teacher-vs-student ``comparison`` already measured
        (rows named ``teacher`` and ``student``, as :meth:`compare_with_teacher` returns) on ``eval_examples``
        examples, and defaults for :meth:`create_model_card` (``dataset``, ``dataset_description``, ...)."""
        if comparison is not None:
            self.comparison, self.comparison_examples = comparison, eval_examples
        self.model_card_kwargs.update(card_kwargs)

    def create_model_card(
        self,
        language: str | list[str] | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        *,
        dataset_description: str | None = None,
        output_dir: str | None = None,
    ) -> None:
        """Write ``README.md``: teacher, losses with their papers, data, and the teacher-vs-student table.

        The table comes from :meth:`compare_with_teacher`, run here when an eval set is known and it has not been.
        The arguments are ``Trainer.create_model_card``'s, in its order (``finetuned_from`` sets the card's
        ``base_model``, ``tasks`` its ``pipeline_tag``, ``dataset_tags`` its ``datasets``, ``dataset_args`` the
        configurations named beside the data), plus ``dataset_description`` and ``output_dir`` (default: the
        output folder). Arguments left out fall back to ``self.model_card_kwargs`` (e.g.
        ``{"dataset_description": ...}``), which also reach the card when ``save_model`` pushes because
        ``push_to_hub=True``.
        """
        if self.comparison is None and self.eval_dataset is not None:
            self.compare_with_teacher()  # on every process: the evaluation is collective
        if not self.is_world_process_zero():
            return
        defaults = self.model_card_kwargs
        dataset = dataset if dataset is not None else defaults.get("dataset")
        dataset_description = dataset_description or defaults.get("dataset_description")
        tags = tags if tags is not None else defaults.get("tags")
        license = license or defaults.get("license")
        language = language or defaults.get("language")
        dataset_tags = dataset_tags if dataset_tags is not None else defaults.get("dataset_tags")
        tasks = tasks if tasks is not None else defaults.get("tasks")
        if isinstance(tasks, (list, tuple)) and len(tasks) > 1:
            raise ValueError(f"a model card has one pipeline_tag; tasks={tasks!r} names {len(tasks)}.")
        repo_id = (
            self.hub_model_id
            or self.args.hub_model_id
            or model_name
            or os.path.basename(os.path.abspath(self.args.output_dir))
        )
        card = render_student_card(
            self.distillation_summary(),
            list(self.distillation_losses),
            repo_id=repo_id,
            auto_class=auto_class_for(self.model).__name__,
            comparison=self.comparison,
            eval_examples=self.comparison_examples,
            dataset=dataset_tags if dataset_tags is not None else dataset,
            dataset_description=dataset_description,
            dataset_configs=dataset_args if dataset_args is not None else defaults.get("dataset_args"),
            tags=[tags] if isinstance(tags, str) else tags,
            license=license,
            language=language,
            device=str(self.args.device),
            base_model=finetuned_from if finetuned_from is not None else defaults.get("finetuned_from"),
            pipeline_tag=tasks[0] if isinstance(tasks, (list, tuple)) else tasks,
        )
        card.save(os.path.join(output_dir or self.args.output_dir, "README.md"))

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

        The files are first written to ``OUTPUT_DIR/_hub_upload``; if the upload fails (offline, server down,
        no permission) they stay there and the error says so. ``revision`` (default ``args.hub_revision``) and
        ``create_pr`` go to ``upload_folder``; ``private`` (default ``args.hub_private_repo``) applies when the repo
        is created. Other keyword arguments go to :meth:`create_model_card`, which refuses unknown ones.
        """
        folder = os.path.join(self.args.output_dir, HUB_UPLOAD_FOLDER)
        self.save_model(folder, _internal_call=True)  # an internal save: the Trainer would push again
        self.create_model_card(output_dir=folder, **card_kwargs)  # every process: it may evaluate collectively
        if not self.is_world_process_zero():
            return None
        pickled_arguments = os.path.join(folder, TRAINING_ARGS_NAME)
        if os.path.exists(pickled_arguments):
            os.remove(pickled_arguments)
        try:
            if self.hub_model_id is None:
                Trainer.init_hf_repo(self, token=token, private=private)
            return HfApi().upload_folder(
                repo_id=self.hub_model_id,
                folder_path=folder,
                commit_message=commit_message,
                token=token if token is not None else self.args.hub_token,
                revision=revision if revision is not None else self.args.hub_revision,
                create_pr=create_pr,
                run_as_future=not blocking,
            )
        except Exception as error:  # offline mode, connection refused, HTTP errors: keep the files, say where
            raise RuntimeError(
                f"pushing the student to the Hub failed ({type(error).__name__}: {error}). Nothing local was lost: "
                f"the student, its card and distillation_config.json are in {folder}; push them again with "
                "trainer.push_to_hub() or huggingface_hub.upload_folder."
            ) from error


class _DistillationCallback(TrainerCallback):
    """Bookkeeping the Trainer loop does for the student and that the losses' learned parts need too."""

    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # Each train() call, fresh or resumed, counts term logs from its first step.
        self.trainer.term_log.reset("train")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        parameters = [p for p in self.trainer.loss_parameters() if p.grad is not None]
        if not parameters:
            return
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:  # average across processes, as DDP does for the student
            for parameter in parameters:
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.loss_optimizer is not None:  # DeepSpeed, FSDP: the loss parts' own optimizer
            self.trainer.loss_optimizer.step()
            self.trainer.loss_lr_scheduler.step()
        for parameter in self.trainer.loss_parameters():
            parameter.grad = None  # the Trainer zeroes only the model's gradients


def _adapter_summary(model: nn.Module) -> dict | None:
    """Type, base model and trainable parameters of a PEFT student (``None`` for a plain model)."""
    if not hasattr(model, "peft_config") or not hasattr(model, "get_base_model"):
        return None
    config = model.peft_config[getattr(model, "active_adapter", "default")]
    return {
        "type": str(getattr(config.peft_type, "value", config.peft_type)),
        "base_model": config.base_model_name_or_path or getattr(model.get_base_model(), "name_or_path", None),
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _drop_last_position(features: ModelFeatures) -> ModelFeatures:
    """Causal LMs: logits at the last position predict nothing in the batch."""
    if features.sparse_logits is not None and features.logits is None:
        return dataclasses.replace(features, sparse_logits=features.sparse_logits[:, :-1])
    if features.logits is None:
        return features
    return dataclasses.replace(features, logits=features.logits[:, :-1])


def _without_tied_copies(model: nn.Module, state_dict: dict) -> dict:
    """Drop the weights the model ties to another (``lm_head.weight`` to the input embeddings), which
    ``from_pretrained`` re-ties: saved whole they would double an embedding-sized file entry."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    drop = {
        target
        for target, source in tied.items()
        if target in state_dict and source in state_dict and torch.equal(state_dict[target], state_dict[source])
    }
    return {key: value for key, value in state_dict.items() if key not in drop} if drop else state_dict


def _unique_name(name: str, earlier: list[str]) -> str:
    """Log name of a loss: its id, its class name for dotted paths, numbered when an id repeats."""
    short = name.rpartition(".")[2]
    repeats = sum(1 for other in earlier if other.rpartition(".")[2] == short)
    return short if repeats == 0 else f"{short}_{repeats + 1}"
