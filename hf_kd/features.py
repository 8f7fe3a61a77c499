"""What a loss compares: the per-side record both models' outputs are brought into.

A loss declares the fields it needs (``DistillationLoss.needs``); the trainer asks each model for exactly
those (see :func:`forward_kwargs`) and hands the loss one :class:`ModelFeatures` per side, so a loss reads
``student.logits`` and ``teacher.logits`` without knowing where they came from (a live model, a cache, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The fields a loss may declare in ``needs``.
KNOWN_NEEDS = frozenset({"logits"})


@dataclass
class ModelFeatures:
    """The outputs of one side (student or teacher) that the configured losses asked for."""

    logits: torch.Tensor | None = None

    @classmethod
    def from_outputs(cls, outputs, needs: frozenset[str]) -> ModelFeatures:
        logits = _output_field(outputs, "logits") if "logits" in needs else None
        if "logits" in needs and logits is None:
            raise ValueError(
                f"a configured loss needs logits but the model returned none ({type(outputs).__name__}); "
                "use a model with a task head (…ForSequenceClassification, …ForCausalLM, …)."
            )
        return cls(logits=logits)

    def map(self, fn) -> ModelFeatures:
        """A copy with ``fn`` applied to every tensor (e.g. dropping the last position for the causal shift)."""
        return ModelFeatures(logits=None if self.logits is None else fn(self.logits))


def forward_kwargs(needs: frozenset[str]) -> dict:
    """Flags that make a transformers model return what ``needs`` lists, and nothing more.

    Logits are always returned, so response-only distillation adds no flag: neither model computes hidden
    states or attentions it was not asked for.
    """
    unknown = needs - KNOWN_NEEDS
    if unknown:
        raise ValueError(f"unknown feature needs {sorted(unknown)}; known: {sorted(KNOWN_NEEDS)}.")
    return {}


def _output_field(outputs, name: str):
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        return outputs.get(name)
    return getattr(outputs, name, None)
