"""Distil an image classifier: a ViT teacher into a much smaller ViT student, on real handwritten digits.

scikit-learn's digits (1,797 8×8 grey images, 10 classes) are exported once to a local JSON file and read back
with load_dataset. The teacher is trained on every training label (or loaded with --teacher); the students see
only --num_labeled labels, the distilled one also the remaining training images without labels. The script
prints (and saves to OUTPUT_DIR/results.md) test-split results for the teacher, the student trained from
scratch with the same steps and seed, and the distilled student.

    python recipes/image_classification.py --config recipes/configs/image_classification.yaml   # ~1 min
    python recipes/image_classification.py --config recipes/configs/image_classification.yaml \
        --losses dkd:1.0:beta=2 --temperature 4 --output_dir outputs/digits-dkd
    # Feature, relation and mutual-information knowledge (ViT widths 16 vs 64: hint/vid learn their regressors)
    python recipes/image_classification.py --config recipes/configs/image_classification.yaml \
        --losses kl,hint,rkd_distance,crd --output_dir outputs/digits-feat
    python recipes/image_classification.py --config recipes/configs/image_classification.yaml \
        --push_to_hub --hub_model_id you/digits-vit-student --hub_private_repo
    # Schemes: via an assistant, born-again generations, noisy-student rounds, several teachers
    python recipes/image_classification.py --config recipes/configs/image_classification.yaml \
        --scheme teacher_assistant --output_dir outputs/digits-ta
    python recipes/image_classification.py --config recipes/configs/image_classification.yaml \
        --scheme noisy_student --rounds 2 --pseudo_label_threshold 0.5 --output_dir outputs/digits-ns
    python recipes/image_classification.py --config recipes/configs/image_classification.yaml \
        --teachers outputs/digits/teacher,outputs/digits-ta/teacher --teacher_aggregation adaptive
    accelerate launch recipes/image_classification.py --teacher outputs/digits/teacher --output_dir outputs/d2
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from datasets import load_dataset
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    set_seed,
)

from hf_kd import DistillationConfig
from hf_kd.data import add_sample_index, split_labeled_transfer
from hf_kd.metrics import get_compute_metrics
from hf_kd.noise import GaussianNoise, RandomShift
from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_plainly, train_teacher
from hf_kd.recipe_support.cli import check_recipe_engine, leave_process_group
from hf_kd.recipe_support.schemes import parse_recipe_args, stage_rows
from hf_kd.recipe_support.tables import compare_recipe_models
from hf_kd.schemes import run_scheme
from hf_kd.schemes.amalgamation import own_class_rows


@dataclass
class ImageRecipeArguments:
    dataset_name: str = field(
        default="digits",
        metadata={
            "help": "'digits' (scikit-learn's, exported to a local JSON file) or a load_dataset path whose "
            "rows hold 'pixels' (a flat list of side×side grey values) and 'label'."
        },
    )
    data_files: str | None = field(default=None)
    image_side: int = field(default=8)
    max_pixel_value: float = field(default=16.0, metadata={"help": "Pixel values are scaled by 1/max_pixel_value."})
    test_fraction: float = field(default=0.2)
    num_labeled: int = field(default=100, metadata={"help": "Labeled training images the students may use."})
    teacher: str | None = field(default=None, metadata={"help": "A trained teacher; default: train one here."})
    baselines: bool = field(
        default=True,
        metadata={
            "help": "Also train a scratch student (and, without --teacher, the teacher) and compare all three. "
            "false: distil only, with --teacher — one Trainer per process, which DeepSpeed requires."
        },
    )
    teacher_steps: int = field(default=1500)
    teacher_hidden_size: int = field(default=64)
    teacher_layers: int = field(default=4)
    student_hidden_size: int = field(default=16)
    student_layers: int = field(default=1)
    patch_size: int = field(default=2)
    metric: str = field(default="accuracy", metadata={"help": "'accuracy' or a local evaluate module path."})


def load_image_dataset(recipe: ImageRecipeArguments, cache_dir: str):
    if recipe.dataset_name == "digits":
        path = os.path.join(cache_dir, "digits.jsonl")
        if not os.path.exists(path):
            from sklearn.datasets import load_digits

            digits = load_digits()
            os.makedirs(cache_dir, exist_ok=True)
            with open(path, "w") as handle:
                for pixels, label in zip(digits.data, digits.target):
                    handle.write(json.dumps({"pixels": pixels.astype(int).tolist(), "label": int(label)}) + "\n")
        return load_dataset("json", data_files=path, split="train")
    return load_dataset(recipe.dataset_name, data_files=recipe.data_files, split="train")


def vit(recipe: ImageRecipeArguments, hidden_size: int, layers: int, num_labels: int) -> ViTForImageClassification:
    config = ViTConfig(
        image_size=recipe.image_side,
        patch_size=recipe.patch_size,
        num_channels=1,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 16),
        intermediate_size=4 * hidden_size,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def main():
    recipe, choice, scheme, args = parse_recipe_args(ImageRecipeArguments, DistillationConfig)
    teacher_paths = choice.teacher_paths(recipe.teacher)
    check_recipe_engine(args, baselines=recipe.baselines, teacher=",".join(teacher_paths))
    set_seed(args.seed)
    compute_metrics = get_compute_metrics(recipe.metric)

    # ---- data: grey images → pixel_values through an image processor saved with the student ----
    with args.main_process_first(desc="export the data"):  # one process writes the local copy
        dataset = load_image_dataset(recipe, cache_dir=os.path.join(args.output_dir, "data"))
    dataset = dataset.class_encode_column("label").rename_column("label", "labels")
    num_labels = dataset.features["labels"].num_classes
    if teacher_paths:
        processor = AutoImageProcessor.from_pretrained(teacher_paths[0])
    else:
        processor = ViTImageProcessorPil(
            do_resize=False,
            do_rescale=True,
            rescale_factor=1 / recipe.max_pixel_value,
            do_normalize=True,
            image_mean=[0.5],
            image_std=[0.5],
        )

    def preprocess(batch):
        images = [
            np.asarray(p, dtype=np.float32).reshape(recipe.image_side, recipe.image_side, 1) for p in batch["pixels"]
        ]
        pixel_values = processor(images, input_data_format="channels_last", return_tensors="np")["pixel_values"]
        return {"pixel_values": pixel_values}

    dataset = dataset.map(preprocess, batched=True, remove_columns=["pixels"]).with_format("torch")
    splits = dataset.train_test_split(test_size=recipe.test_fraction, stratify_by_column="labels", seed=args.seed)
    train, test = splits["train"], splits["test"]
    validation = None
    if getattr(scheme, "graph_search", 0):  # the search compares its trials on held-out training rows, never the test
        held = train.train_test_split(test_size=0.15, stratify_by_column="labels", seed=args.seed)
        train, validation = held["train"], held["test"]
    labeled, transfer = split_labeled_transfer(train, recipe.num_labeled, seed=args.seed)
    transfer = add_sample_index(transfer)  # row ids for losses with per-example memory (crd); others ignore them
    labeled, transfer = labeled.with_format("torch"), transfer.with_format("torch")

    # Same optimizer steps for every student: the scratch run cycles over its few labels as often as needed.
    steps = optimizer_steps(args, len(transfer))
    baseline_args = plain_args(args, steps)

    # ---- teachers: loaded (--teacher, or several with --teachers), or one trained on every training label ----
    if teacher_paths:
        teachers = [AutoModelForImageClassification.from_pretrained(path) for path in teacher_paths]
    else:
        teachers = [vit(recipe, recipe.teacher_hidden_size, recipe.teacher_layers, num_labels)]
        train_teacher(teachers[0], baseline_args, train, steps=recipe.teacher_steps, processor=processor, alpha=None)
    teacher = teachers[0] if len(teachers) == 1 else teachers

    # ---- students: from scratch on the labeled images vs distilled on labeled + unlabeled, same steps/seed ----
    def make_student(generation: int) -> ViTForImageClassification:
        set_seed(args.seed + generation - 1)  # generation / round 1: the scratch student's initialisation
        student = vit(recipe, recipe.student_hidden_size, recipe.student_layers, num_labels)
        if scheme.name == "amalgamation":  # its classes are matched by name with each teacher's id2label
            names = dataset.features["labels"].names
            student.config.id2label = dict(enumerate(names))
            student.config.label2id = {name: index for index, name in enumerate(names)}
        return student

    def make_assistant(hidden_size: int | None, layers: int | None) -> ViTForImageClassification:
        hidden = hidden_size or 16 * round((recipe.teacher_hidden_size * recipe.student_hidden_size) ** 0.5 / 16)
        layers = layers or max(1, (recipe.teacher_layers + recipe.student_layers) // 2)
        set_seed(args.seed)
        return vit(recipe, hidden, layers, num_labels)

    if recipe.baselines:
        scratch = make_student(1)
        train_plainly(scratch, baseline_args, labeled, output_dir=os.path.join(args.output_dir, "scratch"))
    # Noisy student: the pixels are normalised to [-1, 1], so a shifted-in border is background (-1).
    result = run_scheme(
        scheme,
        args,
        teacher=teacher if choice.takes_teacher else None,
        make_student=make_student,
        make_assistant=make_assistant,
        make_noise=lambda strength: [RandomShift(1, fill=-1.0), GaussianNoise(strength)],
        load_student=AutoModelForImageClassification.from_pretrained,
        train_dataset=transfer,
        processing_class=processor,
        compute_metrics=compute_metrics,
        **({"eval_dataset": validation} if validation is not None else {}),
    )
    trainer, stages = result.trainer, result.stages
    student = trainer.student

    # ---- results on the held-out test split ----
    title = (
        f"digits, test split of {len(test)} images, {steps} steps, losses {trainer.args.losses}, "
        f"temperature {args.temperature}, seed {args.seed}, scheme {scheme.name}"
        + (
            f", teachers combined by {args.teacher_aggregation}"
            if len(teachers) > 1 and scheme.name != "amalgamation"
            else ""
        )
        + (f", graph searched on {len(validation)} held-out training images" if validation is not None else "")
    )
    distilled = f"student distilled ({len(labeled)} labels + {len(transfer) - len(labeled)} unlabeled)"
    rows = {distilled: student}
    if recipe.baselines:
        if teacher_paths:
            teacher_rows = {f"teacher {path}": model for path, model in zip(teacher_paths, teachers)}
        else:
            name = f"teacher (ViT {recipe.teacher_layers}×{recipe.teacher_hidden_size}, all {len(train)} labels)"
            teacher_rows = {name: teacher}
        if scheme.name == "amalgamation":
            teacher_rows = {f"{row}, on the images of its own classes": model for row, model in teacher_rows.items()}
        rows = {
            **teacher_rows,
            f"student from scratch ({len(labeled)} labels)": scratch,
            **stage_rows(stages),
            **rows,
        }
    row_datasets = None
    if scheme.name == "amalgamation" and recipe.baselines:  # each teacher on the test images of its own classes
        names = dataset.features["labels"].names
        row_datasets = {row: own_class_rows(test, model, names) for row, model in teacher_rows.items()}
    _, comparison = compare_recipe_models(
        trainer, test, rows, title=title, data_collator=None, output_dir=args.output_dir, row_datasets=row_datasets
    )

    # ---- save (and with --push_to_hub share) the student: weights, processor, distillation_config.json, card ----
    if args.push_to_hub:
        trainer.set_model_card_details(
            comparison=comparison,
            eval_examples=len(test),
            dataset=None if recipe.dataset_name == "digits" else recipe.dataset_name,
            dataset_description=f"{recipe.dataset_name}: {len(labeled)} labeled + {len(transfer) - len(labeled)} "
            f"unlabeled training images; evaluated on a held-out split of {len(test)}",
        )
    trainer.save_model(os.path.join(args.output_dir, "student"))  # Trainer semantics: pushes with --push_to_hub


if __name__ == "__main__":
    main()
    leave_process_group()
