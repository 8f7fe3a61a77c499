"""Relation-based knowledge: how examples relate to each other in the teacher's embedding space.

Losses compare B×B (or B×B×B) structures, so student and teacher widths may differ and no projector is needed.
Embeddings come from ``source`` pooled with ``pooling``; see :class:`~hf_kd.losses.base.EmbeddingRelationLoss`.
"""

from __future__ import annotations

from ..features import pool
from . import functional as F
from .base import EmbeddingRelationLoss, LayerPairLoss
from .registry import register_loss


class _EmbeddingPairLoss(EmbeddingRelationLoss):
    function = None

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        return type(self).function(self.embeddings(student, "student"), self.embeddings(teacher, "teacher"))


@register_loss("rkd_distance", paper="Park et al. 2019, Relational Knowledge Distillation, arXiv:1904.05068")
class RKDDistance(_EmbeddingPairLoss):
    """RKD distance (Park et al. 2019): Huber between pairwise distances, each divided by its mean.

    Weight 25 as in the paper. See :func:`~hf_kd.losses.functional.rkd_distance`.

    Args:
        source: Which features to read: ``"hidden_states:-1"`` (any index), ``"logits"``, ``"embeddings"`` or
            ``"module:PATH"``.
        pooling: How tokens or feature maps become one vector per example: ``auto``, ``cls``, ``mean``, ``last``,
            ``spatial`` or ``flatten``.
        student_source: The student's source, when it differs from ``source``.
        teacher_source: The teacher's source, when it differs from ``source``.
    """

    function = F.rkd_distance
    default_weight = 25.0
    min_batch_size = 3  # two examples have one distance, which divided by the batch mean is 1 on both sides


@register_loss("rkd_angle", paper="Park et al. 2019, Relational Knowledge Distillation, arXiv:1904.05068")
class RKDAngle(_EmbeddingPairLoss):
    """RKD angle (Park et al. 2019): Huber between cos∠(e_i, e_j, e_k) over all triplets.

    Weight 50 as in the paper. See :func:`~hf_kd.losses.functional.rkd_angle`.

    Args:
        source: Which features to read: ``"hidden_states:-1"`` (any index), ``"logits"``, ``"embeddings"`` or
            ``"module:PATH"``.
        pooling: How tokens or feature maps become one vector per example: ``auto``, ``cls``, ``mean``, ``last``,
            ``spatial`` or ``flatten``.
        student_source: The student's source, when it differs from ``source``.
        teacher_source: The teacher's source, when it differs from ``source``.
    """

    function = F.rkd_angle
    default_weight = 50.0
    min_batch_size = 3  # an angle needs three examples


@register_loss(
    "sp",
    paper="Tung & Mori 2019, Similarity-Preserving Knowledge Distillation, arXiv:1907.09682",
)
class SimilarityPreserving(_EmbeddingPairLoss):
    """Similarity-preserving KD (Tung & Mori 2019): ‖norm_rows(A_T A_Tᵀ) − norm_rows(A_S A_Sᵀ)‖_F² / B².

    Weight 3000 as in the paper; ``pooling='flatten'`` by default. See
    :func:`~hf_kd.losses.functional.similarity_preserving`.

    Args:
        source: Which features to read: ``"hidden_states:-1"`` (any index), ``"logits"``, ``"embeddings"`` or
            ``"module:PATH"``.
        pooling: How tokens or feature maps become one vector per example: ``auto``, ``cls``, ``mean``, ``last``,
            ``spatial`` or ``flatten``.
        student_source: The student's source, when it differs from ``source``.
        teacher_source: The teacher's source, when it differs from ``source``.
    """

    function = F.similarity_preserving
    default_weight = 3000.0
    min_batch_size = 2  # a 1×1 row-normalised Gram matrix is 1 on both sides

    def __init__(self, source="hidden_states:-1", pooling="flatten", student_source=None, teacher_source=None):
        super().__init__(source, pooling, student_source, teacher_source)


@register_loss(
    "pkt",
    paper="Passalis & Tefas 2018, Learning Deep Representations with Probabilistic Knowledge Transfer, "
    "arXiv:1803.10837",
)
class ProbabilisticKT(_EmbeddingPairLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): KL between row-normalised (cos + 1)/2 affinities.

    Weight 30000, the authors' setting on the CRD benchmark. See :func:`~hf_kd.losses.functional.pkt`.

    Args:
        source: Which features to read: ``"hidden_states:-1"`` (any index), ``"logits"``, ``"embeddings"`` or
            ``"module:PATH"``.
        pooling: How tokens or feature maps become one vector per example: ``auto``, ``cls``, ``mean``, ``last``,
            ``spatial`` or ``flatten``.
        student_source: The student's source, when it differs from ``source``.
        teacher_source: The teacher's source, when it differs from ``source``.
    """

    function = F.pkt
    default_weight = 30000.0  # the authors' CRD-benchmark setting
    min_batch_size = 2  # a 1×1 row-normalised affinity is 1 on both sides


@register_loss(
    "irg",
    paper="Liu et al. 2019, Knowledge Distillation via Instance Relationship Graph, CVPR 2019",
)
class InstanceRelationGraph(LayerPairLoss):
    """Instance relation graph (Liu et al. 2019) on pooled embeddings of mapped layers (uniform by default),
    with the cross-layer (transformation) edges weighted by ``cross_layer_weight``.

    See :func:`~hf_kd.losses.functional.irg`.

    Args:
        layer_map: Which layers to pair: ``"uniform"``, ``"last"`` or ``[[s, t], ...]`` (0 is the embedding output).
        pooling: How each layer's tokens or feature maps become one vector per example (``auto``, ``cls``,
            ``mean``, ``last``, ``spatial``, ``flatten``).
        cross_layer_weight: The weight of the cross-layer term (0: edges only).
    """

    min_batch_size = 3  # its graphs are mean-normalised distances: with two examples, 1 on both sides

    def __init__(self, layer_map="uniform", pooling: str = "auto", cross_layer_weight: float = 1.0):
        super().__init__(layer_map=layer_map)
        self.pooling = pooling
        self.cross_layer_weight = cross_layer_weight

    def setup(self, student, teacher, num_samples=None):
        pass  # compares B×B graphs: widths may differ

    def forward(self, student, teacher, mask=None, labels=None, sample_index=None):
        pairs = self.layer_pairs(student, teacher)
        student_layers = [pool(s, self.pooling, student.attention_mask).float() for s, _ in pairs]
        teacher_layers = [pool(t, self.pooling, teacher.attention_mask).float() for _, t in pairs]
        return F.irg(student_layers, teacher_layers, cross_layer_weight=self.cross_layer_weight)
