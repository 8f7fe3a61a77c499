"""A causal LM's own logits from its final hidden states, for the paths that project hidden states themselves.

``chunk_size`` and the teachers' token rows call the LM head on final hidden states instead of reading
``forward(...).logits``. ``lm_head(h)`` alone is not every model's logits: some families scale them (Granite and
MiniCPM3 divide by ``logits_scaling``, HyperCLOVAX multiplies by it, Cohere multiplies by ``logit_scale``, Falcon-H1
by ``lm_head_multiplier``), soft-cap them (Gemma 2/3/3n/4, VaultGemma, NanoChat, RecurrentGemma, xLSTM, ...) or cut
them to the real vocabulary (Inkling). :data:`OUTPUT_STEPS` lists what each transformers family's ``forward`` does
after (or just before) its LM head; :class:`LogitsHead` applies the same operations in the same order, so the result
is the model's own logits to the last bit. :meth:`LogitsHead.check` compares both once, on the first batch, and
refuses a model whose logits still differ (a family not listed, a prediction head between the hidden states and the
output embeddings as in ``BertLMHeadModel``) rather than distilling against wrong logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch built without distributed support
    FSDPModule = ()


@dataclass(frozen=True)
class OutputStep:
    """One operation a family's ``forward`` applies around its LM head, with the config field giving its value.

    Args:
        kind: ``divide_hidden`` (the final hidden states, before the head), ``multiply`` / ``divide`` (the logits),
            ``softcap`` (``cap·tanh(logits / cap)``) or ``vocabulary`` (keep the first ``value`` entries).
        field: The config field that holds the step's value (``logits_scaling``, ``final_logit_softcapping``, ...).
        value: That field's value in one model's config; ``None`` in :data:`OUTPUT_STEPS`, which lists fields only.
    """

    kind: str
    field: str
    value: float | int | None = None


def _steps(*pairs: tuple[str, str]) -> tuple[OutputStep, ...]:
    return tuple(OutputStep(kind, field) for kind, field in pairs)


_SOFTCAP = _steps(("softcap", "final_logit_softcapping"))
# transformers' causal-LM families (config.model_type) whose forward does more than lm_head(final hidden states),
# with the operations in the order their forward applies them (read from transformers 5's modeling code).
OUTPUT_STEPS: dict[str, tuple[OutputStep, ...]] = {
    **dict.fromkeys(
        ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text", "cohere_compass"),
        _steps(("multiply", "logit_scale")),
    ),
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared"),
        _steps(("divide", "logits_scaling")),
    ),
    "minicpm3": _steps(("divide_hidden", "logits_scaling")),
    "hyperclovax": _steps(("multiply", "logits_scaling")),
    "falcon_h1": _steps(("multiply", "lm_head_multiplier")),
    "inkling_text": _steps(("divide_hidden", "logits_mup_width_multiplier"), ("vocabulary", "unpadded_vocab_size")),
    **dict.fromkeys(
        (
            "gemma2",
            "gemma3_text",
            "gemma3n_text",
            "gemma3n",
            "gemma4_text",
            "gemma4",
            "gemma4_unified_text",
            "gemma4_unified",
            "vaultgemma",
            "nanochat",
            "beam",
            "inkling2_text",
            "inkling2_loop_text",
        ),
        _SOFTCAP,
    ),
    "recurrent_gemma": _steps(("softcap", "logits_soft_cap")),
    "xlstm": _steps(("softcap", "output_logit_soft_cap")),
}


def output_steps(config) -> tuple[OutputStep, ...]:
    """The operations ``config``'s family applies around its LM head, with their values (unset fields skipped).

    Args:
        config: A model's ``PretrainedConfig`` (a multimodal one's text config is read for the values).

    Returns:
        The family's steps (:class:`OutputStep`) in the order its ``forward`` applies them, each with its value;
            empty for a family whose logits are ``lm_head(h)``.
    """
    fields = config.get_text_config() if hasattr(config, "get_text_config") else config
    steps = []
    for step in OUTPUT_STEPS.get(getattr(config, "model_type", None), ()):
        value = getattr(fields, step.field, None)
        if value is None and fields is not config:
            value = getattr(config, step.field, None)
        if value is not None and (value or step.kind != "softcap"):  # a soft-cap of 0 or False is none
            steps.append(OutputStep(step.kind, step.field, value))
    return tuple(steps)


class LogitsHead:
    """``model``'s final hidden states → its logits: the hidden-side steps of its family, its output embeddings, then
    the logit-side steps (:data:`OUTPUT_STEPS`), each computed as the model's ``forward`` computes it.

    Args:
        model: A causal LM (a PEFT model, or one unwrapped from DDP/DeepSpeed, works too).
        name: How errors name the model (``"the student"``, ``"the teacher"``).

    Attributes:
        module: The output embeddings (``model.get_output_embeddings()``).
        steps: The family's operations around it, with their values.

    Raises:
        ValueError: ``model`` has no output embeddings.
    """

    def __init__(self, model: nn.Module, name: str = "the model"):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.module = model.get_output_embeddings()
        if self.module is None:
            raise ValueError(f"{name} ({type(base).__name__}) has no output embeddings (get_output_embeddings()).")
        self.config = base.config
        self.steps = output_steps(self.config)
        self.name = name
        self.model_class = type(base).__name__
        self.family = getattr(self.config, "model_type", None)

    @classmethod
    def of_head(cls, module: nn.Module, name: str = "the model") -> LogitsHead:
        """A bare output layer as the whole map (no family steps): for calling the chunked loss on plain tensors.

        Args:
            module: The output embeddings, e.g. an ``nn.Linear(hidden, vocab)``.
            name: How errors name the model.

        Returns:
            The map ``module(h)``.
        """
        head = cls.__new__(cls)
        head.module, head.config, head.steps, head.name = module, None, (), name
        head.model_class, head.family = type(module).__name__, None
        return head

    # ---- the map --------------------------------------------------------------------------------------------

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for final hidden states.

        Args:
            hidden: Final hidden states (…×H).

        Returns:
            The logits (…×V), as the model's ``forward`` computes them.
        """
        return self.finish(self.project(self.prepare(hidden)))

    @property
    def prepares_hidden(self) -> bool:
        """Whether the family scales the hidden states before the head (so :meth:`prepare` is not the identity)."""
        return any(step.kind == "divide_hidden" for step in self.steps)

    @property
    def finishes_logits(self) -> bool:
        """Whether the family changes the head's output (so :meth:`finish` is not the identity)."""
        return any(step.kind != "divide_hidden" for step in self.steps)

    def prepare(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's input: the final hidden states after the family's hidden-side steps.

        Args:
            hidden: Final hidden states (…×H).

        Returns:
            The hidden states the output embeddings read (…×H).
        """
        for step in self.steps:
            if step.kind == "divide_hidden":
                hidden = hidden / step.value
        return hidden

    def project(self, inputs: torch.Tensor) -> torch.Tensor:
        """The output embeddings' output (raw logits, before the logit-side steps).

        Args:
            inputs: What :meth:`prepare` returned (…×H).

        Returns:
            The raw logits (…×V).
        """
        if isinstance(self.module, FSDPModule) and isinstance(self.module, nn.Linear):
            # An FSDP2 unit of its own: calling it would run its hooks on every chunk (re-gathering a teacher's head,
            # reducing the student's gradients before the backward pass is done). The caller holds it gathered.
            return F.linear(inputs, self.module.weight, self.module.bias)
        return self.module(inputs)

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """The logit-side steps, in the family's order and with its operations (so low precision rounds alike).

        Args:
            raw: What :meth:`project` returned (…×V).

        Returns:
            The model's logits (…×V, or fewer entries where the family cuts them to its real vocabulary).
        """
        logits = raw
        for step in self.steps:
            if step.kind == "multiply":
                logits = logits * step.value
            elif step.kind == "divide":
                logits = logits / step.value
            elif step.kind == "softcap":
                logits = torch.tanh(logits / step.value) * step.value
            elif step.kind == "vocabulary" and step.value < logits.shape[-1]:
                logits = logits[..., : step.value]
        return logits

    @property
    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight, bias)`` when the output embeddings are a plain ``nn.Linear`` (FSDP2-wrapped or not), whose
        gradients the fused chunked loss writes itself; ``None`` for any other module (autograd then)."""
        module = self.module
        plain = type(module) is nn.Linear or (
            isinstance(module, FSDPModule) and isinstance(module, nn.Linear) and type(module).__bases__[-1] is nn.Linear
        )
        return (module.weight, module.bias) if plain else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The head's parameters that train.

        Returns:
            The parameters with ``requires_grad`` (none for a frozen or LoRA-adapted base head).
        """
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def gathered_per_call(self) -> bool:
        """DeepSpeed ZeRO-3 partitions the head: each call gathers it collectively (and its gradients are reduced by
        the engine's own hooks), so the head must be called as a module in the forward and backward passes."""
        return any(hasattr(p, "ds_id") for p in self.module.parameters())

    # ---- the dry run ----------------------------------------------------------------------------------------

    def describe(self) -> str:
        """The map as a formula, for error messages.

        Returns:
            E.g. ``"get_output_embeddings()(h) / logits_scaling (4)"``.
        """
        text = "h"
        for step in self.steps:
            if step.kind == "divide_hidden":
                text = f"{text} / {step.field} ({step.value:g})"
        text = f"get_output_embeddings()({text})"
        for step in self.steps:
            if step.kind == "multiply":
                text = f"{text} · {step.field} ({step.value:g})"
            elif step.kind == "divide":
                text = f"{text} / {step.field} ({step.value:g})"
            elif step.kind == "softcap":
                text = f"soft-capped at {step.field} ({step.value:g}): c·tanh(({text}) / c)"
            elif step.kind == "vocabulary":
                text = f"({text})[..., :{step.field} ({step.value})]"
        return text

    def check(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Refuse the model when its own logits differ from this map's, at the positions given.

        Args:
            hidden: Final hidden states of a few positions (…×H), from the same forward pass as ``logits``.
            logits: The model's own ``forward(...).logits`` at those positions (…×V).

        Raises:
            ValueError: The two differ beyond the rounding of the model's dtype; the message names the model class
                and family and says what to do.
        """
        try:
            with torch.no_grad():
                ours = self(hidden)
        except RuntimeError as error:  # e.g. a prediction head of another width sits before the output embeddings
            ours, difference = None, f"an error ({str(error).splitlines()[0]})"
        if ours is None:
            pass
        elif ours.shape != logits.shape:
            difference = f"logits of shape {tuple(ours.shape)} instead of {tuple(logits.shape)}"
        else:
            ours, own = ours.float(), logits.float()
            dtypes = [hidden.dtype, logits.dtype]
            if torch.is_autocast_enabled(hidden.device.type):  # the head ran in the autocast dtype
                dtypes.append(torch.get_autocast_dtype(hidden.device.type))
            lowest = min(dtypes, key=lambda dtype: torch.finfo(dtype).bits)
            rtol = max(4 * torch.finfo(lowest).eps, 1e-5)
            atol = rtol * own.pow(2).mean().sqrt().item()
            gap = (ours - own).abs()
            if bool((gap <= atol + rtol * own.abs()).all()):
                return
            largest, size = gap.max().item(), own.abs().max().item()
            difference = f"a largest difference of {largest:.4g} (logits of size ~{size:.3g})"
        raise ValueError(
            f"{self.name}'s own logits are not {self.describe()} of its final hidden states: on the first batch "
            f"hf_kd's hidden-state path gives {difference} at {logits.shape[:-1].numel()} positions, for "
            f"{self.model_class} (model family {self.family!r}). chunk_size (and a teacher's token rows) project "
            "final hidden states themselves, so this model would be distilled against wrong logits. Leave "
            "chunk_size unset for it (the plain path reads forward(...).logits); if the family scales or caps its "
            "logits in forward(), hf_kd.losses.lm_head.OUTPUT_STEPS needs an entry for it."
        )
