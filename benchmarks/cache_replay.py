"""Distillation replayed from an offline teacher cache vs plain fine-tuning: step time side by side, and storage.

The same GPT-2-style student and batches as ``kd_step_cost.py``. The teacher runs once over the batches
(``write_teacher_cache``), is deleted, and ``DistillationTrainer`` trains from the cache (CE + KL). The script times
``training_step`` (median over repeats) for plain fine-tuning, cache replay (top-k and importance-sampled) and
live distillation, and reports bytes per cached token.

    python benchmarks/cache_replay.py                    # ~1 min on 2 CPU cores
    python benchmarks/cache_replay.py --student_layers 4 --student_width 512   # a student less dominated by V
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import torch
from datasets import Dataset
from kd_step_cost import gpt2, interleaved_step_times
from transformers import Trainer

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.cache import write_teacher_cache
from hf_kd.data import SAMPLE_INDEX, add_sample_index
from hf_kd.plots import plot_bars


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student_layers", type=int, default=2)
    parser.add_argument("--student_width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--plot", default="outputs/benchmarks/cache_replay.png", help="Where to draw the ratios.")
    options = parser.parse_args()

    student = gpt2(options.student_layers, options.student_width, options.vocab, options.length, seed=0)
    teacher = gpt2(6, 512, options.vocab, options.length, seed=1)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, options.vocab, (options.batch, options.length), generator=generator)
    data = add_sample_index(Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}))
    batch = {"input_ids": ids, "labels": ids.clone(), SAMPLE_INDEX: torch.arange(options.batch)}
    tokens = options.batch * (options.length - 1)  # cached positions: every supervised next-token prediction

    with tempfile.TemporaryDirectory() as folder:
        args = DistillationConfig(output_dir=folder, use_cpu=True, report_to=[], losses="kl", alpha=0.5)
        plain_batch = {key: batch[key] for key in ("input_ids", "labels")}
        steps = {
            "plain fine-tuning (CE)": (Trainer(model=student, args=args), plain_batch),
            "live teacher (CE + KL)": (
                DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data),
                batch,
            ),
        }
        storage = {}
        for mode in ("top_k", "sampled"):
            path = os.path.join(folder, mode)
            cache = write_teacher_cache(teacher, data, path, top_k=options.top_k, mode=mode, progress=False)
            name = f"cache replay, {mode} k={options.top_k} (CE + KL)"
            storage[name] = sum(
                os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")
            )
            # A sampled cache is unbiased for kl at temperature 1 only.
            mode_args = args if mode == "top_k" else dataclasses.replace(args, temperature=1.0)
            steps[name] = (
                DistillationTrainer(model=student, teacher_model=cache, args=mode_args, train_dataset=data),
                batch,
            )
        times = interleaved_step_times(steps, options.repeats)

    print(
        f"student GPT-2 {options.student_layers}×{options.student_width}, teacher 6×512, vocab {options.vocab:,}, "
        f"batch {options.batch} × {options.length} tokens, fp32, 2 CPU threads; fp16 log-probs + int32 ids\n"
    )
    print("| step | s / step | ratio to plain | storage bytes / token |")
    print("|---|---:|---:|---:|")
    plain_time = times["plain fine-tuning (CE)"]
    for name, seconds in times.items():
        per_token = f"{storage[name] / tokens:.0f}" if name in storage else "–"
        print(f"| {name} | {seconds:.3f} | {seconds / plain_time:.2f} | {per_token} |")
    ratios = {name: seconds / plain_time for name, seconds in times.items()}
    plot_bars(ratios, options.plot, xlabel="s per step / plain fine-tuning", reference=1.0, title="cache replay")
    print(f"\npicture: {options.plot}")


if __name__ == "__main__":
    main()
