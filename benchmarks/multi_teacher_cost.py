"""Several teachers: what K teachers add to a distillation step, side by side in one run.

Live teachers: the FLOPs of a step with K teachers minus those of plain fine-tuning, divided by one teacher's forward
(``torch.utils.flop_counter``): K exactly means the ensemble adds nothing but the K forwards. Cached teachers
(``write_teacher_cache``, top-k rows): step time relative to plain fine-tuning for K = 1, 2, 3, the kinds timed in
turns (``kd_step_cost.interleaved_step_times``). The same GPT-2-style student and batches as ``kd_step_cost.py``.

    python benchmarks/multi_teacher_cost.py           # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from datasets import Dataset
from kd_step_cost import gpt2, interleaved_step_times, step_flops
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.cache import write_teacher_cache
from hf_kd.data import SAMPLE_INDEX, add_sample_index
from hf_kd.plots import plot_bars


def ready(trainer):
    """A trainer whose ``training_step`` can be called outside ``train()`` (which would set these)."""
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student_layers", type=int, default=4)
    parser.add_argument("--student_width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--aggregation", default="mean_probs")
    parser.add_argument("--plot", default="outputs/benchmarks/multi_teacher_cost.png", help="Where to draw the ratios.")
    options = parser.parse_args()

    student = gpt2(options.student_layers, options.student_width, options.vocab, options.length, seed=0)
    teachers = [gpt2(6, 512, options.vocab, options.length, seed=seed) for seed in (1, 2, 3)]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, options.vocab, (options.batch, options.length), generator=generator)
    data = add_sample_index(Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}))
    batch = {"input_ids": ids, "labels": ids.clone(), SAMPLE_INDEX: torch.arange(options.batch)}
    plain_batch = {key: batch[key] for key in ("input_ids", "labels")}

    with tempfile.TemporaryDirectory() as folder:
        args = DistillationConfig(
            output_dir=folder,
            use_cpu=True,
            report_to=[],
            losses="kl",
            alpha=0.5,
            teacher_aggregation=options.aggregation,
        )
        plain = ready(Trainer(model=student, args=args))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            teachers[0](input_ids=ids)
        teacher_forward = counter.get_total_flops()
        plain_flops = step_flops(plain, plain_batch)
        live_rows = {}
        for count in (1, 2, 3):
            trainer = ready(
                DistillationTrainer(model=student, teacher_model=teachers[:count], args=args, train_dataset=data)
            )
            live_rows[count] = (step_flops(trainer, batch) - plain_flops) / teacher_forward
        caches = [
            write_teacher_cache(teacher, data, os.path.join(folder, f"cache{i}"), top_k=options.top_k, progress=False)
            for i, teacher in enumerate(teachers)
        ]
        steps = {"plain fine-tuning (CE)": (plain, plain_batch)}
        for count in (1, 2, 3):
            trainer = DistillationTrainer(model=student, teacher_model=caches[:count], args=args, train_dataset=data)
            steps[f"{count} cached teacher{'s' if count > 1 else ''} (CE + KL)"] = (trainer, batch)
        times = interleaved_step_times(steps, options.repeats)

    print(
        f"student GPT-2 {options.student_layers}×{options.student_width}, teachers 6×512, vocab {options.vocab:,}, "
        f"batch {options.batch} × {options.length} tokens, fp32, 2 CPU threads, aggregation {options.aggregation}\n"
    )
    print("| live teachers K | extra step FLOPs / one teacher forward |")
    print("|---:|---:|")
    for count, ratio in live_rows.items():
        print(f"| {count} | {ratio:.3f} |")
    print("\n| step | s / step | ratio to plain |")
    print("|---|---:|---:|")
    plain_time = times["plain fine-tuning (CE)"]
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} | {seconds / plain_time:.2f} |")
    ratios = {name: seconds / plain_time for name, seconds in times.items()}
    plot_bars(ratios, options.plot, xlabel="s per step / plain fine-tuning", reference=1.0, title="K teachers")
    print(f"\npicture: {options.plot}")


if __name__ == "__main__":
    main()
