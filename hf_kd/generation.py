"""Generation for distillation: sequence-level KD data from a teacher, and student rollouts for on-policy KD.

Sequence-level KD (Kim & Rush 2016, *Sequence-Level Knowledge Distillation*, arXiv:1606.07947): the teacher
generates outputs for the training prompts once (:func:`generate_teacher_outputs`), and the student trains on
them with its usual NLL (:func:`tokenize_prompt_completion`), optionally with word-level KD on top.

On-policy KD (Agarwal et al. 2024, GKD, arXiv:2306.13649): for a fraction λ of training steps the student samples
continuations of the prompts (:func:`student_rollout`), which the teacher then scores token by token.
"""

from __future__ import annotations

import contextlib

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

#: Batch key marking a batch of student samples: its labels only say where the completion is.
ON_POLICY_KEY = "hf_kd_on_policy"


@contextlib.contextmanager
def _left_padding(tokenizer):
    side = tokenizer.padding_side
    backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust state, saved into tokenizer.json
    padding = backend.padding if backend is not None else None
    tokenizer.padding_side = "left"  # decoder-only models continue from the last real token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        # Padding with the side set enables it in the backend too; left as "Left" there, a tokenizer saved later
        # (the student's) would reload left-padding, and pad labels on the left.
        if backend is not None:
            backend.no_padding() if padding is None else backend.enable_padding(**padding)


def generate_teacher_outputs(
    teacher: nn.Module,
    tokenizer,
    dataset: Dataset,
    *,
    prompt_column: str = "prompt",
    output_column: str = "completion",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_prompt_length: int | None = None,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    synced_gpus: bool = False,
) -> Dataset:
    """``dataset`` with ``output_column`` holding the teacher's text for each prompt.

    Greedy by default; beams with ``num_beams``, sampling with ``do_sample``. Batched; save the result with
    ``save_to_disk`` to reuse it. The caller's random state is left as it was.

    Args:
        teacher: The teacher (a causal or seq2seq LM).
        tokenizer: Its tokenizer (needs a pad token; decoder-only prompts are left-padded).
        dataset: Rows with a prompt column.
        prompt_column: The prompt column.
        output_column: The column to write the generated text to (replaced if it exists).
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: Tokens generated per prompt at most.
        max_prompt_length: Truncate prompts to this many tokens; ``None``: no truncation.
        num_beams: Beam-search width (1: greedy or sampling).
        do_sample: Sample instead of decoding greedily.
        temperature: Sampling temperature (with ``do_sample``).
        top_p: Nucleus sampling's p (with ``do_sample``).
        seed: Seeds sampling.
        progress: Show a progress bar.
        synced_gpus: A model sharded by DeepSpeed ZeRO-3 (inside its engine), generating on every process.

    Returns:
        The data set with the teacher's outputs.

    Raises:
        ValueError: the data set has no ``prompt_column``, or the tokenizer has no pad token.
    """
    if prompt_column not in dataset.column_names:
        raise ValueError(f"dataset has no column {prompt_column!r} (columns: {dataset.column_names}).")
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos token) to batch.")
    device = next(teacher.parameters()).device
    teacher.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the caller's RNG as it was
        torch.manual_seed(seed)
        outputs = _generate(
            teacher,
            tokenizer,
            list(dataset[prompt_column]),
            batch_size=batch_size,
            max_prompt_length=max_prompt_length,
            progress=progress,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced_gpus,
        )
    if output_column in dataset.column_names:
        dataset = dataset.remove_columns(output_column)
    return dataset.add_column(output_column, outputs)


