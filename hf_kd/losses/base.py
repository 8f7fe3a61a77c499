"""The base every distillation loss derives from, and the shared plumbing of feature-based losses."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..features import (
    ModelFeatures,
    check_layer_map,
    check_pooling,
    check_source,
    pool,
    resolve_layer_map,
    select,
    source_needs,
)
from ..projectors import check_projector_kind, make_projector


class DistillationLoss(nn.Module):
    """A loss between a student's and a teacher's :class:`~hf_kd.features.ModelFeatures`.

    Subclasses set ``needs`` (the feature fields they read; an instance may narrow or widen it from its
    options) and implement :meth:`forward`. A loss with ``per_position = True`` returns the **sum** over the
    positions kept by ``mask`` (every example for sequence-level tasks, every supervised token for token-level
    ones); the trainer divides by the number of such positions in the whole accumulated batch, which keeps
    gradient accumulation exact. Other losses return a per-batch mean, which the trainer divides by the number
    of accumulated micro-batches.

    Learned parts (projectors, regressors, memory banks) are created in :meth:`setup`, which the trainer calls
    once with the features of one sample batch before the optimizer is built; they then train, checkpoint and
    resume with the student, and are left out of the saved student. ``default_weight`` is the weight used
    when the configuration gives none (the value of the method's paper).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # the method's paper, cited in model cards
    needs: frozenset[str] = frozenset({"logits"})
    per_position: ClassVar[bool] = True
    default_weight: ClassVar[float] = 1.0
    # Linear in the teacher's probabilities: an unbiased estimate of them (a sampled cache) gives unbiased gradients.
    linear_in_teacher: ClassVar[bool] = False
    # Compares distributions without matching vocabulary entries, so teacher and student tokenizers may differ.
    cross_vocabulary: ClassVar[bool] = False
    # Reads a softmax over the logits (kl, jsd, ...): identically 0 on a one-logit head, so refused there.
    compares_distributions: ClassVar[bool] = False
    # Relates the examples of a batch to each other: below this many per process the loss is identically 0.
    min_batch_size: ClassVar[int] = 1
    # Compares each query's candidates with each other (ranking): a query with fewer candidates adds nothing.
    min_group_size: ClassVar[int] = 1
    # Reads each example's dataset row (memory banks): the training set needs a sample_index column.
    needs_sample_index: ClassVar[bool] = False

    def side_needs(self, side: str) -> frozenset[str]:
        """What this loss reads from one side.

        Args:
            side: ``"student"`` or ``"teacher"``.

        Returns:
            Feature needs: ``"logits"``, ``"hidden_states"``, ``"attentions"``, ``"embeddings"`` or ``"module:PATH"``.
        """
        return self.needs

    def setup(self, student: ModelFeatures, teacher: ModelFeatures, num_samples: int | None = None) -> None:
        """Create learned parts from one sample batch's features; most losses have none.

        Args:
            student: The student's features of the sample batch.
            teacher: The teacher's features of the same batch.
            num_samples: The training set's size (memory banks have a row per example); ``None`` when unknown.
        """

    def forward(
        self,
        student: ModelFeatures,
        teacher: ModelFeatures,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sample_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss between the two sides' features on a batch.

        Args:
            student: The student's features (what :meth:`side_needs` asked for).
            teacher: The teacher's features.
            mask: Bool over the positions (examples, or tokens for token-level logits) that count; ``None``: all.
            labels: The batch's labels, for losses that read them (dkd, margin_mse, teacher_bounded).
            sample_index: Each example's row in the training set, for losses with memory banks (crd).

        Returns:
            A scalar: the sum over the positions of ``mask`` when ``per_position``, else the batch mean.
        """
        raise NotImplementedError


class LayerPairLoss(DistillationLoss):
    """Base of intermediate losses: compares mapped layers (or two named modules), with optional projectors.

    Args:
        layer_map: ``"uniform"`` (student layer m ↔ teacher layer m·N/M), ``"last"``, or ``[[s, t], ...]`` pairs of
            layer numbers with 0 the embedding output (:func:`~hf_kd.features.resolve_layer_map`).
        projector: ``None``, ``"linear"``, ``"mlp"``, ``"conv"`` or ``"auto"``: a learned map from the student's width
            to the teacher's, one per pair (:class:`~hf_kd.projectors.Projector`); ``None`` needs equal widths.
        student_module: The dotted path of a student submodule whose output to compare (captured with a forward hook)
            instead of hidden states; set with ``teacher_module``.
        teacher_module: The teacher submodule compared with ``student_module``.

    Raises:
        ValueError: only one of ``student_module`` and ``teacher_module`` is set.
    """

    per_position = False
    field = "hidden_states"

    def __init__(
        self,
        layer_map="uniform",
        projector: str | None = None,
        student_module: str | None = None,
        teacher_module: str | None = None,
    ):
        super().__init__()
        if (student_module is None) != (teacher_module is None):
            raise ValueError(f"{self.name}: set both student_module and teacher_module, or neither.")
        if student_module is None:
            check_layer_map(layer_map)
        check_projector_kind(projector)
        self.layer_map = layer_map
        self.projector_kind = projector
        self.modules_by_side = {"student": student_module, "teacher": teacher_module}
        self.projectors = nn.ModuleList()
        self._pairs: list[tuple[int, int]] | None = None

    def side_needs(self, side):
        module = self.modules_by_side[side]
        return frozenset({f"module:{module}"}) if module else frozenset({self.field})

    def layer_pairs(self, student: ModelFeatures, teacher: ModelFeatures) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (student, teacher) tensors to compare, in layer-map order.

        Args:
            student: The student's features.
            teacher: The teacher's features.

        Returns:
            One ``(student_tensor, teacher_tensor)`` pair per mapped layer (or the two modules' outputs).

        Raises:
            ValueError: an attention loss maps layer 0 (the embeddings, which have no attention), or the layer map does
                not fit the depths (:func:`~hf_kd.features.resolve_layer_map`).
        """
        if self.modules_by_side["student"]:
            return [
                (student.modules[self.modules_by_side["student"]], teacher.modules[self.modules_by_side["teacher"]])
            ]
        s_layers, t_layers = getattr(student, self.field), getattr(teacher, self.field)
        offset = 1 if self.field == "attentions" else 0  # attentions[ℓ - 1] belongs to layer ℓ
        depth_s, depth_t = len(s_layers) - 1 + offset, len(t_layers) - 1 + offset
        if self._pairs is None:
            self._pairs = resolve_layer_map(self.layer_map, depth_s, depth_t)
            if offset and any(0 in pair for pair in self._pairs):
                raise ValueError(f"{self.name}: layer 0 (the embeddings) has no attention; map layers 1 and above.")
        return [(s_layers[s - offset], t_layers[t - offset]) for s, t in self._pairs]

    def setup(self, student, teacher, num_samples=None):
        if self.field == "attentions":
            return
        for s, t in self.layer_pairs(student, teacher):
            projector = make_projector(self.projector_kind, s, t, self.name, "features")
            self.projectors.append(projector if projector is not None else nn.Identity())

    def project(self, index: int, student_features: torch.Tensor) -> torch.Tensor:
        """The student's tensor of pair ``index`` through that pair's projector (unchanged when there is none).

        Args:
            index: The pair's position in the layer map.
            student_features: The student's tensor of that pair.

        Returns:
            The projected tensor, of the teacher's width.
        """
        if len(self.projectors) == 0:  # setup not run: widths must already agree
            return student_features
        return self.projectors[index](student_features)


class EmbeddingRelationLoss(DistillationLoss):
    """Base of relation and contrastive losses on one vector per example.

    Args:
        source: Which features to read: ``"hidden_states:-1"`` (any index), ``"logits"``, ``"embeddings"`` or
            ``"module:PATH"`` (:func:`~hf_kd.features.select`).
        pooling: How tokens or feature maps become one vector per example: ``auto``, ``cls``, ``mean``, ``last``,
            ``spatial`` or ``flatten`` (:func:`~hf_kd.features.pool`).
        student_source: The student's source, when it differs from ``source``.
        teacher_source: The teacher's source, when it differs from ``source``.
    """

    per_position = False

    def __init__(
        self,
        source: str = "hidden_states:-1",
        pooling: str = "auto",
        student_source: str | None = None,
        teacher_source: str | None = None,
    ):
        super().__init__()
        self.sources = {"student": student_source or source, "teacher": teacher_source or source}
        for side_source in self.sources.values():
            check_source(side_source)
        check_pooling(pooling)
        self.pooling = pooling

    def side_needs(self, side):
        return source_needs(self.sources[side])

    def embeddings(self, features: ModelFeatures, side: str) -> torch.Tensor:
        """One side's pooled embeddings.

        Args:
            features: The side's features.
            side: ``"student"`` or ``"teacher"`` (whose source to read).

        Returns:
            Float32 embeddings ``B×D``.
        """
        return pool(select(features, self.sources[side]), self.pooling, features.attention_mask).float()
