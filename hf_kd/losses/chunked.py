"""Token-level distillation from final hidden states and LM heads, chunk by chunk.

Neither model's B×T×V logits are ever held whole. For each chunk of ``chunk_size`` supervised positions both models'
logits are made from their final hidden states (each model's own logits: :class:`~hf_kd.losses.lm_head.LogitsHead`),
every response loss and the label cross-entropy are summed over the chunk, and the chunk's logits are freed.

Gradients are fused into that pass (Liger-Kernel's approach to its fused linear losses): given each term's weight in
the step's total, the gradient of the weighted terms with respect to the chunk's student logits is computed right
away and turned into the gradients of the student's hidden states and LM head, accumulated over the chunks; the
backward pass only scales them by the factor autograd brings (gradient accumulation, loss scaling). Nothing is
recomputed. ``kl``, ``reverse_kl``, ``jsd``, ``soft_ce`` and the label CE have their gradients written out (a few
passes over each chunk's logits, where autograd makes several times more); any other loss of the registry goes
through autograd on the chunk's logits. Under DeepSpeed ZeRO-3, whose partitioned head must be called as a module in
both passes, each chunk's student logits are instead recomputed in the backward pass (activation checkpointing).
Values and gradients equal the plain path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..features import ModelFeatures
from .lm_head import FSDPModule, LogitsHead  # noqa: F401  (FSDPModule: re-exported for the teachers)
from .response import ForwardKL, GeneralizedJSD, ReverseKL, SoftCrossEntropy, thresholded


def chunked_token_terms(
    student_hidden: torch.Tensor,
    teacher_rows: tuple[torch.Tensor, ...],
    targets: torch.Tensor | None,
    *,
    student_head: LogitsHead,
    teacher_logits: Callable[..., torch.Tensor] | None,
    losses: list,
    with_label_loss: bool,
    chunk_size: int,
    min_chunks: int = 0,
    weights: torch.Tensor | None = None,
    confident_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sums over positions of ``[label CE (if with_label_loss), loss₁, loss₂, ...]``, computed chunk by chunk.

    Args:
        student_hidden: Final hidden states of the N supervised positions (N×H).
        teacher_rows: One row per position of whatever the teacher's logits are made from (its hidden states, or
            cached top-k ids and log-probs), turned into logits chunk by chunk by ``teacher_logits(*rows)`` under
            ``no_grad``.
        targets: The next-token ids (N), for the label loss and ``dkd``.
        student_head: The student's own hidden → logits map.
        teacher_logits: See ``teacher_rows``; ``None`` without distillation losses.
        losses: Response losses (per-position, reading logits), each summed over the positions.
        with_label_loss: Whether the first sum is the label cross-entropy.
        chunk_size: Positions per chunk.
        min_chunks: Pads the loop with empty chunks: with sharded LM heads (ZeRO-3) every process must call them the
            same number of times, whatever its token count.
        weights: Each sum's weight in the total that will be backpropagated (``∂ total / ∂ sums``). With it the
            gradients are computed in this pass; the backward pass then requires the gradient reaching the sums to
            be a multiple of ``weights``. Without it (or under ZeRO-3) each chunk is recomputed in the backward pass.
        confident_counts: One entry per loss: each loss with a ``confidence_threshold`` adds the number of positions
            where the teacher reaches it (the kept share the trainer logs as ``confident/TERM``), once per position
            whichever path runs; the other entries are left as they are.

    Returns:
        A vector of ``int(with_label_loss) + len(losses)`` sums.

    Raises:
        ValueError: ``chunk_size`` is not positive, or the student's and teacher's vocabularies differ.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}.")
    chunks = _Chunks(
        student_head, teacher_rows, targets, teacher_logits, losses, with_label_loss, chunk_size, confident_counts
    )
    num_chunks = max(-(-len(student_hidden) // chunk_size), min_chunks)
    parameters = student_head.trainable_parameters()
    if not torch.is_grad_enabled() or not (student_hidden.requires_grad or parameters):
        return chunks.values(student_hidden, num_chunks)
    if weights is None or student_head.gathered_per_call:
        return chunks.recomputed(student_hidden, num_chunks)
    return _FusedChunkedTerms.apply(student_hidden, weights.detach(), chunks, num_chunks, *parameters)


class _FusedChunkedTerms(torch.autograd.Function):
    """The sums of the chunked terms; their gradients with respect to the hidden states and the head's parameters are
    computed in the forward pass, for the total ``Σᵢ weightsᵢ·sumsᵢ``, and scaled in the backward pass."""

    @staticmethod
    def forward(ctx, hidden, weights, chunks, num_chunks, *parameters):
        sums, grad_hidden, grad_parameters = chunks.fused(hidden, weights, num_chunks, parameters)
        ctx.save_for_backward(weights, grad_hidden, *grad_parameters)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        weights, grad_hidden, *grad_parameters = ctx.saved_tensors
        factor = _common_factor(grad_sums, weights)
        grads = [grad_hidden, *grad_parameters]
        if factor != 1.0:
            grads = [None if grad is None else grad * factor for grad in grads]
        return grads[0], None, None, None, *grads[1:]


def _common_factor(grad_sums: torch.Tensor, weights: torch.Tensor) -> float:
    """λ with ``grad_sums = λ·weights``: the gradients were computed for the weighted total, so the backward pass can
    only scale them; any other use of the sums (one term alone, other weights) is an error, not a silent one."""
    grad_sums, weights = grad_sums.double(), weights.to(grad_sums.device).double()
    norm = weights.dot(weights)
    factor = (grad_sums.dot(weights) / norm) if norm > 0 else torch.zeros((), dtype=torch.double)
    tolerance = 1e-4 * max(grad_sums.abs().max().item(), (factor * weights).abs().max().item(), 1e-30)
    if not bool(((grad_sums - factor * weights).abs() <= tolerance).all()):
        raise RuntimeError(
            "the fused chunked loss computed its gradients for the term weights "
            f"{[round(w, 6) for w in weights.tolist()]}, but the backward pass brings {grad_sums.tolist()}, which is "
            "not a multiple of them: backpropagate the weighted total the weights were given for, or call "
            "chunked_token_terms without weights (each chunk is then recomputed in the backward pass)."
        )
    factor = factor.item()
    return 1.0 if abs(factor - 1.0) <= 1e-6 else factor  # the same weights up to rounding: no scaled copy


class _Chunks:
    """The chunk loop over one batch's supervised positions, in its three forms: values only (no gradient needed),
    fused (gradients in the same pass) and recomputed (activation checkpointing, for ZeRO-3)."""

    def __init__(
        self, head, teacher_rows, targets, teacher_logits, losses, with_label_loss, chunk_size, confident_counts=None
    ):
        self.head, self.teacher_rows, self.targets = head, teacher_rows, targets
        self.teacher_logits, self.losses, self.with_label_loss = teacher_logits, losses, with_label_loss
        self.chunk_size = chunk_size
        self.size = len(losses) + int(with_label_loss)
        self.confident_counts = confident_counts  # see chunked_token_terms

    def slices(self, num_chunks: int):
        for start in range(0, num_chunks * self.chunk_size, self.chunk_size):
            chunk = slice(start, start + self.chunk_size)
            targets = None if self.targets is None else self.targets[chunk]
            yield chunk, targets, [row[chunk] for row in self.teacher_rows]

    def values(self, hidden: torch.Tensor, num_chunks: int) -> torch.Tensor:
        totals = torch.zeros(self.size, device=hidden.device)
        with torch.no_grad():
            for chunk, targets, rows in self.slices(num_chunks):
                totals += self.terms(self.head.project(self.head.prepare(hidden[chunk])), targets, rows, None)[0]
        return totals

    def recomputed(self, hidden: torch.Tensor, num_chunks: int) -> torch.Tensor:
        totals = [
            checkpoint(self.terms_by_autograd, hidden[chunk], targets, *rows, use_reentrant=False)
            for chunk, targets, rows in self.slices(num_chunks)
        ]
        self.confident_counts = None  # the backward pass recomputes the chunks: their positions are counted already
        if not totals:  # no supervised position in this batch
            return hidden.sum() * 0 + torch.zeros(self.size, device=hidden.device)
        return torch.stack(totals).sum(0)

    def fused(self, hidden, weights, num_chunks, parameters):
        head, linear = self.head, self.head.linear
        weight_values = weights.tolist()
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_parameters = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in parameters]
        totals = torch.zeros(self.size, device=hidden.device)
        autocast = torch.is_autocast_enabled(hidden.device.type)
        for chunk, targets, rows in self.slices(num_chunks):
            # A graph only where autograd takes the gradients: through a family's division of the hidden states,
            # and through a head that is not a plain Linear (its parameters too).
            needs_graph = grad_hidden is not None and (head.prepares_hidden or linear is None)
            with torch.enable_grad():
                hidden_chunk = hidden[chunk].detach().requires_grad_(needs_graph)
                inputs = head.prepare(hidden_chunk)
                if linear is None:
                    raw = head.project(inputs)
            if linear is not None:  # grad mode is off here (inside autograd.Function.forward): no graph
                # Passed inline: terms() holds the only reference to the chunk's logits and frees them early.
                values, grad_raw = self.terms(F.linear(inputs.detach(), *linear), targets, rows, weight_values)
            else:  # autograd still reads the module's output: not this loop's to overwrite
                values, grad_raw = self.terms(raw.detach(), targets, rows, weight_values, owns_raw=False)
            totals += values
            if linear is not None:
                weight, bias = linear
                grad_raw_low = grad_raw.to(weight.dtype)
                if grad_hidden is not None:
                    grad_inputs = grad_raw_low @ weight
                    if needs_graph:
                        (grad_inputs,) = torch.autograd.grad(inputs, hidden_chunk, grad_inputs)
                    grad_hidden[chunk] = grad_inputs
                for parameter, accumulated in zip(parameters, grad_parameters):
                    if parameter is weight and (weight.dtype != torch.float32 or autocast):
                        # In the dtype autograd would use (bf16/fp16 weights, or autocast's): tensor cores, where an
                        # fp32 product is several times slower on GPUs; summed over chunks in fp32.
                        accumulated += grad_raw_low.T @ inputs.detach().to(grad_raw_low.dtype)
                    elif parameter is weight:
                        accumulated.addmm_(grad_raw.T, inputs.detach().float())
                    elif parameter is bias:
                        accumulated += grad_raw.sum(0)
            else:
                sources = ([hidden_chunk] if grad_hidden is not None else []) + list(parameters)
                if not raw.requires_grad:
                    continue
                grads = torch.autograd.grad(raw, sources, grad_raw.to(raw.dtype), allow_unused=True)
                if grad_hidden is not None:
                    grad_hidden[chunk], grads = grads[0], grads[1:]
                for grad, accumulated in zip(grads, grad_parameters):
                    if grad is not None:
                        accumulated += grad
            raw = grad_raw = grad_raw_low = None  # freed before the next chunk's logits exist
        grad_parameters = [grad.to(p.dtype) for grad, p in zip(grad_parameters, parameters)]
        return totals, grad_hidden, grad_parameters

    def terms(self, raw, targets, rows, weights: list[float] | None, owns_raw: bool = True):
        """``(the chunk's sums, ∂(Σ weightsᵢ·sumsᵢ)/∂raw or None)`` for the head's raw output ``raw`` (C×V);
        ``owns_raw``: nothing else reads ``raw``, which may then be overwritten and freed as soon as it is softened."""
        wants_grad = weights is not None
        if wants_grad and self.head.finishes_logits:  # scales, soft-caps: autograd takes the gradient through them
            with torch.enable_grad():
                raw = raw.detach().requires_grad_()
                logits = self.head.finish(raw)
        else:
            logits = self.head.finish(raw)
        fused = [loss for loss in self.losses if _fused_kernel(loss) is not None]
        # Autograd losses read both models' logits as they are; a family's output steps need them for the gradient.
        keeps_logits = len(fused) < len(self.losses) or (wants_grad and self.head.finishes_logits)
        temperatures = {float(loss.temperature) for loss in fused}
        teacher, teacher_side = None, None
        if self.losses:
            with torch.no_grad():
                teacher = self.teacher_logits(*rows)
            _check_vocabularies(logits, teacher)
            teacher_side = _Softened(teacher.float(), temperatures, temperatures)
            teacher = ModelFeatures(logits=teacher) if keeps_logits else None  # fused losses read the softened groups
            self.count_confident(teacher)
        student_side = _Softened(
            logits.detach().float(),
            temperatures | ({1.0} if self.with_label_loss else set()),
            temperatures,
            targets if self.with_label_loss else None,
            overwrite=owns_raw and not keeps_logits,  # the logits are this chunk's own and read by nothing else
        )
        if not keeps_logits:
            del logits, raw
        grad = student_side.zeros() if wants_grad else None
        values = []
        index = 0
        if self.with_label_loss:
            values.append(_label_cross_entropy(student_side, targets, grad, weights[0] if wants_grad else 0.0))
            index = 1
        for loss in self.losses:
            weight = weights[index] if wants_grad else 0.0
            kernel = _fused_kernel(loss)
            if kernel is not None:
                values.append(kernel(loss, student_side, teacher_side, grad, weight))
            else:
                values.append(_autograd_term(loss, logits.detach(), teacher, targets, grad, weight))
            index += 1
        grad_raw = None
        if wants_grad:
            grad_raw = grad
            if self.head.finishes_logits:
                (grad_raw,) = torch.autograd.grad(logits, raw, grad.to(logits.dtype))
        return torch.stack([value.float() for value in values]), grad_raw

    def count_confident(self, teacher: ModelFeatures | None) -> None:
        """Adds the chunk's confident positions of each thresholded loss to ``confident_counts`` (the loss reuses the
        mask: it is kept on ``teacher``)."""
        if self.confident_counts is None or teacher is None:
            return
        for index, loss in enumerate(self.losses):
            if thresholded(loss):
                self.confident_counts[index] += loss.confident_mask(teacher, None).sum()

    def terms_by_autograd(self, hidden, targets, *rows):
        """The chunk's sums through the losses' own forward passes (the recomputed path)."""
        student_logits = self.head(hidden)
        values = []
        if self.with_label_loss:
            values.append(F.cross_entropy(student_logits.float(), targets, ignore_index=-100, reduction="sum"))
        if self.losses:
            with torch.no_grad():
                teacher = self.teacher_logits(*rows)
            _check_vocabularies(student_logits, teacher)
            student, teacher = ModelFeatures(logits=student_logits), ModelFeatures(logits=teacher)
            self.count_confident(teacher)
            for loss in self.losses:
                values.append(loss(student, teacher, labels=targets))
        return torch.stack(values)


def _check_vocabularies(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"the student has {student_logits.shape[-1]} vocabulary entries and the teacher "
            f"{teacher_logits.shape[-1]}: logit-based losses need the same tokenizer; for different tokenizers use "
            "the uld loss with teacher_input_ids (see hf_kd.cross_tokenizer)."
        )


class _Softened:
    """One side's chunk of logits z (float32), softened: for each temperature τ of ``temperatures`` the probabilities
    ``softmax(z/τ)``, and at those of ``log_probs_at`` ``log softmax(z/τ)`` too, made once and shared by the terms;
    with ``targets``, ``log softmax(z)`` at the targets (the label CE). z itself is not kept, so the caller can free
    it; with ``overwrite`` it is divided by each τ in place rather than copied. Log-probabilities of −inf (masked
    vocabulary entries) become the most negative float, as in :mod:`hf_kd.losses.functional`, so that 0·log 0 is 0 in
    values and gradients."""

    def __init__(self, logits, temperatures: set[float], log_probs_at: set[float], targets=None, overwrite=False):
        lowest = torch.finfo(logits.dtype).min
        # The gradient buffer's form: with only autograd losses and no label loss there is no softened group to copy.
        self._shape, self._dtype, self._device = logits.shape, logits.dtype, logits.device
        self._groups: dict[float, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.target_log_probs = None
        divided_by = 1.0  # what ``logits`` holds now: z / divided_by
        for temperature in sorted(temperatures, key=lambda tau: tau != 1.0):  # τ = 1 first: the targets read z
            if temperature == divided_by:
                scaled = logits
            elif overwrite:
                scaled, divided_by = logits.mul_(divided_by / temperature), temperature
            else:
                scaled = logits / temperature
            if temperature in log_probs_at:
                log_probs = torch.log_softmax(scaled, dim=-1).clamp_(min=lowest)
                self._groups[temperature] = (log_probs, log_probs.exp())
            else:  # the label CE alone: probabilities, and the log-probabilities of the targets below
                self._groups[temperature] = (None, torch.softmax(scaled, dim=-1))
            if temperature == 1.0 and targets is not None:
                self.target_log_probs = self._target_log_probs(scaled, targets, lowest)

    def _target_log_probs(self, logits, targets, lowest):
        log_probs, probs = self._groups[1.0]
        safe = targets.clamp(min=0)[:, None]
        if log_probs is not None:
            picked = log_probs.gather(1, safe).squeeze(1)
            picked = picked.masked_fill(picked <= lowest, -math.inf)  # a masked target: CE = inf
        else:  # log p(t) = z_t − log Σ exp z, the normaliser read off the most probable entry k: z_k − log p_k
            top = probs.argmax(-1, keepdim=True)
            normaliser = logits.gather(1, top) - probs.gather(1, top).log()
            picked = (logits.gather(1, safe) - normaliser).squeeze(1)
        return picked.masked_fill(targets == -100, 0.0)

    def at(self, temperature: float) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(log softmax(z/τ) or None, softmax(z/τ))``."""
        return self._groups[temperature]

    def zeros(self) -> torch.Tensor:
        """A gradient buffer of the logits' shape."""
        return torch.zeros(self._shape, dtype=self._dtype, device=self._device)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row, as a batch of 1×V · V×1 products (no C×V temporary); for sums of one sign only, whose
    rounding stays relative to the result (differences of large sums go through :func:`_row_sum_of_products`)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


