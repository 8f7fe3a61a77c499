"""One micro-batch's loss terms: the plain path (both models' outputs as asked for by the objective) and the chunked
path for causal LMs (``chunk_size``: final hidden states and LM heads, chunk by chunk). Both hand their values to
the :class:`~hf_kd.objective.Objective` for the one mix into the total. Functions of a ``DistillationTrainer``."""

from __future__ import annotations

import dataclasses
import weakref

import torch
from transformers.utils import logging

from ..checks import check_compatible
from ..cross_tokenizer import aligned_positions
from ..data import model_inputs
from ..features import ModelFeatures, output_field, run_model
from ..losses.chunked import chunked_token_terms
from ..losses.lm_head import LogitsHead
from ..losses.response import thresholded
from ..model_kinds import is_classifier
from ..objective import CONFIDENT_PREFIX, LABEL_TERM, WEIGHT_PREFIX, check_finite, record_confident
from ..positions import ItemCounts, distillation_mask, labeled_entries, split_sample_index

logger = logging.get_logger(__name__)
# Students whose LM head was compared with their own logits (once, on the first chunked batch).
_CHECKED_HEADS: weakref.WeakSet = weakref.WeakSet()


def plain_terms(
    trainer, model, inputs, teacher_inputs, counts: ItemCounts, label_weight, accumulation, mode, clean_inputs=None
):
    """The terms of one micro-batch from both models' outputs, as the objective asks for them.

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.
        model: the (wrapped) student.
        inputs: the student's batch (``sample_index`` included when the data has one).
        teacher_inputs: the teacher's own view of the batch (another tokenizer or modality), or None.
        counts: the step's :class:`~hf_kd.positions.ItemCounts`.
        label_weight: the label loss's weight (0: the student's label loss is not computed).
        accumulation: the number of micro-batches in the step (1 outside training).
        mode: ``"train"`` or ``"eval"``.
        clean_inputs: the batch before the student's noise, which the teachers read and which decides the
            distilled positions (None: ``inputs``).

    Returns:
        ``(terms, student outputs, whether distillation ran)``, the terms by name as shares of the step.

    Raises:
        ValueError: a teacher's own tokenizer with several teachers.
    """
    objective = trainer.distillation_objective
    inputs, sample_index = split_sample_index(inputs)
    inputs = with_decoder_inputs(trainer, model, inputs)
    clean = inputs if clean_inputs is None else with_decoder_inputs(trainer, model, split_sample_index(clean_inputs)[0])
    labels = inputs.get("labels")
    if trainer.regression and labels is not None:  # before any forward pass: a target of ±inf is the data's fault
        check_regression_batch(labels, sample_index)
    student_inputs = inputs if label_weight > 0 else {k: v for k, v in inputs.items() if k != "labels"}
    outputs, student = run_model(
        model, student_inputs, objective.needs("student"), module_root=trainer.accelerator.unwrap_model(model)
    )

    terms: dict[str, torch.Tensor] = {}
    if label_weight > 0:
        terms.update(label_term(trainer, outputs, labels, counts))

    teachers, mask = {}, None
    # alpha=0 trains on the labels alone (e.g. hard pseudo-labels): the teachers are not run for a zero weight.
    distilled = bool(objective.terms) and (
        (mode == "train" and objective.distillation_weight > 0) or (mode == "eval" and trainer.teachers_cover_eval)
    )
    if distilled:
        # Token-level models with a teacher's own view (another tokenizer) align positions; sequence-level models
        # (one prediction per example, e.g. a text teacher for a speech student) compare their outputs as they are.
        aligned_views = teacher_inputs is not None and trainer.token_level
        if aligned_views and len(trainer.teachers) > 1:
            raise ValueError("teacher_input_ids (a teacher's own tokenizer) work with one teacher; several were given.")
        mask = trainer._distillation_mask(clean)
        position_labels = labels
        for name in objective.teachers:
            if objective.terms_of(name):
                source = trainer.teachers[name]
                teachers[name] = source(
                    teacher_inputs or clean, objective.needs("teacher", name), sample_index=sample_index
                )
        if trainer.token_level and trainer.shift_labels:
            student = _drop_last_position(student)
            teachers = {name: _drop_last_position(features) for name, features in teachers.items()}
            position_labels = None if labels is None else labels[:, 1:]
        student_view, views, view_mask = student, {}, mask
        for name, features in teachers.items():
            if aligned_views:
                student_view, views[name], view_mask = align_tokenizations(
                    trainer, student, features, mask, teacher_inputs
                )
            else:
                check_compatible(student, features)
                views[name] = features
        combined = {}
        if objective.reads_ensemble:
            combined, mean_weights = objective.ensemble(teachers, position_labels, mask, trainer.accelerator)
            terms.update(mean_weights)
        labels_view = None if aligned_views else position_labels
        for term in objective.terms:
            teacher = views.get(term.teacher) or combined[float(getattr(term.loss, "temperature", 1.0))]
            value = term.loss(student_view, teacher, mask=view_mask, labels=labels_view, sample_index=sample_index)
            terms[term.name] = objective.normalise(term, value, counts, accumulation)
            record_confident(trainer.term_log, mode, CONFIDENT_PREFIX + term.name, term.loss, [teacher], view_mask)
    if trainer.args.check_finite:
        check_finite(_where(trainer, mode), terms, student, teachers, mask, trainer.args.device)
    return terms, outputs, distilled


