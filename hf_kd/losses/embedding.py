"""Sentence-embedding knowledge: the student's pooled embedding of a text against the teacher's, for sentence
encoders (:class:`~hf_kd.sentence_embeddings.SentenceEmbeddingModel`, read with ``source="embeddings"``, the
default) or any model's pooled states (``source="hidden_states:-1"`` with a ``pooling``). A student narrower than
the teacher is mapped to the teacher's width by a learned projector (``projector``, ``linear`` by default), which
:meth:`EmbeddingDistanceLoss.init_projector_from_pca` can start from the principal components of the teacher's
embeddings. Relation losses (``rkd_distance``, ``sp``, ``pkt``) and ``infonce`` take ``source=embeddings`` too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..projectors import check_projector_kind, make_projector
from . import functional as F
from .base import EmbeddingRelationLoss
from .registry import register_loss


class EmbeddingDistanceLoss(EmbeddingRelationLoss):
    """An example-wise distance between (projected) student and teacher embeddings.

    Args:
        source: Which features to read: ``"hidden_states:-1"`` (any index), ``"logits"``, ``"embeddings"`` or
            ``"module:PATH"``.
        pooling: How tokens or feature maps become one vector per example: ``auto``, ``cls``, ``mean``, ``last``,
            ``spatial`` or ``flatten``.
        student_source: The student's source, when it differs from ``source``.
        teacher_source: The teacher's source, when it differs from ``source``.
        projector: When the widths differ, the learned map from the student's width to the teacher's:
            ``"linear"`` or ``"mlp"`` (:class:`~hf_kd.projectors.Projector`); ``None`` refuses different widths.
    """

    function = None

    def __init__(
        self,
        source: str = "embeddings",
        pooling: str = "auto",
        student_source: str | None = None,
        teacher_source: str | None = None,
        projector: str | None = "linear",
    ):
        super().__init__(source, pooling, student_source, teacher_source)
        check_projector_kind(projector)
        self.projector_kind = projector
        self.projector: nn.Module = nn.Identity()

    def setup(self, student, teacher, num_samples=None):
        s, t = self.embeddings(student, "student"), self.embeddings(teacher, "teacher")
        kind = self.projector_kind if s.shape[-1] != t.shape[-1] else None  # equal widths: compared as they are
        projector = make_projector(kind, s, t, self.name, "embeddings")
        if projector is not None:
            self.projector = projector

    @torch.no_grad()
    def init_projector_from_pca(self, teacher_embeddings: torch.Tensor) -> None:
        """Start the linear projector (student width d → teacher width D) from a PCA of the teacher's embeddings.

        Its weight holds the top d principal directions, its bias the mean, so a student that outputs the teacher's
        first d principal coordinates is mapped back to the teacher's best rank-d approximation from the start
        (sentence-transformers' dimensionality reduction example does this PCA on the teacher side). Call after the
        trainer is built (that sizes the projector) and before training.

        Args:
            teacher_embeddings: ``N×D`` teacher embeddings (e.g. of the training set), N >= d.

        Raises:
            ValueError: the projector is not linear (equal widths, or another kind), or the embeddings are not ``N×D``
                with N >= d.
        """
        net = getattr(self.projector, "net", None)
        if not isinstance(net, nn.Linear):
            raise ValueError(
                f"{self.name}: init_projector_from_pca needs a linear projector, which exists when the student's "
                "embeddings are narrower than the teacher's (build the trainer first, projector='linear')."
            )
        out_width, in_width = net.weight.shape
        embeddings = teacher_embeddings.detach().double().cpu()
        if embeddings.dim() != 2 or embeddings.shape[1] != out_width or len(embeddings) < in_width:
            raise ValueError(
                f"{self.name}: init_projector_from_pca needs at least {in_width} teacher embeddings of width "
                f"{out_width}, got a tensor of shape {tuple(embeddings.shape)}."
            )
        mean = embeddings.mean(0)
        _, _, directions = torch.linalg.svd(embeddings - mean, full_matrices=False)  # rows: principal directions
        net.weight.copy_(directions[:in_width].T.to(net.weight))
        net.bias.copy_(mean.to(net.bias))

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        s = self.projector(self.embeddings(student, "student"))
        return type(self).function(s, self.embeddings(teacher, "teacher"))


@register_loss(
    "embedding_mse",
    paper="Reimers & Gurevych 2020, Making Monolingual Sentence Embeddings Multilingual using Knowledge "
    "Distillation, arXiv:2004.09813",
)
class EmbeddingMSE(EmbeddingDistanceLoss):
    """Mean squared error between student and teacher sentence embeddings, over examples and dimensions
    (sentence-transformers' MSELoss for distillation, Reimers & Gurevych 2020).

    See :func:`~hf_kd.losses.functional.embedding_mse`.

    Args:
        source: Which features to read: ``"hidden_states:-1"`` (any index), ``"logits"``, ``"embeddings"`` or
            ``"module:PATH"``.
        pooling: How tokens or feature maps become one vector per example: ``auto``, ``cls``, ``mean``, ``last``,
            ``spatial`` or ``flatten``.
        student_source: The student's source, when it differs from ``source``.
        teacher_source: The teacher's source, when it differs from ``source``.
        projector: When the widths differ, the learned map from the student's width to the teacher's:
            ``"linear"`` or ``"mlp"`` (:class:`~hf_kd.projectors.Projector`); ``None`` refuses different widths.
    """

    function = F.embedding_mse


@register_loss(
    "embedding_cosine",
    paper="Sanh et al. 2019, DistilBERT (its cosine embedding loss), arXiv:1910.01108",
)
class EmbeddingCosine(EmbeddingDistanceLoss):
    """Mean over examples of 1 − cos(s_i, t_i): the direction of each embedding, not its length.

    See :func:`~hf_kd.losses.functional.embedding_cosine`.

    Args:
        source: Which features to read: ``"hidden_states:-1"`` (any index), ``"logits"``, ``"embeddings"`` or
            ``"module:PATH"``.
        pooling: How tokens or feature maps become one vector per example: ``auto``, ``cls``, ``mean``, ``last``,
            ``spatial`` or ``flatten``.
        student_source: The student's source, when it differs from ``source``.
        teacher_source: The teacher's source, when it differs from ``source``.
        projector: When the widths differ, the learned map from the student's width to the teacher's:
            ``"linear"`` or ``"mlp"`` (:class:`~hf_kd.projectors.Projector`); ``None`` refuses different widths.
    """

    function = F.embedding_cosine