def _row_sum_of_products(factor: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_v factor·values per row, ``values`` overwritten by the products and summed the way the plain path sums them
    (a KL is a small sum of terms of both signs: made from two large dot products it would lose digits)."""
    return values.mul_(factor).sum(-1)


# Each fused loss returns its sum over the chunk and adds weight·∂sum/∂z to ``grad`` (z: the student's logits).
# With z/τ softened: ∂(τ²·L)/∂z = τ·∂L/∂(z/τ).


def _label_cross_entropy(student: _Softened, targets, grad, weight):
    """Σ −log p_S(target) over the positions with a target (not -100); ∂/∂z = p_S − onehot(target)."""
    _, probs = student.at(1.0)
    value = -student.target_log_probs.sum()
    if grad is not None and weight:
        given = (targets != -100)[:, None].to(probs.dtype)
        grad.addcmul_(probs, given, value=weight)
        grad.scatter_add_(1, targets.clamp(min=0)[:, None], given * -weight)
    return value


def _forward_kl(loss, student: _Softened, teacher: _Softened, grad, weight):
    """τ²·Σ p_T·(log p_T − log p_S); ∂/∂z = τ·(p_S − p_T)."""
    tau = loss.temperature
    log_s, p_s = student.at(tau)
    log_t, p_t = teacher.at(tau)
    value = _row_sum_of_products(p_t, log_t - log_s).sum() * tau**2
    if grad is not None and weight:
        grad.add_(p_s, alpha=weight * tau).sub_(p_t, alpha=weight * tau)
    return value


def _soft_cross_entropy(loss, student: _Softened, teacher: _Softened, grad, weight):
    """−τ²·Σ p_T·log p_S; the same gradient as the forward KL."""
    tau = loss.temperature
    log_s, p_s = student.at(tau)
    _, p_t = teacher.at(tau)
    value = -_row_dot(p_t, log_s).sum() * tau**2
    if grad is not None and weight:
        grad.add_(p_s, alpha=weight * tau).sub_(p_t, alpha=weight * tau)
    return value


def _student_kl_and_grad(p_s, gap, grad, scale):
    """KL(p_S ‖ q) per row from ``gap`` = log p_S − log q (overwritten), and ``grad += scale·p_S·(gap − KL)``, the
    gradient of that KL with respect to the student's logits."""
    per_row = _row_sum_of_products(p_s, gap)  # gap now holds p_S·gap
    if grad is not None and scale:
        grad.add_(gap, alpha=scale).addcmul_(p_s, per_row[:, None], value=-scale)
    return per_row


def _reverse_kl(loss, student: _Softened, teacher: _Softened, grad, weight):
    """τ²·Σ p_S·(log p_S − log p_T); ∂/∂z = τ·p_S·(log p_S − log p_T − KL)."""
    tau = loss.temperature
    log_s, p_s = student.at(tau)
    log_t, _ = teacher.at(tau)
    return _student_kl_and_grad(p_s, log_s - log_t, grad, weight * tau).sum() * tau**2


def _generalized_jsd(loss, student: _Softened, teacher: _Softened, grad, weight):
    """τ²·[β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m)], m = β·p_T + (1 − β)·p_S (TRL's convention; β = 0 and 1 are the
    forward and reverse KL); ∂/∂z = τ·(1 − β)·p_S·(log p_S − log m − KL(p_S ‖ m))."""
    beta = loss.options["beta"]
    if beta == 0.0:
        return _forward_kl(loss, student, teacher, grad, weight)
    if beta == 1.0:
        return _reverse_kl(loss, student, teacher, grad, weight)
    tau = loss.temperature
    log_s, p_s = student.at(tau)
    log_t, p_t = teacher.at(tau)
    log_m = torch.lerp(p_s, p_t, beta).log_().clamp_(min=torch.finfo(p_s.dtype).min)
    teacher_kl = _row_sum_of_products(p_t, log_t - log_m)
    gap = torch.sub(log_s, log_m, out=log_m)  # log p_S − log m, in log m's place
    student_kl = _student_kl_and_grad(p_s, gap, grad, weight * tau * (1 - beta))
    return (beta * teacher_kl + (1 - beta) * student_kl).sum() * tau**2


_FUSED_LOSSES = {
    ForwardKL: _forward_kl,
    ReverseKL: _reverse_kl,
    GeneralizedJSD: _generalized_jsd,
    SoftCrossEntropy: _soft_cross_entropy,
}


def _fused_kernel(loss):
    """The loss's written-out gradient, or None: autograd takes it (a confidence threshold masks positions, which
    the kernels do not)."""
    return None if thresholded(loss) else _FUSED_LOSSES.get(type(loss))


def _autograd_term(loss, logits, teacher: ModelFeatures, targets, grad, weight):
    """Any other loss: its own forward on the chunk's logits, its gradient by autograd."""
    student_logits = logits.requires_grad_(grad is not None and bool(weight))
    with torch.enable_grad() if student_logits.requires_grad else torch.no_grad():
        value = loss(ModelFeatures(logits=student_logits), teacher, labels=targets)
    if student_logits.requires_grad:
        (term_grad,) = torch.autograd.grad(value, student_logits)
        grad.add_(term_grad, alpha=weight)
    return value.detach()