def _generate(teacher, tokenizer, prompts: list[str], *, batch_size, max_prompt_length, progress, **generate_kwargs):
    """The teacher's decoded continuations of ``prompts``, batch by batch (left-padded for decoder-only models)."""
    device = next(teacher.parameters()).device
    encoder_decoder = getattr(teacher.config, "is_encoder_decoder", False)
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="teacher generation", disable=not progress):
        with _left_padding(tokenizer) as left:
            batch = left(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=max_prompt_length is not None,
                max_length=max_prompt_length,
            ).to(device)
        with torch.no_grad():
            generated = teacher.generate(**batch, **generate_kwargs)
        new_tokens = generated if encoder_decoder else generated[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return outputs


def tokenize_prompt_completion(
    dataset: Dataset,
    tokenizer,
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    max_length: int = 512,
    add_eos: bool = True,
) -> Dataset:
    """Causal-LM rows ``prompt + completion (+ eos)`` with labels on the completion only (-100 on the prompt).

    What sequence-level KD and on-policy KD train on.

    Args:
        dataset: Rows with a prompt and a completion column.
        tokenizer: The model's tokenizer.
        prompt_column: The prompt column.
        completion_column: The completion column.
        max_length: Tokens kept per row.
        add_eos: Append the tokenizer's eos token to the completion.

    Returns:
        A data set of ``input_ids``, ``attention_mask`` and ``labels`` (the original columns removed).
    """

    def encode(example):
        prompt = tokenizer(example[prompt_column], add_special_tokens=True)["input_ids"]
        completion = tokenizer(example[completion_column], add_special_tokens=False)["input_ids"]
        if add_eos and tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
        ids = (prompt + completion)[:max_length]
        labels = ([-100] * len(prompt) + completion)[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return dataset.map(encode, remove_columns=dataset.column_names)


def _pad_token_id(model: nn.Module) -> int:
    config = model.generation_config
    for candidate in (config.pad_token_id, config.eos_token_id, getattr(model.config, "pad_token_id", None), 0):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


@torch.no_grad()
def student_rollout(model: nn.Module, batch: dict, generation_kwargs: dict, synced_gpus: bool = False) -> dict:
    """A batch of the student's own continuations of ``batch``'s prompts, to be scored by the teacher.

    Causal LMs: the prompt of a row is everything before its first label (labels are -100 on the prompt), the
    rows come back right-padded with labels on the sampled tokens up to and including the first eos. Seq2seq: the
    encoder inputs stay, the labels become the sampled output. The batch is marked with ``ON_POLICY_KEY`` so the
    trainer skips the label loss on it (the student's own samples are no target).

    Args:
        model: The student (a causal or seq2seq LM); put back in its training mode afterwards.
        batch: A training batch with ``input_ids`` and ``labels``.
        generation_kwargs: ``generate`` arguments (``DistillationConfig.generation_kwargs``).
        synced_gpus: Generate on every process (DeepSpeed ZeRO-3, FSDP).

    Returns:
        The new batch.

    Raises:
        ValueError: the batch has no labels to tell where each prompt ends.
    """
    if batch.get("labels") is None:
        raise ValueError(
            "on-policy distillation needs labels that mark each row's completion (-100 on the prompt tokens) "
            "to know where the prompt ends."
        )
    was_training = model.training
    model.eval()
    try:
        pad = _pad_token_id(model)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        # use_cache: the Trainer turned the model's cache off for training; sampling with it is several times faster
        kwargs = {"pad_token_id": pad, "synced_gpus": synced_gpus, "use_cache": True, **generation_kwargs}
        if getattr(model.config, "is_encoder_decoder", False):
            encoder = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            sampled = model.generate(**encoder, **kwargs)[:, 1:]  # without the decoder start token
            labels = sampled.masked_fill(_after_first_eos(sampled, eos) | sampled.eq(pad), -100)
            return {**encoder, "labels": labels, ON_POLICY_KEY: True}
        prompts, prompt_mask = _left_padded_prompts(batch, pad)
        sequences = model.generate(input_ids=prompts, attention_mask=prompt_mask, **kwargs)
    finally:
        model.train(was_training)
    sampled = sequences[:, prompts.shape[1] :]
    sampled_mask = ~_after_first_eos(sampled, eos)
    attention = torch.cat([prompt_mask.bool(), sampled_mask], dim=1)
    labels = torch.cat([torch.full_like(prompts, -100), sampled.masked_fill(~sampled_mask, -100)], dim=1)
    # Back to right padding: positions count from each row's first real token, as in training batches.
    shift = (~prompt_mask.bool()).sum(1, keepdim=True)
    length = sequences.shape[1]
    index = torch.arange(length, device=sequences.device)[None] + shift
    inside = index < length
    index = index.clamp(max=length - 1)
    return {
        "input_ids": sequences.gather(1, index).masked_fill(~inside, pad),
        "attention_mask": (attention.gather(1, index) & inside).long(),
        "labels": labels.gather(1, index).masked_fill(~inside, -100),
        ON_POLICY_KEY: True,
    }


def _left_padded_prompts(batch: dict, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt (tokens before its first label), left-padded to the longest prompt."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    attention = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
    supervised = labels.ne(-100)
    # Prompt length: the first supervised position, or every real token of a row without labels.
    lengths = torch.where(supervised.any(1), supervised.float().argmax(1), attention.sum(1))
    width = int(lengths.max().clamp(min=1))
    position = torch.arange(width, device=input_ids.device)[None]
    source = (position - (width - lengths)[:, None]).clamp(min=0)
    keep = position >= (width - lengths)[:, None]
    prompts = input_ids.gather(1, source.clamp(max=input_ids.shape[1] - 1)).masked_fill(~keep, pad)
    return prompts, keep.long()


def _after_first_eos(tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """True after each row's first eos (the eos itself stays): generation pads finished rows there."""
    if not eos:
        return torch.zeros_like(tokens, dtype=torch.bool)
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for token in eos:
        is_eos |= tokens.eq(token)
    seen = is_eos.long().cumsum(1)
    return (seen - is_eos.long()) > 0
