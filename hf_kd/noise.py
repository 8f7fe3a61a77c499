"""Input noise for the student only (noisy student, Xie et al. 2020): each noise is a callable ``batch → batch`` that
returns a new batch with its fields perturbed and every other field (labels, ``sample_index``…) untouched. Pass
one or a list to ``DistillationTrainer(student_noise=...)``: in training the student reads the noised batch while
every teacher reads the clean one (a cached teacher finds its rows by ``sample_index``, so noise never meets the
cache's fingerprints). Random draws use torch's generator of the batch's device, which ``set_seed`` seeds and
checkpoints save and restore.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .views import crop_tokens

StudentNoise = Callable[[dict], dict]


class TokenMasking:
    """Replace each attended, non-special token by ``mask_token_id`` with probability ``probability``.

    BERT-style masking as input noise; the labels are not touched.

    Args:
        probability: The chance that a token is masked, in (0, 1).
        mask_token_id: The id that replaces masked tokens.
        protected_ids: Ids never masked (special tokens).

    Raises:
        ValueError: ``probability`` outside (0, 1).
    """

    def __init__(self, probability: float, mask_token_id: int, protected_ids: Sequence[int] = ()):
        _check_probability("TokenMasking", probability)
        self.probability, self.mask_token_id = probability, int(mask_token_id)
        self.protected_ids = torch.tensor(sorted(set(protected_ids)), dtype=torch.long)

    @classmethod
    def from_tokenizer(cls, tokenizer, probability: float) -> TokenMasking:
        """Masking with a tokenizer's mask token; its special tokens are never masked.

        The mask token, else the unknown token, else the end-of-text token (a byte-level BPE has neither of the first
        two).

        Args:
            tokenizer: A transformers tokenizer.
            probability: The chance that a token is masked, in (0, 1).

        Returns:
            The noise.

        Raises:
            ValueError: the tokenizer has none of the three tokens.
        """
        candidates = (tokenizer.mask_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
        mask_id = next((token for token in candidates if token is not None), None)
        if mask_id is None:
            raise ValueError("TokenMasking.from_tokenizer needs a tokenizer with a mask, unknown or end-of-text token.")
        return cls(probability, mask_id, tokenizer.all_special_ids)

    def __call__(self, batch: dict) -> dict:
        """The batch with some tokens masked.

        Args:
            batch: A batch with ``input_ids`` (and, optionally, ``attention_mask``).

        Returns:
            A new batch with new ``input_ids``.

        Raises:
            ValueError: the batch has no ``input_ids``.
        """
        input_ids = _field(batch, "input_ids", "TokenMasking")
        chosen = _maskable(batch, input_ids, self.protected_ids) & _draw(input_ids, self.probability)
        return {**batch, "input_ids": input_ids.masked_fill(chosen, self.mask_token_id)}


class TokenDropout:
    """Drop each attended, non-special token with probability ``probability`` by removing it from the attention mask.

    Positions stay where they are, so token-level outputs keep their alignment; every row keeps at least one token.

    Args:
        probability: The chance that a token is dropped, in (0, 1).
        protected_ids: Ids never dropped (special tokens).

    Raises:
        ValueError: ``probability`` outside (0, 1).
    """

    def __init__(self, probability: float, protected_ids: Sequence[int] = ()):
        _check_probability("TokenDropout", probability)
        self.probability = probability
        self.protected_ids = torch.tensor(sorted(set(protected_ids)), dtype=torch.long)

    @classmethod
    def from_tokenizer(cls, tokenizer, probability: float) -> TokenDropout:
        """Dropout that never drops a tokenizer's special tokens.

        Args:
            tokenizer: A transformers tokenizer.
            probability: The chance that a token is dropped, in (0, 1).

        Returns:
            The noise.
        """
        return cls(probability, tokenizer.all_special_ids)

    def __call__(self, batch: dict) -> dict:
        """The batch with some tokens dropped from its attention mask.

        Args:
            batch: A batch with ``input_ids`` (and, optionally, ``attention_mask``).

        Returns:
            A new batch with a new ``attention_mask``.

        Raises:
            ValueError: the batch has no ``input_ids``.
        """
        input_ids = _field(batch, "input_ids", "TokenDropout")
        attention_mask = batch.get("attention_mask", torch.ones_like(input_ids))
        droppable = _maskable(batch, input_ids, self.protected_ids)
        dropped = droppable & _draw(input_ids, self.probability)
        kept = attention_mask.bool() & ~dropped
        emptied = ~kept.any(dim=1)  # give such a row its first droppable token back
        if emptied.any():
            first = torch.zeros_like(dropped)
            first[torch.arange(len(first), device=first.device), droppable.int().argmax(dim=1)] = True
            dropped &= ~(first & emptied[:, None])
        return {**batch, "attention_mask": attention_mask.masked_fill(dropped, 0)}


class TokenCrop:
    """Keep a random window of ``length`` tokens of each longer row: its leading and trailing special tokens plus a
    contiguous run of the tokens between them, drawn uniformly (the text counterpart of an image's random crop).

    Every per-token field (``input_ids``, ``attention_mask``, ``token_type_ids``…) is cropped alike and the batch
    shrinks to its longest kept row, padded on the side it was padded on. Rows of at most ``length`` tokens are kept
    whole. The teachers read the uncropped batch, so a teacher can label a whole document while the student learns
    from windows of it. For models with one output per row (sequence classification, embeddings): a batch with
    per-token labels is refused, since a crop moves the tokens they belong to.

    Args:
        length: The tokens kept per row, special tokens included; >= 1 more than the special tokens a row carries.
        protected_ids: The special token ids kept in place at the ends of each row.
        pad_token_id: The id that pads the cropped rows.

    Raises:
        ValueError: ``length`` < 1.
    """

    def __init__(self, length: int, protected_ids: Sequence[int] = (), pad_token_id: int = 0):
        if length < 1:
            raise ValueError(f"TokenCrop needs length >= 1, got {length}.")
        self.length, self.pad_token_id = int(length), int(pad_token_id)
        self.protected_ids = torch.tensor(sorted(set(protected_ids)), dtype=torch.long)

    @classmethod
    def from_tokenizer(cls, tokenizer, length: int) -> TokenCrop:
        """A crop that keeps a tokenizer's special tokens at the ends of each row and pads with its pad token.

        Args:
            tokenizer: A transformers tokenizer.
            length: The tokens kept per row, special tokens included.

        Returns:
            The noise.
        """
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(length, tokenizer.all_special_ids, pad)

    def __call__(self, batch: dict) -> dict:
        """The batch with each longer row cropped to a random window.

        Args:
            batch: A batch with ``input_ids`` (and, optionally, ``attention_mask`` and other per-token fields).

        Returns:
            A new batch whose per-token fields are cropped; every other field is untouched.

        Raises:
            ValueError: the batch has no ``input_ids``, its labels are per token, or a row's special tokens leave no
                room within ``length``.
        """
        input_ids = _field(batch, "input_ids", "TokenCrop")
        return crop_tokens(
            batch,
            self.length,
            self.protected_ids,
            self.pad_token_id,
            lambda slack: int(torch.randint(slack + 1, (1,), device=input_ids.device)),
            "TokenCrop",
        )


class GaussianNoise:
    """Add N(0, std²) noise to a float input (``pixel_values`` by default; ``input_values`` for audio).

    Args:
        std: The noise's standard deviation, > 0.
        field: The batch field to perturb.

    Raises:
        ValueError: ``std`` is not > 0.
    """

    def __init__(self, std: float, field: str = "pixel_values"):
        if not std > 0:
            raise ValueError(f"GaussianNoise needs std > 0, got {std}.")
        self.std, self.field = std, field

    def __call__(self, batch: dict) -> dict:
        """The batch with noise added to ``field``.

        Args:
            batch: A batch holding ``field``.

        Returns:
            A new batch.

        Raises:
            ValueError: the batch has no ``field``.
        """
        values = _field(batch, self.field, "GaussianNoise")
        return {**batch, self.field: values + self.std * torch.randn_like(values)}


class RandomShift:
    """Translate each image by a random whole number of pixels in [−max_pixels, max_pixels] along height and width.

    The uncovered border is filled with ``fill`` (the augmentation of small images such as 8×8 digits).

    Args:
        max_pixels: The largest shift, >= 1.
        fill: The value of the uncovered border.
        field: The batch field holding the images.

    Raises:
        ValueError: ``max_pixels`` < 1.
    """

    def __init__(self, max_pixels: int, fill: float = 0.0, field: str = "pixel_values"):
        if max_pixels < 1:
            raise ValueError(f"RandomShift needs max_pixels >= 1, got {max_pixels}.")
        self.max_pixels, self.fill, self.field = int(max_pixels), float(fill), field

    def __call__(self, batch: dict) -> dict:
        """The batch with each image shifted.

        Args:
            batch: A batch holding ``field`` as ``B×C×H×W``.

        Returns:
            A new batch.

        Raises:
            ValueError: the batch has no ``field``, or it is not 4-dimensional.
        """
        images = _field(batch, self.field, "RandomShift")
        if images.dim() != 4:
            raise ValueError(f"RandomShift needs {self.field} of shape (batch, channels, height, width).")
        shifts = torch.randint(-self.max_pixels, self.max_pixels + 1, (len(images), 2), device=images.device)
        height, width = images.shape[-2:]
        rows = torch.arange(height, device=images.device)[None, :] - shifts[:, :1]  # source row of each target row
        cols = torch.arange(width, device=images.device)[None, :] - shifts[:, 1:]
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        index = rows.clamp(0, height - 1)[:, :, None] * width + cols.clamp(0, width - 1)[:, None, :]
        flat = images.flatten(2).gather(2, index.flatten(1)[:, None, :].expand(-1, images.shape[1], -1))
        shifted = flat.view_as(images).masked_fill(~inside[:, None], self.fill)
        return {**batch, self.field: shifted}


def compose_noise(noise: StudentNoise | Sequence[StudentNoise] | None) -> StudentNoise | None:
    """One callable applying ``noise`` in order.

    Args:
        noise: A callable ``batch → batch``, a list of them, or ``None``.

    Returns:
        The callable, or ``None`` for no noise.

    Raises:
        TypeError: an entry that is not callable.
    """
    if noise is None:
        return None
    steps = list(noise) if isinstance(noise, (list, tuple)) else [noise]
    for step in steps:
        if not callable(step):
            raise TypeError(f"student_noise must be a callable batch → batch or a list of them, got {step!r}.")
    if len(steps) == 1:
        return steps[0]

    def apply(batch: dict) -> dict:
        for step in steps:
            batch = step(batch)
        return batch

    return apply


def _check_probability(name: str, probability: float) -> None:
    if not 0 < probability < 1:
        raise ValueError(f"{name} needs a probability in (0, 1), got {probability}.")


def _field(batch: dict, name: str, noise: str) -> torch.Tensor:
    if name not in batch:
        raise ValueError(f"{noise} perturbs {name!r}, which this batch does not have (it has {sorted(batch)}).")
    return batch[name]


def _draw(reference: torch.Tensor, probability: float) -> torch.Tensor:
    return torch.rand(reference.shape, device=reference.device) < probability


def _maskable(batch: dict, input_ids: torch.Tensor, protected_ids: torch.Tensor) -> torch.Tensor:
    maskable = ~torch.isin(input_ids, protected_ids.to(input_ids.device))
    if "attention_mask" in batch:
        maskable &= batch["attention_mask"].bool()
    return maskable