def label_term(trainer, outputs, labels, counts: ItemCounts) -> dict[str, torch.Tensor]:
    """The model's own label loss as a share of the step (a regression's: the MSE over the labeled rows).

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.
        outputs: the model's outputs (with its ``loss``).
        labels: the micro-batch's labels (None: unlabeled).
        counts: the step's :class:`~hf_kd.positions.ItemCounts`.

    Returns:
        ``{"ce": loss}``, or nothing when the micro-batch has no label (or the model computed no loss).
    """
    model_loss = output_field(outputs, "loss")
    if labels is None or model_loss is None:
        return {}
    batch_labels = labels[..., 1:] if trainer.shift_labels else labels
    given = labeled_entries(batch_labels)
    local_count = given.sum()
    if local_count == 0:  # a batch of unlabeled transfer data has no label loss
        return {}
    if trainer.regression:
        # The model's own MSE would read the NaN targets of unlabeled rows: the mean over the given ones.
        predictions = output_field(outputs, "logits").float().reshape(labels.shape)
        targets = labels.float().nan_to_num()  # a NaN left in would reach the gradient through the mask (NaN·0)
        model_loss = (predictions - targets).pow(2)[given].mean()
    elif trainer.label_smoother is not None:  # label_smoothing_factor: the smoothed CE, same mean
        model_loss = trainer.label_smoother(outputs, labels, shift_labels=trainer.shift_labels)
    # The model's loss is a mean over this micro-batch; re-normalise it by the step's count.
    return {LABEL_TERM: model_loss * local_count * counts.scale / counts.labels}


def check_regression_batch(labels: torch.Tensor, sample_index: torch.Tensor | None = None) -> None:
    """Regression targets of a batch are finite (NaN marks an unlabeled row): the batch-time check for data sets
    the trainer could not read up front (:func:`hf_kd.checks.check_regression_targets`).

    Args:
        labels: the batch's regression targets.
        sample_index: the batch's data set row indices, which the error names (None: the batch's row).

    Raises:
        ValueError: a target is infinite.
    """
    infinite = labels.float().isinf().reshape(len(labels), -1).any(-1)
    if infinite.any():
        row = int(infinite.nonzero()[0])
        where = f"row {row} of this batch" if sample_index is None else f"row {int(sample_index[row])} of the data set"
        raise ValueError(
            f"regression target 'labels' of {where} is {labels[row].tolist()}: a target must be a finite number "
            "(NaN marks an unlabeled row). Fix or drop such rows before training."
        )


