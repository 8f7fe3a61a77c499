"""What the mean teacher's EMA update costs against the step it follows, side by side in one run.

A GPT-2-style causal-LM student (its EMA copy is the teacher) on one batch: the median time of the update
``θ_T ← d·θ_T + (1 − d)·θ_S`` (``EMATeacher.update``: two ``torch._foreach`` ops over every parameter) and of a
mean-teacher ``training_step`` (student forward and backward, the teacher's forward, CE + consistency), the two
taking turns. The training step leaves out the optimizer step, so the ratio overstates the update's share of a
whole optimizer step.

    python benchmarks/mean_teacher_cost.py            # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from kd_step_cost import gpt2

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.evaluation import count_parameters
from hf_kd.plots import plot_bars
from hf_kd.schemes.mean_teacher import EMATeacher


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--plot", default="outputs/benchmarks/mean_teacher_cost.png", help="Where to draw the ratios.")
    options = parser.parse_args()

    student = gpt2(options.layers, options.width, options.vocab, options.length, seed=0)
    ids = torch.randint(0, options.vocab, (options.batch, options.length), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    batch = {"input_ids": ids, "labels": ids.clone()}
    with tempfile.TemporaryDirectory() as folder:
        args = DistillationConfig(output_dir=folder, use_cpu=True, report_to=[], losses="logit_mse")
        teacher = EMATeacher(student, decay=0.999)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
        trainer.model.train()
        steps, updates = [], []
        for repeat in range(options.repeats + 2):  # the first two rounds warm up
            start = time.perf_counter()
            trainer.training_step(trainer.model, dict(batch))
            middle = time.perf_counter()
            teacher.update(repeat + 1)
            end = time.perf_counter()
            trainer.model.zero_grad()
            if repeat >= 2:
                steps.append(middle - start)
                updates.append(end - middle)
    step, update = statistics.median(steps), statistics.median(updates)
    print(
        f"student GPT-2 {options.layers}×{options.width} ({count_parameters(student) / 1e6:.1f}M parameters), "
        f"vocab {options.vocab:,}, batch {options.batch} × {options.length} tokens, fp32, "
        f"{torch.get_num_threads()} CPU threads, median of {options.repeats}\n"
    )
    print("| | s | share of the training step |")
    print("|---|---:|---:|")
    print(f"| mean-teacher training_step (no optimizer step) | {step:.4f} | 100% |")
    print(f"| EMA update (`EMATeacher.update`) | {update:.4f} | {100 * update / step:.2f}% |")
    shares = {"mean-teacher training_step": 1.0, "EMA update": update / step}
    plot_bars(shares, options.plot, xlabel="share of the training step", title="the mean teacher's EMA update")
    print(f"\npicture: {options.plot}")


if __name__ == "__main__":
    main()
