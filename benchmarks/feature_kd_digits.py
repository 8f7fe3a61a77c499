"""Feature knowledge with a student large enough to use it (issue 29 item 4): the knowledge table's digits set-up
(``knowledge_table.py``: 100 labeled training images + the other 1,337 unlabeled, teacher ViT 4×64 trained on all
1,437 training labels, α = 0.5, τ = 2, 800 steps of batch 64) with a student of the teacher's width, ViT 2×64
(102k parameters, 26× the table's 3.9k-parameter ViT 1×16), so no feature has to be squeezed through a 16-wide
student. Rows: scratch (the 100 labels only), ``kl``, and ``kl`` + each feature loss at its paper weight: CRD
(Tian et al. 2020's CRD + KD: weight 0.8, as many negatives drawn at random as the banks have rows),
``hidden_mse`` (uniform map), ``hint`` and ``hidden_cosine`` (last layer). Same seeds (student initialisation and
data order) across rows.

    flock /tmp/heavy.lock env OMP_NUM_THREADS=1 python benchmarks/feature_kd_digits.py --seeds 0 1 2
    python benchmarks/feature_kd_digits.py --seeds 0 --steps 20 --teacher_steps 20        # smoke
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from knowledge_table import accuracy, arguments, digits_splits, train_teacher, vit
from schemes_digits import write_table
from transformers import Trainer, TrainingArguments, ViTForImageClassification

from hf_kd import DistillationConfig, DistillationTrainer

METHODS = {
    "kl": [{"name": "kl"}],
    "kl + crd": [{"name": "kl"}, {"name": "crd"}],
    "kl + hidden_mse": [{"name": "hidden_mse"}, {"name": "kl"}],
    "kl + hint": [{"name": "hint"}, {"name": "kl"}],
    "kl + hidden_cosine": [{"name": "hidden_cosine"}, {"name": "kl"}],
}


def run(method: str, seed: int, options, teacher_path: str) -> tuple[float, float]:
    """One student: ``method`` at ``seed`` → (test accuracy, ms per step)."""
    _, labeled, transfer, test = digits_splits()
    torch.manual_seed(seed)
    student = vit(options.width, options.layers)
    with tempfile.TemporaryDirectory() as output_dir:
        if method == "scratch":
            args = TrainingArguments(**arguments(output_dir, seed, options.steps))
            trainer = Trainer(model=student, train_dataset=labeled, args=args)
        else:
            args = DistillationConfig(
                **arguments(output_dir, seed, options.steps, alpha=0.5, temperature=2.0, losses=METHODS[method])
            )
            teacher = ViTForImageClassification.from_pretrained(teacher_path)
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=transfer)
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    return accuracy(student, test), 1000 * elapsed / options.steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--teacher_steps", type=int, default=800)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["scratch", *METHODS], choices=["scratch", *METHODS])
    parser.add_argument("--output", default="outputs/feature_kd_digits.md")
    options = parser.parse_args()
    torch.set_num_threads(1)
    teacher_path = tempfile.mkdtemp(prefix="hf_kd_teacher_")
    teacher_accuracy = train_teacher(teacher_path, options.teacher_steps)
    results: dict[str, list[tuple[float, float]]] = {}
    for seed in options.seeds:
        for method in options.methods:
            score, ms = run(method, seed, options, teacher_path)
            results.setdefault(method, []).append((score, ms))
            print(f"seed {seed}: {method}: {score:.4f} ({ms:.0f} ms/step)", flush=True)
    parameters = sum(p.numel() for p in vit(options.width, options.layers).parameters())
    lines = [
        f"Digits, student ViT {options.layers}×{options.width} ({parameters / 1000:.0f}k parameters), teacher ViT "
        f"4×64 ({100 * teacher_accuracy:.1f}% test accuracy), 100 labels + 1,337 unlabeled, {options.steps} steps "
        f"of batch 64, seeds {options.seeds}; test accuracy (%).",
        "",
        "| student | mean ± std | per seed | ms/step |",
        "|---|---:|---|---:|",
    ]
    for method, values in results.items():
        scores = [100 * score for score, _ in values]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        per_seed = " / ".join(f"{score:.1f}" for score in scores)
        ms = statistics.mean(ms for _, ms in values)
        lines.append(f"| {method} | {statistics.mean(scores):.1f} ± {spread:.1f} | {per_seed} | {ms:.0f} |")
    write_table("\n".join(lines), options.output)


if __name__ == "__main__":
    main()
