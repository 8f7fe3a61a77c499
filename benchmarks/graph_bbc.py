"""A searched distillation graph of three nodes against the schemes it contains, on real news (BBC News, 2,225
articles, 5 topics), over several seeds — the BBC twin of ``graph_digits.py`` (Minami et al. 2020, *Knowledge
Transfer Graph*: a searched graph matches or beats offline KD and mutual learning).

Per seed, the text recipe's split (445 held-out test articles, stratified), the articles cut at --max_length tokens
by MiniLM's tokenizer (--tokenizer: only its files are read, no pretrained weight); 15% of the 1,780 training articles
(267, with labels) held out as the validation set the graph search compares its trials on (no other run reads them);
of the remaining 1,513, --num_labeled keep their labels and the rest are unlabeled. The teacher: a BERT 4×256 trained
from scratch (--teacher_steps) on every label of those 1,513 articles. The student: the text recipe's BERT 2×128;
the peer: a BERT 2×192. Every student run takes the same --steps, seed and initialisation, CE + KL (τ = 2, α = 0.5):

- scratch: the student on its labels alone;
- offline KD: teacher → student;
- mutual learning: student ⇄ peer (deep mutual learning, no teacher);
- the graph of all four edges (teacher → student, teacher → peer, peer → student, student → peer), every gate
  ``through``, every loss ``kl`` (offline KD and mutual learning at once);
- the searched graph: the same nodes and edges, each edge's gate (through, cutoff, linear_up, linear_down, correct)
  and loss (kl, jsd) chosen by ``hf_kd.schemes.graph_search.search_graph`` (Optuna TPE, --trials trials, the
  student's validation accuracy), then the best graph trained again (the same seed reproduces its trial).

Training and evaluation run on the accelerator when there is one (the Trainer's choice). Prints the test accuracy
of the student (and the peer where there is one) per seed and as mean ± std, writes the table to
--output_dir/graph_bbc.md (raw values to .json) and each seed's searched graph to
--output_dir/seedN/searched_graph.yaml.

    python benchmarks/graph_bbc.py --seeds 0 1 2 --steps 300 --teacher_steps 400 --trials 8
    # one process per seed, the BBC articles and the tokenizer's files read from local folders
    python benchmarks/graph_bbc.py --seeds 1 --data_dir data/bbc --tokenizer data/minilm --output_dir out/graph_bbc_s1
"""

from __future__ import annotations

import argparse
import os

from graph_digits import compare_schemes, searched_graph_rows
from mutual_learning_cost import bert
from schemes_bbc import BBC_TRAINING, bbc_splits
from schemes_digits import load_recipe, recorder, sweep
from transformers import DataCollatorWithPadding

from hf_kd import DistillationConfig, TeacherCache, write_teacher_cache
from hf_kd.data import add_sample_index, split_labeled_transfer
from hf_kd.evaluation import evaluate_model
from hf_kd.metrics import classification_metrics
from hf_kd.recipe_support.baselines import train_plainly

TEACHER = (256, 4)  # hidden size, layers (heads: hidden / 64)
NODES = {"student": (128, 2), "peer": (192, 2)}
# BBC_TRAINING with the accelerator allowed: the Trainer picks it when there is one.
TRAINING = {**BBC_TRAINING, "use_cpu": False}


