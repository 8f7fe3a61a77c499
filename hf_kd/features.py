"""What a loss compares: the per-side record both models' outputs are brought into.

A loss declares the fields it needs (``DistillationLoss.needs``): ``"logits"``, ``"hidden_states"``,
``"attentions"``, ``"embeddings"`` (one vector per text from a sentence encoder,
:class:`~hf_kd.sentence_embeddings.SentenceEmbeddingModel`) or ``"module:<dotted.path>"`` for the output of any
submodule. The trainer asks each model
for exactly those — ``output_hidden_states`` / ``output_attentions`` flags for transformers models, forward
hooks (removed after each forward) for module outputs — and hands the loss one :class:`ModelFeatures` per
side, so a loss reads ``student.hidden_states[i]`` and ``teacher.hidden_states[j]`` without knowing where they
came from.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from numbers import Integral

import torch
from torch import nn

FIELD_NEEDS = frozenset({"logits", "hidden_states", "attentions", "embeddings"})
MODULE_PREFIX = "module:"


@dataclass
class SparseDistribution:
    """A distribution over ``vocab_size`` entries known at ``k`` of them per position.

    A cached teacher's output, which ``kl`` and ``soft_ce`` read without building the dense …×V tensor: the
    log-probabilities at the kept ids, and one log-probability shared by every other entry.

    Args:
        ids: The kept vocabulary ids, ``…×k``.
        logprobs: Their log-probabilities, ``…×k``.
        fill: The log-probability of each entry not kept, ``…`` (-inf when the kept entries hold all the mass).
        vocab_size: V, the size of the vocabulary.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    fill: torch.Tensor
    vocab_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense shape ``(…, V)``."""
        return (*self.ids.shape[:-1], self.vocab_size)

    def dense(self) -> torch.Tensor:
        """The full …×V log-probabilities (usable as logits).

        Returns:
            A float32 (or wider) tensor of :attr:`shape`.
        """
        dtype = torch.promote_types(self.logprobs.dtype, torch.float32)
        dense = self.fill.to(dtype)[..., None].expand(self.shape).clone()
        return dense.scatter_(-1, self.ids.long(), self.logprobs.to(dtype))

    def softened(self, temperature: float) -> SparseDistribution:
        """p^(1/τ) renormalised, in the same form: the kept entries and the one value of every other entry.

        Args:
            temperature: τ > 0.

        Returns:
            A new :class:`SparseDistribution` holding log p^τ.
        """
        others = self.vocab_size - self.ids.shape[-1]
        dtype = torch.promote_types(self.logprobs.dtype, torch.float32)
        kept, fill = self.logprobs.to(dtype) / temperature, self.fill.to(dtype) / temperature
        parts = [kept] if others == 0 else [kept, (fill + math.log(others))[..., None]]
        log_z = torch.logsumexp(torch.cat(parts, dim=-1), dim=-1)
        return SparseDistribution(self.ids, kept - log_z[..., None], fill - log_z, self.vocab_size)

    def reshape(self, *leading: int) -> SparseDistribution:
        """The same entries with the leading (position) dimensions reshaped to ``leading``.

        Args:
            *leading: The new leading dimensions (their product must be the number of positions).

        Returns:
            A new :class:`SparseDistribution`.
        """
        k = self.ids.shape[-1]
        return SparseDistribution(
            self.ids.reshape(*leading, k),
            self.logprobs.reshape(*leading, k),
            self.fill.reshape(*leading),
            self.vocab_size,
        )

    def __getitem__(self, index) -> SparseDistribution:
        """The positions ``index`` selects (a slice or a boolean mask over the leading dimensions)."""
        return SparseDistribution(self.ids[index], self.logprobs[index], self.fill[index], self.vocab_size)


@dataclass
class ModelFeatures:
    """The outputs of one side (student or teacher) that the configured losses asked for.

    Args:
        logits: The model's logits (``B×C``, or ``B×T×V`` per token).
        hidden_states: Follows transformers: entry 0 is the embedding output, entry ℓ the output of layer ℓ
            (feature maps ``B×C×H×W`` for CNNs, tokens ``B×T×H`` for transformers).
        attentions: ``attentions[ℓ - 1]`` holds layer ℓ's attention probabilities ``B×heads×T×T``.
        embeddings: A sentence encoder's pooled output, ``B×D``.
        modules: A dotted module path → that module's output.
        attention_mask: ``B×T``, marks real tokens, for losses that average over tokens.
        sparse_logits: A cached teacher's top-k distribution, in place of ``logits``.
    """

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    embeddings: torch.Tensor | None = None
    modules: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_mask: torch.Tensor | None = None
    sparse_logits: SparseDistribution | None = None  # instead of logits, for a cached teacher

    def dense_logits(self) -> torch.Tensor | None:
        """``logits``, or the dense form of ``sparse_logits`` when only that is known.

        Returns:
            A tensor, or ``None`` when the side has neither.
        """
        if self.logits is None and self.sparse_logits is not None:
            return self.sparse_logits.dense()
        return self.logits

    @property
    def logits_shape(self) -> tuple[int, ...] | None:
        """The shape of ``logits`` (or of the dense form of ``sparse_logits``); ``None`` without either."""
        source = self.logits if self.logits is not None else self.sparse_logits
        return None if source is None else tuple(source.shape)

    @classmethod
    def from_outputs(cls, outputs, needs: frozenset[str], modules: dict | None = None, attention_mask=None):
        """The features ``needs`` asks for, read from a model's outputs.

        Args:
            outputs: The model's outputs (a ``ModelOutput``, a dict or an object with those attributes).
            needs: The feature needs (see :data:`FIELD_NEEDS`; ``module:`` needs come in ``modules``).
            modules: Captured module outputs by dotted path.
            attention_mask: ``B×T``, marks real tokens.

        Returns:
            The side's :class:`ModelFeatures`.

        Raises:
            ValueError: a needed field is missing from the outputs (the message says which model to use instead).
        """
        features = cls(modules=dict(modules or {}), attention_mask=attention_mask)
        for name in FIELD_NEEDS & needs:
            value = output_field(outputs, name)
            if value is None or (isinstance(value, tuple) and len(value) == 0):
                raise ValueError(
                    f"a configured loss needs {name} but the model ({type(outputs).__name__}) returned none. "
                    + {
                        "logits": "Use a model with a task head (…ForSequenceClassification, …ForCausalLM, …).",
                        "hidden_states": "Use a model that supports output_hidden_states, or capture a module "
                        "output with a 'module' option.",
                        "attentions": "Attention losses need attention probabilities: the trainer switches "
                        "transformers models to eager attention; custom models must return them.",
                        "embeddings": "Sentence embeddings come from a sentence encoder: wrap the model in "
                        "hf_kd.sentence_embeddings.SentenceEmbeddingModel (a SentenceTransformer or an AutoModel "
                        "with pooling), or read token states with source='hidden_states:-1' and a pooling.",
                    }[name]
                )
            setattr(features, name, tuple(value) if name in ("hidden_states", "attentions") else value)
        return features


def forward_kwargs(needs: frozenset[str]) -> dict:
    """Flags that make a transformers model return what ``needs`` lists, and nothing more.

    Logits are always returned, so response-only distillation adds no flag: neither model computes hidden
    states or attentions it was not asked for.

    Args:
        needs: Feature needs: ``logits``, ``hidden_states``, ``attentions``, ``embeddings`` or ``module:PATH``.

    Returns:
        ``output_hidden_states`` / ``output_attentions`` set to True where needed.

    Raises:
        ValueError: a need that is none of the known ones.
    """
    unknown = {need for need in needs if need not in FIELD_NEEDS and not need.startswith(MODULE_PREFIX)}
    if unknown:
        raise ValueError(f"unknown feature needs {sorted(unknown)}; known: {sorted(FIELD_NEEDS)} and 'module:PATH'.")
    kwargs = {}
    if "hidden_states" in needs:
        kwargs["output_hidden_states"] = True
    if "attentions" in needs:
        kwargs["output_attentions"] = True
    return kwargs


def module_paths(needs: frozenset[str]) -> list[str]:
    """The dotted module paths that ``module:PATH`` needs name.

    Args:
        needs: Feature needs.

    Returns:
        The paths, sorted.
    """
    return sorted(need[len(MODULE_PREFIX) :] for need in needs if need.startswith(MODULE_PREFIX))


@contextlib.contextmanager
def capture_modules(model: nn.Module, paths: list[str]):
    """Record the outputs of the submodules at ``paths`` during the forward passes inside the block.

    The hooks are removed on exit, so nothing stays attached to the model and no tensor outlives the step.

    Args:
        model: The model whose submodules to hook.
        paths: Dotted submodule paths (``model.get_submodule`` names).

    Yields:
        A dict ``path → output`` (the first element when a module returns a tuple), filled by the forward passes.

    Raises:
        ValueError: ``model`` has no submodule at a path (the message shows what paths look like).
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError as error:
                names = [name for name, _ in model.named_modules() if name][:12]
                raise ValueError(
                    f"{type(model).__name__} has no submodule {path!r} ({error}); module paths look like {names}."
                ) from None

            def hook(_module, _inputs, output, path=path):
                captured[path] = output[0] if isinstance(output, (tuple, list)) else output

            handles.append(module.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_model(model: nn.Module, inputs: dict, needs: frozenset[str], module_root: nn.Module | None = None):
    """Run ``model`` on ``inputs`` asking for what ``needs`` lists.

    Args:
        model: The model (possibly wrapped by Accelerate, DeepSpeed or PEFT).
        inputs: The batch; columns that are not model inputs are dropped first.
        needs: The feature needs of the losses.
        module_root: The unwrapped model whose submodule paths ``module:`` needs name; by default ``model``.

    Returns:
        ``(outputs, features)``: the model's outputs and its :class:`ModelFeatures`.
    """
    from .data import model_inputs  # (a column that marks positions reaches no model)

    root = module_root if module_root is not None else model
    with capture_modules(root, module_paths(needs)) as captured:
        outputs = model(**model_inputs(inputs), **forward_kwargs(needs))
    mask = inputs.get("attention_mask")
    if mask is not None and "input_values" in inputs and hasattr(root, "_get_feature_vector_attention_mask"):
        # Speech encoders (wav2vec 2.0, HuBERT, WavLM): the mask covers audio samples, their states cover frames.
        frames = root._get_feat_extract_output_lengths(mask.shape[-1])
        mask = root._get_feature_vector_attention_mask(int(frames), mask)
    features = ModelFeatures.from_outputs(outputs, needs, captured, attention_mask=mask)
    return outputs, features


def output_field(outputs, name: str):
    """A field of a model's outputs (a ``ModelOutput``, a dict or an object), ``None`` when absent.

    Args:
        outputs: The model's outputs.
        name: The field, e.g. ``"logits"``.

    Returns:
        The field's value, or ``None``.
    """
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        return outputs.get(name)
    return getattr(outputs, name, None)


# ---- reading features: a source, a layer map, pooling ------------------------------------------------------------


def select(features: ModelFeatures, source: str) -> torch.Tensor:
    """One tensor of a side's features.

    Args:
        features: The side's features.
        source: ``"logits"``, ``"embeddings"``, ``"hidden_states:-1"`` (any index) or ``"module:PATH"``.

    Returns:
        The tensor (dense logits for a sparse teacher).

    Raises:
        ValueError: ``source`` is none of those forms.
    """
    check_source(source)
    if source == "logits":
        return features.dense_logits()
    if source == "embeddings":
        return features.embeddings
    if source.startswith(MODULE_PREFIX):
        return features.modules[source[len(MODULE_PREFIX) :]]
    return features.hidden_states[int(source.partition(":")[2] or -1)]


def check_source(source: str) -> None:
    """Raise unless ``source`` is one of :func:`select`'s forms (checked when a loss is built, before any step).

    Args:
        source: A feature source.

    Raises:
        ValueError: ``source`` is none of ``logits``, ``embeddings``, ``hidden_states[:INDEX]``, ``module:PATH``.
    """
    if not isinstance(source, str):
        raise ValueError(f"feature source must be a string, got {source!r}.")
    if source in ("logits", "embeddings") or source.startswith(MODULE_PREFIX):
        return
    name, colon, index = source.partition(":")
    if name != "hidden_states" or colon and not index.lstrip("-").isdigit():
        raise ValueError(
            f"feature source must be 'logits', 'embeddings', 'hidden_states[:INDEX]' or 'module:PATH', got {source!r}."
        )


def source_needs(source: str) -> frozenset[str]:
    """The feature need behind a source string.

    Args:
        source: A :func:`select` source, e.g. ``"hidden_states:-1"``.

    Returns:
        ``{"hidden_states"}`` for ``"hidden_states:-1"``, ``{"module:PATH"}`` for a module, and so on.
    """
    if source.startswith(MODULE_PREFIX):
        return frozenset({source})
    return frozenset({source.partition(":")[0]})


POOLINGS = ("auto", "cls", "mean", "last", "spatial", "flatten")


def check_pooling(pooling: str) -> None:
    """Raise unless ``pooling`` is one of :data:`POOLINGS` (checked when a loss is built, before any step).

    Args:
        pooling: A :func:`pool` mode.

    Raises:
        ValueError: an unknown pooling.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")


def pool(tensor: torch.Tensor, pooling: str = "auto", attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One vector per example (``B×D``) from tokens ``B×T×H``, feature maps ``B×C×H×W`` or vectors ``B×D``.

    Args:
        tensor: Tokens, feature maps or vectors.
        pooling: ``cls``: the first token. ``mean``: the mean over real tokens (``attention_mask``) or over the
            spatial grid. ``last``: the last real token. ``spatial``: the mean over H×W. ``flatten``: everything in
            one vector. ``auto``: ``mean`` for tokens, ``spatial`` for maps, nothing for vectors.
        attention_mask: ``B×T``, marks real tokens (``mean`` and ``last`` on tokens); ``None``: every token.

    Returns:
        ``B×D`` vectors.

    Raises:
        ValueError: an unknown pooling, one that does not apply to the tensor's kind, or a tensor that is not 2-, 3-
            or 4-dimensional.
    """
    check_pooling(pooling)
    if tensor.dim() == 2 or pooling == "flatten":
        return tensor.flatten(1)
    if tensor.dim() == 4:
        if pooling in ("auto", "mean", "spatial"):
            return tensor.mean(dim=(2, 3))
        raise ValueError(f"pooling {pooling!r} applies to token sequences, not feature maps B×C×H×W.")
    if tensor.dim() != 3:
        raise ValueError(f"cannot pool a tensor of shape {tuple(tensor.shape)}.")
    if pooling == "cls":
        return tensor[:, 0]
    if pooling == "last":
        if attention_mask is None:
            return tensor[:, -1]
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return tensor[torch.arange(tensor.shape[0], device=tensor.device), last]
    if pooling == "spatial":
        raise ValueError("pooling 'spatial' applies to feature maps B×C×H×W; use 'mean' for tokens.")
    if attention_mask is None:
        return tensor.mean(1)
    weights = attention_mask.to(tensor.dtype).unsqueeze(-1)
    return (tensor * weights).sum(1) / weights.sum(1).clamp(min=1)


def resolve_layer_map(layer_map, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)`` of layer numbers (0 = embeddings, 1..N = layers).

    Args:
        layer_map: ``"uniform"``: student layer m ↔ teacher layer m·N/M for m = 1..M (so the last layers meet).
            ``"last"``: the last layer of each. A list of pairs is taken as given and checked against both depths.
        student_layers: M, the student's number of layers.
        teacher_layers: N, the teacher's number of layers.

    Returns:
        The pairs, in order.

    Raises:
        ValueError: an unknown string, an entry that is not a pair, a pair out of range, or an empty list.
    """
    pairs = check_layer_map(layer_map)
    if layer_map == "uniform":
        return [(m, m * teacher_layers // student_layers) for m in range(1, student_layers + 1)]
    if layer_map == "last":
        return [(student_layers, teacher_layers)]
    for pair in pairs:
        student, teacher = pair
        if not (student <= student_layers and teacher <= teacher_layers):
            raise ValueError(
                f"layer_map pair {list(pair)} is out of range: the student has layers 0..{student_layers} and the "
                f"teacher 0..{teacher_layers} (0 is the embedding output)."
            )
    return pairs


def check_layer_map(layer_map) -> list[tuple[int, int]]:
    """The checks of a layer map that need no model (made when a loss is built, before any step).

    Args:
        layer_map: ``"uniform"``, ``"last"`` or a list of ``[student_layer, teacher_layer]`` pairs.

    Returns:
        The pairs as integer tuples (empty for the two strings).

    Raises:
        ValueError: an unknown string, an entry that is not a pair of integers >= 0, or an empty list.
    """
    if layer_map in ("uniform", "last"):
        return []
    if isinstance(layer_map, str) or not isinstance(layer_map, (list, tuple)):
        raise ValueError(
            f"layer_map must be 'uniform', 'last' or a list of [student, teacher] pairs, got {layer_map!r}."
        )
    if not layer_map:
        raise ValueError("layer_map is empty.")
    pairs = []
    for pair in layer_map:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(index, Integral) and not isinstance(index, bool) and index >= 0 for index in pair)
        ):
            raise ValueError(
                f"layer_map entries are [student_layer, teacher_layer] pairs of layer numbers >= 0 (0 is the "
                f"embedding output), got {pair!r}."
            )
        pairs.append((int(pair[0]), int(pair[1])))  # numpy integers too
    return pairs


def _named_tensors(features: ModelFeatures):
    """``(field, tensor, is_logits)`` of every tensor a side holds."""
    sparse = features.sparse_logits
    for name, value in (("logits", features.logits), ("logits", None if sparse is None else sparse.logprobs)):
        if value is not None:
            yield name, value, True
    for name in ("hidden_states", "attentions"):
        for index, value in enumerate(getattr(features, name) or ()):
            yield f"{name}[{index}]", value, False
    if features.embeddings is not None:
        yield "embeddings", features.embeddings, False
    for path, value in features.modules.items():
        if torch.is_tensor(value):
            yield f"module {path}", value, False


def _bad_entries(value: torch.Tensor, is_logits: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """A 0-d bool: NaN or +inf anywhere (logits: at the distilled positions of ``mask``; -inf logits are masked
    vocabulary entries, legal). Reductions only — no temporary of the tensor's size (amax/amin propagate NaN)."""
    if not value.is_floating_point() or value.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=value.device)
    if is_logits:
        bad = ~(value.detach().amax(-1) < float("inf"))  # per position: NaN or +inf
        if mask is not None and tuple(mask.shape) == tuple(bad.shape):
            bad = bad & mask.bool()
        return bad.any()
    value = value.detach()
    return ~((value.amax() < float("inf")) & (value.amin() > float("-inf")))


def finite_outputs(features: ModelFeatures, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Whether every output of a side is finite (see :func:`non_finite_fields`), computed without a host sync.

    Args:
        features: The side's features.
        mask: The distilled positions of the logits; ``None``: all.

    Returns:
        A 0-d bool tensor.
    """
    flags = [~_bad_entries(value, is_logits, mask) for _, value, is_logits in _named_tensors(features)]
    if not flags:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([flag.to(flags[0].device) for flag in flags]).all()


def non_finite_fields(features: ModelFeatures, mask: torch.Tensor | None = None) -> list[str]:
    """The fields of a side holding NaN or +inf (or -inf, except in logits, where it marks masked vocabulary entries).

    Args:
        features: The side's features.
        mask: Logits are checked at these (distilled) positions only; ``None``: all.

    Returns:
        The names of the offending fields (``"logits"``, ``"hidden_states[3]"``, ``"module PATH"``, ...), in order.
    """
    names = [name for name, value, is_logits in _named_tensors(features) if bool(_bad_entries(value, is_logits, mask))]
    return list(dict.fromkeys(names))
