"""Intermediate-representation knowledge: hidden states, attention maps and feature maps of mapped layers.

Each loss compares the layers paired by ``layer_map`` (or two hooked modules) and averages over the pairs; see
:class:`~hf_kd.losses.base.LayerPairLoss` for the shared options and :mod:`hf_kd.losses.functional` for the math.
"""

from __future__ import annotations

import torch

from ..features import resolve_layer_map
from . import functional as F
from .base import LayerPairLoss
from .registry import register_loss


class _PairAverage(LayerPairLoss):
    """Averages ``pair_loss(projected student, teacher, token_mask)`` over the mapped pairs."""

    def pair_loss(self, student, teacher, token_mask):
        raise NotImplementedError

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        token_mask = student.attention_mask
        values = [
            self.pair_loss(self.project(index, s), t, token_mask)
            for index, (s, t) in enumerate(self.layer_pairs(student, teacher))
        ]
        return torch.stack(values).mean()


def _sink_keys(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"sink_keys must be a non-negative integer (how many leading keys to leave out), got {value!r}."
        )
    return value


@register_loss("hint", paper="Romero et al. 2015, FitNets: Hints for Thin Deep Nets, arXiv:1412.6550")
class Hint(_PairAverage):
    """FitNets (Romero et al. 2015): ½·mean((F_T − r(F_S))²) with r a learned regressor (Linear for tokens, 1×1
    convolution for feature maps), on the last layers by default.

    Args:
        layer_map: Which layers to pair: ``"uniform"``, ``"last"`` or ``[[s, t], ...]`` (0 is the embedding output).
        projector: ``None`` (widths must match), ``"linear"``, ``"mlp"``, ``"conv"`` or ``"auto"``: a learned map
            from the student's width to the teacher's per pair.
        student_module: A student submodule (dotted path) whose output to compare instead of hidden states.
        teacher_module: The teacher submodule compared with ``student_module``.

    Raises:
        ValueError: only one of ``student_module`` and ``teacher_module`` is set.
    """

    def __init__(self, layer_map="last", projector: str | None = "auto", student_module=None, teacher_module=None):
        super().__init__(layer_map, projector, student_module, teacher_module)

    def pair_loss(self, student, teacher, token_mask):
        return 0.5 * F.feature_mse(student, teacher, token_mask=token_mask)


@register_loss(
    "hidden_mse",
    paper="Jiao et al. 2020, TinyBERT: Distilling BERT for Natural Language Understanding, arXiv:1909.10351",
)
class HiddenMSE(_PairAverage):
    """TinyBERT's hidden-state loss: MSE(h_S·W, h_T) per mapped layer over real tokens (W only if ``projector``).

    Args:
        layer_map: Which layers to pair: ``"uniform"``, ``"last"`` or ``[[s, t], ...]`` (0 is the embedding output).
        projector: ``None`` (widths must match), ``"linear"``, ``"mlp"``, ``"conv"`` or ``"auto"``: a learned map
            from the student's width to the teacher's per pair.
        student_module: A student submodule (dotted path) whose output to compare instead of hidden states.
        teacher_module: The teacher submodule compared with ``student_module``.

    Raises:
        ValueError: only one of ``student_module`` and ``teacher_module`` is set.
    """

    def pair_loss(self, student, teacher, token_mask):
        return F.feature_mse(student, teacher, token_mask=token_mask)


@register_loss("hidden_cosine", paper="Sanh et al. 2019, DistilBERT, a distilled version of BERT, arXiv:1910.01108")
class HiddenCosine(_PairAverage):
    """DistilBERT's cosine loss: 1 − cos(h_S, h_T) over real tokens, on the last layers by default.

    Args:
        layer_map: Which layers to pair: ``"uniform"``, ``"last"`` or ``[[s, t], ...]`` (0 is the embedding output).
        projector: ``None`` (widths must match), ``"linear"``, ``"mlp"``, ``"conv"`` or ``"auto"``: a learned map
            from the student's width to the teacher's per pair.
        student_module: A student submodule (dotted path) whose output to compare instead of hidden states.
        teacher_module: The teacher submodule compared with ``student_module``.

    Raises:
        ValueError: only one of ``student_module`` and ``teacher_module`` is set.
    """

    def __init__(self, layer_map="last", projector: str | None = None, student_module=None, teacher_module=None):
        super().__init__(layer_map, projector, student_module, teacher_module)

    def pair_loss(self, student, teacher, token_mask):
        return F.feature_cosine(student, teacher, token_mask=token_mask)


@register_loss(
    "attention_mse",
    paper="Jiao et al. 2020, TinyBERT: Distilling BERT for Natural Language Understanding, arXiv:1909.10351",
)
class AttentionMSE(_PairAverage):
    """TinyBERT's attention loss: MSE between attention probabilities of mapped layers; heads are averaged when
    the counts differ. The trainer switches the models to eager attention.

    Args:
        layer_map: Which layers to pair: ``"uniform"``, ``"last"`` or ``[[s, t], ...]`` (layers 1 and above: the
            embedding output has no attention).
        sink_keys: Leave the first this many keys (attention sinks such as BERT's [CLS]) out of both maps.

    Raises:
        ValueError: ``sink_keys`` is not a non-negative integer.
    """

    field = "attentions"

    def __init__(self, layer_map="uniform", sink_keys: int = 0):
        super().__init__(layer_map=layer_map)
        self.sink_keys = _sink_keys(sink_keys)

    def pair_loss(self, student, teacher, token_mask):
        return F.attention_mse(student, teacher, token_mask=token_mask, sink_keys=self.sink_keys)


