"""Mutual-information knowledge: variational (VID) and contrastive (CRD, InfoNCE) bounds between representations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as torch_F
from accelerate.utils import gather, pad_across_processes
from torch import nn

from ..projectors import Projector, channel_width
from . import functional as F
from .base import EmbeddingRelationLoss, LayerPairLoss
from .registry import register_loss


@register_loss(
    "vid",
    paper="Ahn et al. 2019, Variational Information Distillation for Knowledge Transfer, arXiv:1904.05835",
)
class VariationalInformationDistillation(LayerPairLoss):
    """VID (Ahn et al. 2019): maximises a variational lower bound of I(t; s) with a Gaussian q(t | s).

    Per mapped layer pair (last by default): a regressor μ(s) (a two-layer MLP, or 1×1 convolutions on feature
    maps) and a per-channel variance σ² = softplus(a) + ε, both learned; loss ½·mean((t − μ(s))²/σ² + log σ²).

    Args:
        layer_map: Which layers to pair: ``"uniform"``, ``"last"`` or ``[[s, t], ...]`` (0 is the embedding output).
        init_variance: σ² at the start, per channel.
        eps: ε, the variance's floor.
        student_module: A student submodule (dotted path) whose output to compare instead of hidden states.
        teacher_module: The teacher submodule compared with ``student_module``.

    Raises:
        ValueError: only one of ``student_module`` and ``teacher_module`` is set.
    """

    def __init__(
        self, layer_map="last", init_variance: float = 5.0, eps: float = 1e-5, student_module=None, teacher_module=None
    ):
        super().__init__(layer_map, None, student_module, teacher_module)
        self.init_variance, self.eps = init_variance, eps
        self.variance_logits = nn.ParameterList()

    def setup(self, student, teacher, num_samples=None):
        for s, t in self.layer_pairs(student, teacher):
            self.projectors.append(Projector("mlp", channel_width(s), channel_width(t), s.dim()))
            # softplus(a) + ε = init_variance at the start, as in the paper's code
            start = math.log(math.expm1(self.init_variance - self.eps))
            self.variance_logits.append(nn.Parameter(torch.full((channel_width(t),), start)))

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        if len(self.projectors) == 0:
            raise RuntimeError("vid has no regressor yet: DistillationTrainer creates it from a first batch.")
        values = []
        for index, (s, t) in enumerate(self.layer_pairs(student, teacher)):
            variance = torch_F.softplus(self.variance_logits[index]) + self.eps
            values.append(F.vid(t, self.projectors[index](s), variance, token_mask=student.attention_mask))
        return torch.stack(values).mean()


@register_loss(
    "infonce",
    paper="van den Oord et al. 2018, Representation Learning with Contrastive Predictive Coding, arXiv:1807.03748",
)
class InfoNCE(EmbeddingRelationLoss):
    """In-batch InfoNCE between student and teacher embeddings (a lower bound of their mutual information);
    a learned Linear maps the student to the teacher's width when they differ.

    Args:
        source: Which features to read: ``"hidden_states:-1"`` (any index), ``"logits"``, ``"embeddings"`` or
            ``"module:PATH"``.
        pooling: How tokens or feature maps become one vector per example: ``auto``, ``cls``, ``mean``, ``last``,
            ``spatial`` or ``flatten``.
        student_source: The student's source, when it differs from ``source``.
        teacher_source: The teacher's source, when it differs from ``source``.
        nce_temperature: τ dividing the cosine similarities.
    """

    min_batch_size = 2  # with one example the positive is the only candidate: log 1 = 0

    def __init__(
        self,
        source="hidden_states:-1",
        pooling="auto",
        student_source=None,
        teacher_source=None,
        nce_temperature: float = 0.07,
    ):
        super().__init__(source, pooling, student_source, teacher_source)
        self.nce_temperature = nce_temperature
        self.projector: nn.Module = nn.Identity()

    def setup(self, student, teacher, num_samples=None):
        s, t = self.embeddings(student, "student"), self.embeddings(teacher, "teacher")
        if s.shape[-1] != t.shape[-1]:
            self.projector = Projector("linear", s.shape[-1], t.shape[-1], 2)

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        s = self.projector(self.embeddings(student, "student"))
        return F.info_nce(s, self.embeddings(teacher, "teacher"), temperature=self.nce_temperature)


@register_loss("crd", paper="Tian et al. 2020, Contrastive Representation Distillation, arXiv:1910.10699")
class ContrastiveRepresentationDistillation(EmbeddingRelationLoss):
    """CRD (Tian et al. 2020) with memory banks, in its softmax (InfoNCE) form.

    Student and teacher embeddings pass through learned linear heads to ``feature_dim`` and are L2-normalised.
    Each student embedding must pick its example's entry of the teacher memory bank among ``num_negatives``
    random entries, and each teacher embedding its example's entry of the student bank, at temperature
    ``nce_temperature``; banks are updated with momentum ``momentum``. Needs the dataset row of every example
    (a ``sample_index`` column: :func:`hf_kd.data.add_sample_index`). Weight 0.8 as in the paper.

    Across processes every bank update gathers all processes' rows, so the banks stay identical everywhere. In
    evaluation (module in eval mode) held-out examples have no bank entries: the same two contrasts use the batch's
    other examples as negatives, and the banks are left alone.

    Args:
        source: Which features to read: ``"hidden_states:-1"`` (any index), ``"logits"``, ``"embeddings"`` or
            ``"module:PATH"``.
        pooling: How tokens or feature maps become one vector per example: ``auto``, ``cls``, ``mean``, ``last``,
            ``spatial`` or ``flatten``.
        student_source: The student's source, when it differs from ``source``.
        teacher_source: The teacher's source, when it differs from ``source``.
        feature_dim: The width of the heads' outputs and of the memory banks.
        num_negatives: Bank entries drawn as negatives per example (at most the training set's size).
        nce_temperature: τ dividing the similarities.
        momentum: The banks' momentum in [0, 1): an entry keeps this share of its old value at each update.

    Raises:
        ValueError: ``momentum`` outside [0, 1).
    """

    default_weight = 0.8
    needs_sample_index = True

    def __init__(
        self,
        source="hidden_states:-1",
        pooling="auto",
        student_source=None,
        teacher_source=None,
        feature_dim: int = 128,
        num_negatives: int = 4096,
        nce_temperature: float = 0.07,
        momentum: float = 0.5,
    ):
        super().__init__(source, pooling, student_source, teacher_source)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"crd needs 0 <= momentum < 1, got {momentum}.")
        self.feature_dim, self.num_negatives = feature_dim, num_negatives
        self.nce_temperature, self.momentum = nce_temperature, momentum

    def setup(self, student, teacher, num_samples=None):
        if not num_samples:
            raise ValueError(
                "crd needs the training set size for its memory banks: give DistillationTrainer a "
                "train_dataset with a sample_index column (hf_kd.data.add_sample_index)."
            )
        s, t = self.embeddings(student, "student"), self.embeddings(teacher, "teacher")
        self.student_head = nn.Linear(s.shape[-1], self.feature_dim)
        self.teacher_head = nn.Linear(t.shape[-1], self.feature_dim)
        bound = 1.0 / math.sqrt(self.feature_dim / 3)  # the paper's uniform initialisation of the banks
        for name in ("student_memory", "teacher_memory"):
            bank = torch.rand(num_samples, self.feature_dim).mul_(2 * bound).sub_(bound)
            self.register_buffer(name, torch_F.normalize(bank, dim=1))

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        if not hasattr(self, "student_head"):
            raise RuntimeError("crd has no heads yet: DistillationTrainer creates them from a first batch.")
        s = torch_F.normalize(self.student_head(self.embeddings(student, "student")), dim=1)
        t = torch_F.normalize(self.teacher_head(self.embeddings(teacher, "teacher")), dim=1)
        if not self.training:  # evaluation: in-batch negatives (candidate row i is example i's positive)
            in_batch = torch.arange(len(s), device=s.device)[:, None].sub(torch.arange(len(s), device=s.device))
            order = in_batch.remainder(len(s))  # row i lists i, i-1, ...: column 0 is the positive
            return self._contrast(s, t[order]) + self._contrast(t, s[order])
        if sample_index is None:
            raise ValueError(
                "crd needs the dataset row of every example: add a sample_index column to the training "
                "set with hf_kd.data.add_sample_index(dataset)."
            )
        index = sample_index.long().to(self.student_memory.device)
        size = len(self.student_memory)
        negatives = torch.randint(0, size, (len(index), min(self.num_negatives, size)), device=index.device)
        candidates = torch.cat([index[:, None], negatives], dim=1)  # column 0 is the positive
        loss = self._contrast_bank(s, self.teacher_memory, candidates) + self._contrast_bank(
            t, self.student_memory, candidates
        )
        with torch.no_grad():  # momentum update of the banks at the rows of this batch, on every process
            index, s, t = _rows_of_every_process(index, s.detach(), t.detach())
            for bank, fresh in ((self.student_memory, s), (self.teacher_memory, t)):
                bank[index] = torch_F.normalize(self.momentum * bank[index] + (1 - self.momentum) * fresh, dim=1)
        return loss

    def _contrast_bank(self, anchors: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``_contrast`` of each anchor against its ``candidates`` rows of ``bank`` (column 0 the positive)."""
        if len(bank) <= 4 * candidates.shape[1]:
            # A bank not much larger than the candidates: score every row with one matmul and pick the candidates'
            # columns, instead of copying B×K×D rows out of the bank (the same values, several times faster).
            scores = anchors @ bank.to(anchors.dtype, copy=True).T  # a copy: the bank is updated in place next
            logits = scores.gather(1, candidates) / self.nce_temperature
            return torch_F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
        return self._contrast(anchors, bank[candidates])

    def _contrast(self, anchors: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("bd,bkd->bk", anchors, candidates.to(anchors.dtype)) / self.nce_temperature
        return torch_F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def _rows_of_every_process(index: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``index`` and ``rows`` from all processes, in rank order (the same result on every process); one process:
    as is. Shorter batches are padded with index -1 for the gather and those rows dropped after it."""
    index = gather(pad_across_processes(index, pad_index=-1))
    rows = [gather(pad_across_processes(row)) for row in rows]
    keep = index >= 0
    return (index[keep], *(row[keep] for row in rows))
