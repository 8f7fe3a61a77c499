"""Distil a regression model: a wide MLP teacher into a small MLP student, on real clinical data.

scikit-learn's diabetes data (442 patients, 10 standardised measurements; the target, disease progression one year
later, standardised here so that an MSE of 1 is the score of always predicting the mean) is exported once to a
local JSON file and read back with load_dataset. The teacher is trained on every training target (or loaded with
--teacher); the students see only --num_labeled targets, the distilled one also the other training rows without a
target (NaN). The script prints (and saves to OUTPUT_DIR/results.md) test-split MSE and MAE of the teacher, the
student trained from scratch with the same steps and seed, and the distilled student.

    python recipes/regression.py --config recipes/configs/regression.yaml                  # ~1 min
    python recipes/regression.py --config recipes/configs/regression.yaml \
        --losses teacher_bounded:1.0:margin=0.1 --output_dir outputs/diabetes-bounded
    python recipes/regression.py --config recipes/configs/regression.yaml --scheme born_again --generations 2
    accelerate launch recipes/regression.py --teacher outputs/diabetes/teacher --output_dir outputs/d2

The models are ``TabularMLPForSequenceClassification`` (below): a transformers ``PreTrainedModel`` over a vector
of features, with the regression head transformers uses (``num_labels=1``, ``problem_type="regression"``), so that
``save_pretrained`` / ``from_pretrained`` and every Trainer feature work as for any transformers model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import load_dataset
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, set_seed
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_kd import DistillationConfig
from hf_kd.data import split_labeled_transfer
from hf_kd.evaluation import REGRESSION_COLUMNS
from hf_kd.metrics import regression_metrics
from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_plainly, train_teacher
from hf_kd.recipe_support.cli import check_recipe_engine, leave_process_group
from hf_kd.recipe_support.schemes import parse_recipe_args, stage_rows
from hf_kd.recipe_support.tables import compare_recipe_models
from hf_kd.schemes import run_scheme


class TabularMLPConfig(PretrainedConfig):
    model_type = "hf_kd_tabular_mlp"

    def __init__(self, num_features: int = 10, hidden_sizes=(64, 64), dropout: float = 0.0, **kwargs):
        kwargs.setdefault("num_labels", 1)
        kwargs.setdefault("problem_type", "regression")
        super().__init__(**kwargs)
        self.num_features, self.hidden_sizes, self.dropout = num_features, list(hidden_sizes), dropout


class TabularMLPForSequenceClassification(PreTrainedModel):
    """An MLP over one feature vector per example (``features``), with transformers' regression head: ``logits``
    of width ``num_labels`` and, given ``labels``, their MSE."""

    config_class = TabularMLPConfig
    base_model_prefix = "mlp"

    def __init__(self, config: TabularMLPConfig):
        super().__init__(config)
        widths = [config.num_features, *config.hidden_sizes]
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.GELU(), nn.Dropout(config.dropout)) for a, b in zip(widths, widths[1:])
        )
        self.head = nn.Linear(widths[-1], config.num_labels)
        self.post_init()

    def forward(self, features=None, labels=None, **kwargs):
        hidden = features
        for layer in self.layers:
            hidden = layer(hidden)
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.mse_loss(logits.reshape(labels.shape).float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits)


@dataclass
class RegressionRecipeArguments:
    test_fraction: float = field(default=0.2)
    num_labeled: int = field(default=50, metadata={"help": "Training targets the students may use."})
    teacher: str | None = field(default=None, metadata={"help": "A trained teacher; default: train one here."})
    teacher_steps: int = field(default=300)
    teacher_hidden: int = field(default=256)
    teacher_layers: int = field(default=2)
    student_hidden: int = field(default=8)
    student_layers: int = field(default=1)


def load_diabetes_dataset(cache_dir: str):
    """scikit-learn's diabetes data as rows ``{"features": [10 floats], "labels": float}``, the target
    standardised (mean 0, std 1), through a local JSON file and load_dataset."""
    path = os.path.join(cache_dir, "diabetes.jsonl")
    if not os.path.exists(path):
        from sklearn.datasets import load_diabetes

        data = load_diabetes()
        target = (data.target - data.target.mean()) / data.target.std()
        os.makedirs(cache_dir, exist_ok=True)
        with open(path, "w") as handle:
            for row, value in zip(data.data, target):
                handle.write(json.dumps({"features": [float(x) * 20 for x in row], "labels": float(value)}) + "\n")
    return load_dataset("json", data_files=path, split="train")


def mlp(hidden: int, layers: int) -> TabularMLPForSequenceClassification:
    return TabularMLPForSequenceClassification(TabularMLPConfig(hidden_sizes=[hidden] * layers))


def main():
    recipe, choice, scheme, args = parse_recipe_args(RegressionRecipeArguments, DistillationConfig)
    teacher_paths = choice.teacher_paths(recipe.teacher)
    check_recipe_engine(args, baselines=True, teacher=",".join(teacher_paths))
    set_seed(args.seed)

    # ---- data: the features (×20: scikit-learn scales each column to unit norm) and a standardised target ----
    with args.main_process_first(desc="export the data"):
        dataset = load_diabetes_dataset(os.path.join(args.output_dir, "data")).with_format("torch")
    splits = dataset.train_test_split(test_size=recipe.test_fraction, seed=args.seed)
    train, test = splits["train"], splits["test"]
    labeled, transfer = split_labeled_transfer(train.with_format(None), recipe.num_labeled, seed=args.seed)
    labeled, transfer = labeled.with_format("torch"), transfer.with_format("torch")
    steps = optimizer_steps(args, len(transfer))
    baseline_args = plain_args(args, steps)

    # ---- teachers: loaded, or one trained on every training target ----
    if teacher_paths:
        teachers = [TabularMLPForSequenceClassification.from_pretrained(path) for path in teacher_paths]
    else:
        teachers = [mlp(recipe.teacher_hidden, recipe.teacher_layers)]
        train_teacher(teachers[0], baseline_args, train, steps=recipe.teacher_steps)
    teacher = teachers[0] if len(teachers) == 1 else teachers

    # ---- students: from scratch on the labeled rows vs distilled on labeled + unlabeled, same steps/seed ----
    def make_student(generation: int) -> TabularMLPForSequenceClassification:
        set_seed(args.seed + generation - 1)
        return mlp(recipe.student_hidden, recipe.student_layers)

    def make_assistant(hidden_size: int | None, layers: int | None) -> TabularMLPForSequenceClassification:
        set_seed(args.seed)
        return mlp(
            hidden_size or int(np.sqrt(recipe.teacher_hidden * recipe.student_hidden)), layers or recipe.teacher_layers
        )

    scratch = make_student(1)
    train_plainly(scratch, baseline_args, labeled, output_dir=os.path.join(args.output_dir, "scratch"))
    result = run_scheme(
        scheme,
        args,
        teacher=teacher if choice.takes_teacher else None,
        make_student=make_student,
        make_assistant=make_assistant,
        load_student=TabularMLPForSequenceClassification.from_pretrained,
        train_dataset=transfer,
        compute_metrics=regression_metrics,
    )
    trainer, stages = result.trainer, result.stages

    # ---- results on the held-out test split ----
    title = (
        f"diabetes, test split of {len(test)} patients (standardised target: MSE 1 = predicting the mean), {steps} "
        f"steps, losses {trainer.args.losses}, seed {args.seed}, scheme {scheme.name}"
    )
    labeled_rows = int(torch.isfinite(transfer[:]["labels"]).sum())
    if teacher_paths:
        teacher_rows = {f"teacher {path}": model for path, model in zip(teacher_paths, teachers)}
    else:
        teacher_rows = {f"teacher (MLP {recipe.teacher_layers}×{recipe.teacher_hidden}, all targets)": teachers[0]}
    rows = {
        **teacher_rows,
        f"student from scratch ({len(labeled)} targets)": scratch,
        **stage_rows(stages),
        f"student distilled ({labeled_rows} targets + {len(transfer) - labeled_rows} unlabeled)": trainer.student,
    }
    _, comparison = compare_recipe_models(trainer, test, rows, title=title, metrics=REGRESSION_COLUMNS)
    if args.push_to_hub:
        trainer.set_model_card_details(
            comparison=comparison,
            eval_examples=len(test),
            dataset_description=f"scikit-learn's diabetes: {labeled_rows} labeled + "
            f"{len(transfer) - labeled_rows} unlabeled training rows; evaluated on a held-out split of {len(test)}",
        )
    trainer.save_model(os.path.join(args.output_dir, "student"))


if __name__ == "__main__":
    main()
    leave_process_group()