def run_seed(seed: int, options, module, scores: dict[str, list[float]]) -> None:
    folder = os.path.join(options.output_dir, f"seed{seed}")
    _, splits, tokenizer, tokenize = bbc_splits(
        module, options.output_dir, seed, options.max_length, options.tokenizer, options.data_dir
    )
    held = splits["train"].train_test_split(test_size=0.15, stratify_by_column="labels", seed=seed)
    labeled, transfer = split_labeled_transfer(held["train"], options.num_labeled, seed=seed)
    train, validation, test = tokenize(held["train"]), tokenize(held["test"]), tokenize(splits["test"])
    labeled, transfer = tokenize(labeled), tokenize(transfer)
    collator = DataCollatorWithPadding(tokenizer)
    args = DistillationConfig(
        output_dir=folder,
        max_steps=options.steps,
        seed=seed,
        losses="kl",
        temperature=2.0,
        alpha=0.5,
        logging_steps=50,
        **TRAINING,
    )
    record = recorder(scores, seed)

    def model(hidden: int, layers: int, init_seed: int):
        return bert(hidden, layers, len(tokenizer), options.max_length, init_seed)

    def node(name: str):  # every run's student (and peer) starts from the same weights
        return model(*NODES[name], seed * 10 + list(NODES).index(name))

    def accuracy(trained):
        return evaluate_model(trained, test, compute_metrics=classification_metrics, data_collator=collator)["accuracy"]

    cache_folder = f"{folder}/teacher_cache"
    if options.search_only:  # the teacher trained and cached by a full run of this seed in this folder
        if not os.path.exists(f"{cache_folder}/manifest.json"):
            raise SystemExit(f"--search_only reads the teacher's cache {cache_folder}: run this seed in full first.")
        common = dict(train_dataset=add_sample_index(transfer), data_collator=collator)
        teacher = TeacherCache.load(cache_folder)
        searched_graph_rows(teacher, node, args, folder, options.trials, validation, record, accuracy, **common)
        return
    teacher = model(*TEACHER, seed)
    train_plainly(
        teacher,
        args,
        train,
        output_dir=f"{folder}/teacher",
        data_collator=collator,
        max_steps=options.teacher_steps,
    )
    teacher.eval()
    record("teacher BERT 4×256 (every label)", accuracy(teacher))
    # The teacher is frozen and in evaluation mode, so its outputs on the transfer rows are fixed: run it once and
    # replay them (every class kept, float32: the same loss and gradients as the live teacher, tested in
    # tests/test_graph.py) instead of once per step of the 11 runs that read it.
    transfer = add_sample_index(transfer)
    write_teacher_cache(
        teacher,
        transfer,
        cache_folder,
        top_k=teacher.config.num_labels,
        dtype="float32",
        tokenizer=tokenizer,
        data_collator=collator,
        batch_size=64,
        progress=False,
    )
    teacher = TeacherCache.load(cache_folder)
    scratch = train_plainly(node("student"), args, labeled, output_dir=f"{folder}/scratch", data_collator=collator)
    record("scratch: student", accuracy(scratch))
    compare_schemes(
        teacher,
        node,
        args,
        folder,
        options.trials,
        validation,
        record,
        accuracy,
        train_dataset=transfer,
        data_collator=collator,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_labeled", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps of every student run and trial.")
    parser.add_argument("--teacher_steps", type=int, default=400)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128, help="Tokens kept of each article.")
    parser.add_argument(
        "--tokenizer", default=None, help="A folder with MiniLM's tokenizer files (default: the packaged MiniLM's)."
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        help="Where the articles are exported to (bbcnews.jsonl) and read from (default: OUTPUT_DIR/data).",
    )
    parser.add_argument("--output_dir", default="outputs/graph_bbc")
    parser.add_argument(
        "--search_only",
        action="store_true",
        help="Only the searched graph's rows, from the teacher cache a full run of each seed left in --output_dir.",
    )
    options = parser.parse_args()
    module = load_recipe("text_classification")
    sweep(
        options,
        lambda seed, scores: run_seed(seed, options, module, scores),
        lambda seeds: (
            f"BBC News, held-out 20% (445 articles), {options.max_length} tokens each, {options.num_labeled} labels "
            f"+ the other training articles unlabeled (15% of the training split held out for the search's "
            f"validation), teacher BERT 4×256 from scratch {options.teacher_steps} steps on every label, "
            f"{options.steps} steps per run, graph search {options.trials} trials, seeds {seeds}"
        ),
        "graph_bbc",
    )


if __name__ == "__main__":
    main()
