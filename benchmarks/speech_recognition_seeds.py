"""The speech-recognition recipe's comparison over seeds: does distilling Whisper beat training on the true text?

`make demo-asr` (recipes/speech_recognition.py) measures one seed. This script repeats its setting
(recipes/configs/speech_recognition.yaml: Whisper tiny.en teaching its encoder, frozen, and decoder layers 0 and 3;
200 BBC sentences × 3 espeak-ng voices for training, held-out sentences in 2 held-out voices for the test) with the
setting its validation chose (pseudo-labels kept at WER <= 40%, KL weight 3, τ 2), per seed (the seed draws the
sentences and orders the batches), and trains on the same kept clips, for the same steps:

- ``true text (CE)``: the student trained on the true text, no teacher (the recipe's undistilled row);
- ``pseudo-labels (CE) + 3·KL, τ 2``: the recipe's distilled student (distil-whisper's loss);
- ``pseudo-labels (CE) + 3·KL, τ 1``: the same at τ 1;
- ``true text (CE) + 3·KL, τ 2``: Hinton's form, the true text's cross-entropy plus KL to the teacher (read on
  the true text): it differs from the undistilled student only by the teacher's term.

With --labelled_sentences N (the recipe's option) only the first N training sentences keep their true text; the
clips of the others are unlabelled audio, spoken in --unlabelled_voices (default: the training voices), and the runs
are the set-up where a teacher has audio to add (every student reads all N labelled sentences' clips, no WER filter):

- ``true text of the labelled clips (CE)``: no teacher, so no use for the unlabelled clips;
- ``+ teacher transcripts of unlabelled clips (CE) + 3·KL, τ 2``: true-text CE on the labelled clips, and the
  teacher's transcripts of the unlabelled clips it is sure of (the recipe's --logprob_threshold and
  --compression_ratio_threshold: no true text decides), with KL to the teacher on every row;
- ``… without KL``: the same rows, the transcripts alone (sequence-level KD, Kim & Rush 2016);
- ``true text of every clip (CE)``: the labelled and the unlabelled clips with their true text, the bound that labels
  for all the audio would give.

Prints test WER (held-out voices) and validation WER (training voices) per seed and the mean ± std table, written
to --output_dir/speech_recognition_seeds.md (speech_recognition_unlabelled.md with --labelled_sentences) after every
seed.

    python benchmarks/speech_recognition_seeds.py --seeds 42 1 2       # ~22 min per seed on the 2-core machine
    python benchmarks/speech_recognition_seeds.py --labelled_sentences 50 --output_dir outputs/asr_unlabelled
    python benchmarks/speech_recognition_seeds.py --labelled_sentences 100 --unlabelled_voices en-gb,en-us+f4 \
        --output_dir outputs/asr_adaptation    # untranscribed audio from the test's voices: domain adaptation
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os

import torch
from schemes_digits import ROOT, load_recipe, recorder, sweep
from transformers import WhisperForConditionalGeneration, WhisperProcessor, set_seed

from hf_kd import DistillationTrainer
from hf_kd.pretrained import whisper_tiny_en
from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_plainly
from hf_kd.recipe_support.cli import parse_args

CONFIG = os.path.join(ROOT, "recipes", "configs", "speech_recognition.yaml")


def run_seed(seed: int, options, module, scores: dict[str, list[float]]) -> None:
    unlabelled = []
    if options.labelled_sentences is not None:
        unlabelled = ["--labelled_sentences", str(options.labelled_sentences)]
        unlabelled += ["--unlabelled_voices", options.unlabelled_voices]
    recipe, args = parse_args(
        (module.SpeechRecognitionArguments, module.DistillationConfig),
        ["--config", CONFIG, "--seed", str(seed), "--output_dir", os.path.join(options.output_dir, f"seed{seed}")]
        + unlabelled,
    )
    args = dataclasses.replace(args, disable_tqdm=True)
    set_seed(seed)
    record = recorder(scores, seed)
    batch_size = args.per_device_eval_batch_size
    teacher_path = whisper_tiny_en(os.path.join(options.output_dir, "models"))
    teacher = WhisperForConditionalGeneration.from_pretrained(teacher_path).eval()
    processor = WhisperProcessor.from_pretrained(teacher_path)
    splits = module.spoken_splits(
        recipe, seed, teacher, processor, os.path.join(options.output_dir, "data"), batch_size
    )
    train = splits["train"]

    def score(name: str, model) -> None:
        for split, what in (("test", "test WER (held-out voices)"), ("validation", "validation WER (training voices)")):
            wer = module.model_wer(model, processor, splits[split], batch_size, recipe.max_new_tokens)
            record(f"{name}: {what}", wer)

    score("teacher (Whisper tiny.en)", teacher)
    if "unlabelled" in splits:
        with_unlabelled(recipe, args, options, module, teacher, processor, splits, score)
        return
    pseudo_labels = module.transcribe(teacher, processor, train.encoded, batch_size, recipe.max_new_tokens)
    rates = module.error_rates(processor.tokenizer.batch_decode(pseudo_labels), train.truths)
    kept = [index for index, rate in enumerate(rates) if rate <= options.wer_threshold]
    print(f"seed {seed}: pseudo-labels kept: {len(kept)} of {len(rates)} (WER <= {options.wer_threshold:.0%})")
    truth_ids = module.text_ids(processor, [train.truths[index] for index in kept])
    pseudo_rows = module.decoder_rows(train.encoded[kept], [pseudo_labels[index] for index in kept], processor)
    truth_rows = module.decoder_rows(train.encoded[kept], truth_ids, processor)
    layers = module.spaced_layers(teacher.config.decoder_layers, recipe.student_decoder_layers)
    collator = functools.partial(module.collate, pad_token_id=processor.tokenizer.eos_token_id)

    def student():
        return module.shallow_student(teacher, layers, recipe.freeze_decoder_embeddings)

    folder = args.output_dir
    on_truth = train_plainly(
        student(),
        plain_args(args, optimizer_steps(args, len(kept))),
        truth_rows,
        output_dir=os.path.join(folder, "truth"),
        data_collator=collator,
    )
    score("true text (CE)", on_truth)
    kl = [{"name": "kl", "weight": options.kl_weight}]
    runs = [
        (f"pseudo-labels (CE) + {options.kl_weight:g}·KL, τ 2", pseudo_rows, 2.0),
        (f"pseudo-labels (CE) + {options.kl_weight:g}·KL, τ 1", pseudo_rows, 1.0),
        (f"true text (CE) + {options.kl_weight:g}·KL, τ 2", truth_rows, 2.0),
    ]
    for index, (name, rows, temperature) in enumerate(runs):
        trainer = DistillationTrainer(
            model=student(),
            teacher_model=teacher,
            args=dataclasses.replace(
                args, losses=kl, temperature=temperature, output_dir=os.path.join(folder, f"distilled{index}")
            ),
            train_dataset=rows,
            data_collator=collator,
            processing_class=processor,
        )
        trainer.train()
        score(name, trainer.student)


def with_unlabelled(recipe, args, options, module, teacher, processor, splits, score) -> None:
    """The runs of --labelled_sentences: the labelled clips' true text, with and without the teacher's transcripts of
    the unlabelled clips."""
    batch_size = args.per_device_eval_batch_size
    train, unlabelled = splits["train"], splits["unlabelled"]
    transcripts = module.trusted_teacher_transcripts(teacher, processor, unlabelled, recipe, batch_size)
    print(
        f"seed {args.seed}: teacher transcripts kept: {len(transcripts.kept)} of {len(unlabelled.clips)} unlabelled "
        f"clips ({', '.join(unlabelled.voices)}); their WER against the true text: {100 * transcripts.wer:.1f}%",
        flush=True,
    )
    truth_ids = module.text_ids(processor, train.truths)
    truth_rows = module.decoder_rows(train.encoded, truth_ids, processor)
    both = module.decoder_rows(
        torch.cat([train.encoded, unlabelled.encoded[transcripts.kept]]),
        truth_ids + transcripts.token_ids,
        processor,
    )
    every_truth = module.decoder_rows(
        torch.cat([train.encoded, unlabelled.encoded]),
        truth_ids + module.text_ids(processor, unlabelled.truths),
        processor,
    )
    layers = module.spaced_layers(teacher.config.decoder_layers, recipe.student_decoder_layers)
    collator = functools.partial(module.collate, pad_token_id=processor.tokenizer.eos_token_id)

    def student():
        return module.shallow_student(teacher, layers, recipe.freeze_decoder_embeddings)

    def plainly(name: str, rows, folder: str) -> None:
        model = train_plainly(
            student(),
            plain_args(args, optimizer_steps(args, len(rows))),
            rows,
            output_dir=os.path.join(args.output_dir, folder),
            data_collator=collator,
        )
        score(name, model)

    plainly(f"true text of the {len(train.clips)} labelled clips (CE), no teacher", truth_rows, "labelled")
    trainer = DistillationTrainer(
        model=student(),
        teacher_model=teacher,
        args=dataclasses.replace(
            args,
            losses=[{"name": "kl", "weight": options.kl_weight}],
            temperature=2.0,
            output_dir=os.path.join(args.output_dir, "distilled"),
        ),
        train_dataset=both,
        data_collator=collator,
        processing_class=processor,
    )
    trainer.train()
    score(f"+ teacher transcripts of unlabelled clips (CE) + {options.kl_weight:g}·KL, τ 2", trainer.student)
    plainly("+ teacher transcripts of unlabelled clips (CE), without KL", both, "transcripts")
    plainly(f"true text of every clip (CE): the {len(unlabelled.clips)} unlabelled ones too", every_truth, "every")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--wer_threshold", type=float, default=0.4, help="Pseudo-labels kept (the recipe's choice).")
    parser.add_argument("--kl_weight", type=float, default=3.0, help="The KL weight (the recipe's choice).")
    parser.add_argument(
        "--labelled_sentences",
        type=int,
        default=None,
        help="Only the first N training sentences keep their true text (the recipe's option): the runs with "
        "unlabelled clips.",
    )
    parser.add_argument(
        "--unlabelled_voices", default="", help="Voices of the unlabelled sentences (default: the training voices)."
    )
    parser.add_argument("--output_dir", default="outputs/speech_recognition_seeds")
    options = parser.parse_args()
    module = load_recipe("speech_recognition")

    def title(seeds):
        if options.labelled_sentences is None:
            data = f"pseudo-labels at WER <= {options.wer_threshold:.0%}"
        else:
            voices = options.unlabelled_voices or "the training voices"
            data = f"{options.labelled_sentences} labelled training sentences, the others unlabelled in {voices}"
        return (
            f"Whisper tiny.en → its encoder + decoder layers 0, 3 (recipes/configs/speech_recognition.yaml), "
            f"{data}; seeds {', '.join(map(str, seeds))}. Lower is better"
        )

    stem = "speech_recognition_seeds" if options.labelled_sentences is None else "speech_recognition_unlabelled"
    sweep(options, lambda seed, scores: run_seed(seed, options, module, scores), title, stem, metric="WER")


if __name__ == "__main__":
    main()