@register_loss("attention_kl", paper="Wang et al. 2020, MiniLM: Deep Self-Attention Distillation, arXiv:2002.10957")
class AttentionKL(_PairAverage):
    """MiniLM's self-attention distribution transfer: KL(A_T ‖ A_S) per query, last layers by default.

    Args:
        layer_map: Which layers to pair: ``"uniform"``, ``"last"`` or ``[[s, t], ...]`` (layers 1 and above: the
            embedding output has no attention).
        sink_keys: Leave the first this many keys (attention sinks such as BERT's [CLS]) out of both distributions,
            renormalised over the rest. A trained teacher parks much of its attention on its first token, whose value
            is small; a student that copies that mass reads a real vector instead (docs/losses.md, "Attention sinks").

    Raises:
        ValueError: ``sink_keys`` is not a non-negative integer.
    """

    field = "attentions"

    def __init__(self, layer_map="last", sink_keys: int = 0):
        super().__init__(layer_map=layer_map)
        self.sink_keys = _sink_keys(sink_keys)

    def pair_loss(self, student, teacher, token_mask):
        return F.attention_kl(student, teacher, token_mask=token_mask, sink_keys=self.sink_keys)


@register_loss(
    "pkd",
    paper="Sun et al. 2019, Patient Knowledge Distillation for BERT Model Compression, arXiv:1908.09355",
)
class PatientKD(_PairAverage):
    """Patient KD (Sun et al. 2019): ‖h_S/‖h_S‖ − h_T/‖h_T‖‖² on the first-token ([CLS]) states of mapped layers.

    Args:
        layer_map: Which layers to pair: ``"uniform"``, ``"last"`` or ``[[s, t], ...]`` (0 is the embedding output).
        projector: ``None`` (widths must match), ``"linear"``, ``"mlp"``, ``"conv"`` or ``"auto"``: a learned map
            from the student's width to the teacher's per pair.
        student_module: A student submodule (dotted path) whose output to compare instead of hidden states.
        teacher_module: The teacher submodule compared with ``student_module``.

    Raises:
        ValueError: only one of ``student_module`` and ``teacher_module`` is set.
    """

    default_weight = 100.0  # β of the paper (PKD-Skip on GLUE used 100–500)

    def pair_loss(self, student, teacher, token_mask):
        return F.pkd(_first_token(student), _first_token(teacher))


@register_loss(
    "at",
    paper="Zagoruyko & Komodakis 2017, Paying More Attention to Attention, arXiv:1612.03928",
)
class AttentionTransfer(_PairAverage):
    """Attention transfer (Zagoruyko & Komodakis 2017) on mapped feature maps (or token sequences); widths may
    differ, maps are pooled to a common size. Weight 1000 as in the paper (β/2 with β = 10³ per layer).

    Args:
        layer_map: Which layers to pair: ``"uniform"``, ``"last"`` or ``[[s, t], ...]`` (0 is the embedding output).
        p: The power p of the attention map normalize(vec(mean over channels of |F|^p)).
        student_module: A student submodule (dotted path) whose output to compare instead of hidden states.
        teacher_module: The teacher submodule compared with ``student_module``.

    Raises:
        ValueError: only one of ``student_module`` and ``teacher_module`` is set.
    """

    default_weight = 1000.0

    def __init__(self, layer_map="uniform", p: float = 2.0, student_module=None, teacher_module=None):
        super().__init__(layer_map=layer_map, student_module=student_module, teacher_module=teacher_module)
        self.p = p

    def setup(self, student, teacher, num_samples=None):
        pass  # compares channel-averaged maps: no projector needed

    def pair_loss(self, student, teacher, token_mask):
        return F.attention_transfer(student, teacher, p=self.p)


@register_loss(
    "fsp",
    paper="Yim et al. 2017, A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and "
    "Transfer Learning, CVPR 2017",
)
class FlowOfSolutionProcedure(LayerPairLoss):
    """FSP (Yim et al. 2017): MSE between Gram matrices of consecutive mapped layers; with the default uniform map
    the embedding output starts the chain. Stage widths must match, or set ``projector``.

    Args:
        layer_map: Which layers to pair: ``"uniform"``, ``"last"`` or ``[[s, t], ...]`` (0 is the embedding output).
        projector: ``None`` (widths must match), ``"linear"``, ``"mlp"``, ``"conv"`` or ``"auto"``: a learned map
            from the student's width to the teacher's per pair.
    """

    def __init__(self, layer_map="uniform", projector: str | None = None):
        super().__init__(layer_map=[(0, 0)] if layer_map == "uniform" else layer_map, projector=projector)
        self.uniform = layer_map == "uniform"

    def layer_pairs(self, student, teacher):
        if self._pairs is None and self.uniform:
            depth_s, depth_t = len(student.hidden_states) - 1, len(teacher.hidden_states) - 1
            self._pairs = [(0, 0)] + resolve_layer_map("uniform", depth_s, depth_t)
        return super().layer_pairs(student, teacher)

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        pairs = self.layer_pairs(student, teacher)
        return F.fsp([self.project(i, s) for i, (s, _) in enumerate(pairs)], [t for _, t in pairs])


def _first_token(features: torch.Tensor) -> torch.Tensor:
    return features[:, 0] if features.dim() == 3 else features.flatten(1)