def chunked_terms(trainer, model, inputs, counts: ItemCounts, with_label_loss: bool, mode: str):
    """The causal-LM terms from final hidden states and LM heads, chunk by chunk (``chunk_size``).

    Only the supervised positions are projected to the vocabulary, by both models; the models themselves compute
    logits for their last position only (``logits_to_keep=1``), which the first batch compares with the hidden-state
    path's (:meth:`~hf_kd.losses.lm_head.LogitsHead.check`). In training the gradients are computed in the same pass
    (fused), for the weights the objective gives each term this step (:func:`term_weights`).

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer` (one teacher).
        model: the (wrapped) causal-LM student.
        inputs: the batch.
        counts: the step's :class:`~hf_kd.positions.ItemCounts`.
        with_label_loss: compute the label cross-entropy in the chunks too.
        mode: ``"train"`` or ``"eval"``.

    Returns:
        ``(terms, student outputs, whether distillation ran)``, the terms by name as shares of the step.
    """
    (teacher_name,) = trainer.teachers  # one teacher (checked at construction)
    teacher = trainer.teachers[teacher_name]
    inputs, sample_index = split_sample_index(inputs)
    labels = inputs.get("labels")
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    outputs = model(**model_inputs, output_hidden_states=True, logits_to_keep=1)
    mask = distillation_mask(inputs, token_level=True, shift=True)  # chunk_size: causal LMs only
    student_hidden = outputs.hidden_states[-1][:, :-1]
    if mask is None:
        mask = torch.ones(student_hidden.shape[:2], dtype=torch.bool, device=student_hidden.device)
    targets = None if labels is None else labels[:, 1:][mask]
    with_label_loss = with_label_loss and labels is not None and trainer.args.label_loss_weight > 0
    if not model.training and not teacher.covers_eval:
        teacher_rows, teacher_logits, terms_run = (), None, []
    else:
        teacher_rows, teacher_logits = teacher.token_rows(model_inputs, mask, sample_index=sample_index)
        terms_run = list(trainer.distillation_objective.terms)
    student = trainer.accelerator.unwrap_model(model)
    student_head = LogitsHead(student, "the student")
    if student not in _CHECKED_HEADS:  # once, on the first batch: the head's logits are the model's own
        student_head.check(outputs.hidden_states[-1][:, -1].detach(), outputs.logits[:, -1].detach())
        _CHECKED_HEADS.add(student)
    min_chunks = 0
    if trainer.is_deepspeed_enabled and trainer.accelerator.num_processes > 1:
        # ZeRO-3 gathers a sharded LM head on every call, collectively: all processes make the same number.
        chunks = torch.tensor(-(-int(mask.sum()) // trainer.args.chunk_size), device=mask.device)
        torch.distributed.all_reduce(chunks, op=torch.distributed.ReduceOp.MAX)
        min_chunks = int(chunks)
    fused = model.training and torch.is_grad_enabled() and not student_head.gathered_per_call
    thresholded_terms = [index for index, term in enumerate(terms_run) if thresholded(term.loss)]
    confident_counts = torch.zeros(len(terms_run), device=mask.device) if thresholded_terms else None
    sums = chunked_token_terms(
        student_hidden[mask],
        teacher_rows,
        targets,
        student_head=student_head,
        teacher_logits=teacher_logits,
        losses=[term.loss for term in terms_run],
        with_label_loss=with_label_loss,
        chunk_size=trainer.args.chunk_size,
        min_chunks=min_chunks,
        weights=term_weights(trainer, terms_run, counts, with_label_loss, mode, mask.device) if fused else None,
        confident_counts=confident_counts,
    )
    for index in thresholded_terms:  # kept positions over distilled ones, as record_confident logs the plain path's
        name = CONFIDENT_PREFIX + terms_run[index].name
        trainer.term_log.record(mode, {name: confident_counts[index]}, {name: mask.sum().float()})
    if fused or not model.training:  # no backward pass will recompute the chunks
        teacher.release()
    terms = _chunked_normalised(trainer, sums, terms_run, counts, with_label_loss)
    if trainer.args.check_finite:  # the rows the chunks read stand for each side's outputs
        rows = [row for row in teacher_rows if row.is_floating_point()]
        check_finite(
            _where(trainer, mode),
            terms,
            ModelFeatures(hidden_states=(student_hidden[mask],)),
            {teacher_name: ModelFeatures(hidden_states=tuple(rows))} if rows else {},
            None,
            trainer.args.device,
        )
    return terms, outputs, bool(terms_run)


def term_weights(trainer, terms_run, counts: ItemCounts, with_label_loss: bool, mode: str, device) -> torch.Tensor:
    """Each chunked sum's weight in the step's total, ``∂ total / ∂ sums``: the sums go through the objective's own
    normalisation and mix, so the fused gradients are those of the total the Trainer backpropagates (the ramp-up,
    the label weight, the step's item counts over processes and micro-batches included).

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.
        terms_run: the objective's terms the chunks compute, in order.
        counts: the step's :class:`~hf_kd.positions.ItemCounts`.
        with_label_loss: whether the first sum is the label cross-entropy.
        mode: ``"train"`` (the objective's ramp-up applies) or ``"eval"``.
        device: where the weights are made.

    Returns:
        One weight per sum (label first, when computed), detached; zeros when the total is empty.
    """
    with torch.enable_grad():
        probe = torch.zeros(len(terms_run) + int(with_label_loss), device=device, requires_grad=True)
        terms = _chunked_normalised(trainer, probe, terms_run, counts, with_label_loss)
        label_weight = trainer.args.label_loss_weight if with_label_loss else 0.0
        total = trainer.distillation_objective.total(
            terms, label_weight, trainer.state.global_step if mode == "train" else None
        )
        if total is None:
            return torch.zeros_like(probe).detach()
        return torch.autograd.grad(total, probe, allow_unused=True, materialize_grads=True)[0].detach()


def _chunked_normalised(trainer, sums, terms_run, counts: ItemCounts, with_label_loss: bool) -> dict:
    """The chunked path's terms from its sums: the label CE per label token, the others by the objective."""
    terms: dict[str, torch.Tensor] = {}
    if with_label_loss:
        terms[LABEL_TERM] = sums[0] * counts.scale / counts.labels.clamp(min=1)
    for index, term in enumerate(terms_run):
        terms[term.name] = trainer.distillation_objective.normalise(term, sums[index + int(with_label_loss)], counts, 1)
    return terms


def record_terms(
    trainer,
    mode,
    terms,
    counts: ItemCounts,
    accumulation: int,
    distilled: bool,
    labeled: bool,
    suffix: str = "",
    extra: dict | None = None,
    log_name=None,
):
    """Training: each term's share of its step, weighed 1 per step (the log is the mean per step). Evaluation:
    each term weighed by the items it averages (label tokens, distilled positions; 1 per batch for batch-level
    losses), so the log is the mean per item over the whole evaluation set, whatever the batch sizes.

    Weights come from the step's counts — every process's, when they were summed — so a process whose rows have
    no label still weighs the step in, and every process divides the same sums by the same weights. ``suffix``
    goes after every logged name (``/peer0``: one model's terms among several trained together); ``extra`` are a
    scheme's own batch-level terms (shares of the step, like the batch-level losses). ``log_name`` maps a term's
    name to its logged name instead of the suffix (a graph's ``kl/teacher->student``).

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer` (its ``term_log`` records).
        mode: ``"train"`` or ``"eval"``.
        terms: the micro-batch's terms by name.
        counts: the step's :class:`~hf_kd.positions.ItemCounts`.
        accumulation: the number of micro-batches in the step (1 outside training).
        distilled: whether the distillation terms ran.
        labeled: whether the label loss ran.
        suffix: appended to every logged name.
        extra: a scheme's own batch-level terms by name.
        log_name: maps a term's name to its logged name (None: the name and ``suffix``).
    """
    ensemble_weights = [name for name in terms if name.startswith(WEIGHT_PREFIX)]
    terms = {**terms, **(extra or {})}
    if mode == "train":
        weights = (
            {name: 1.0 / accumulation for name in [*trainer.distillation_objective.names, *ensemble_weights]}
            if distilled
            else {}
        )
        weights.update({name: 1.0 / accumulation for name in extra or {}})
        if labeled:
            weights[LABEL_TERM] = counts.labels.gt(0).float() / accumulation
    else:
        weights = {name: 1.0 for name in [*ensemble_weights, *(extra or {})]}
        if distilled:
            for term in trainer.distillation_objective.terms:
                weights[term.name] = counts.positions / counts.scale if term.loss.per_position else 1.0
        if labeled:
            weights[LABEL_TERM] = counts.labels / counts.scale
        terms = {name: value * weights[name] for name, value in terms.items()}
    log_name = log_name or (lambda name: f"{name}{suffix}")
    trainer.term_log.record(
        mode,
        {log_name(name): value for name, value in terms.items()},
        {log_name(name): weight for name, weight in weights.items()},
    )


def unlabeled_prediction(trainer, model, inputs, plain, prediction_loss_only):
    """An evaluation batch without labels (a transfer set): the loss is the distillation total. Cached teachers
    have nothing for evaluation data: then no loss, and a warning says why nothing is reported.

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.
        model: the (wrapped) student.
        inputs: the prepared batch, as ``compute_loss`` takes it.
        plain: the student's view of the batch, without ``sample_index``.
        prediction_loss_only: return no logits.

    Returns:
        ``prediction_step``'s ``(loss, logits, labels)``: labels None, the loss None without teacher outputs.
    """
    if not trainer.teachers_cover_eval:
        if not trainer._warned_unlabeled_eval:
            logger.warning(
                "the evaluation set has no labels and a teacher is a cache, which covers the training rows "
                "only: evaluation reports neither a label loss nor distillation terms. Give the evaluation set "
                "labels, or use live teachers."
            )
            trainer._warned_unlabeled_eval = True
        logits = output_field(model(**model_inputs(plain)), "logits")
        return None, None if prediction_loss_only else logits, None
    counts = trainer._get_num_items_in_batch([inputs], trainer.args.device)
    loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=counts)
    return loss.detach(), None if prediction_loss_only else output_field(outputs, "logits"), None


def align_tokenizations(trainer, student, teacher, mask, teacher_inputs):
    """Different tokenizers: the k-th supervised student position meets the k-th supervised teacher position
    (see :mod:`hf_kd.cross_tokenizer`; for token classifiers, the k-th word: see
    :mod:`hf_kd.token_classification`).

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.
        student: the student's features (logits).
        teacher: the teacher's features (logits, dense or sparse).
        mask: the student's distilled positions.
        teacher_inputs: the teacher's view of the batch, whose labels or attention mask give its positions.

    Returns:
        ``(student, teacher, None)``: flat ``N×V`` features of the aligned positions, and no mask.

    Raises:
        ValueError: a loss that needs one vocabulary (for a student that is not a token classifier), or a side
            without labels or attention mask.
    """
    unaligned = [loss.name for loss in trainer.distillation_losses if not loss.cross_vocabulary]
    if unaligned and not is_classifier(trainer.student):  # token classifiers share a label set, not a vocabulary
        raise ValueError(
            f"the batch has teacher_input_ids (the teacher has its own tokenizer), which {unaligned} cannot "
            "compare: they need one vocabulary. Use the uld loss."
        )
    teacher_mask = trainer._distillation_mask(teacher_inputs)
    if mask is None or teacher_mask is None:
        raise ValueError("teacher_input_ids need labels or attention masks on both sides to align positions.")
    keep_student, keep_teacher = aligned_positions(mask, teacher_mask)
    return (
        ModelFeatures(logits=student.logits[keep_student]),
        ModelFeatures(logits=teacher.dense_logits()[keep_teacher]),
        None,
    )


def with_decoder_inputs(trainer, model, inputs: dict) -> dict:
    """Encoder-decoder models: the decoder inputs the student would derive from its labels, made explicit so the
    teacher (which never gets labels) and a student trained without the label loss decode the same sequence.

    Args:
        trainer: the :class:`~hf_kd.DistillationTrainer`.
        model: the (wrapped) student.
        inputs: the batch.

    Returns:
        ``inputs`` with ``decoder_input_ids`` for an encoder-decoder student given labels; else ``inputs``.
    """
    if "labels" not in inputs or "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs:
        return inputs
    student = trainer.accelerator.unwrap_model(model)
    student = student.get_base_model() if hasattr(student, "get_base_model") else student
    if not getattr(getattr(student, "config", None), "is_encoder_decoder", False):  # (custom modules: no config)
        return inputs
    labels = inputs["labels"]
    prepare = getattr(student, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return {**inputs, "decoder_input_ids": prepare(labels=labels)}
    # Models without it (Whisper) shift their labels right behind decoder_start_token_id in forward: the same here.
    config = student.config
    decoder_input_ids = labels.new_full(labels.shape, config.pad_token_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    decoder_input_ids[:, 0] = config.decoder_start_token_id
    decoder_input_ids.masked_fill_(decoder_input_ids == -100, config.pad_token_id)
    return {**inputs, "decoder_input_ids": decoder_input_ids}


def _drop_last_position(features: ModelFeatures) -> ModelFeatures:
    """Causal LMs: logits at the last position predict nothing in the batch."""
    if features.sparse_logits is not None and features.logits is None:
        return dataclasses.replace(features, sparse_logits=features.sparse_logits[:, :-1])
    if features.logits is None:
        return features
    return dataclasses.replace(features, logits=features.logits[:, :-1])


def _where(trainer, mode: str) -> str:
    return f"{mode} step {trainer.state.global_step + 1}"
