"""What a distillation step costs over plain fine-tuning of the same student: time and FLOPs, side by side.

One GPT-2-style causal-LM student and a teacher several times larger, the same batches. For each step kind —
plain fine-tuning (label loss only) and distillation (label loss + KL to the teacher) — the script times
``training_step`` (median over repeats, the two kinds taking turns) and counts FLOPs with
``torch.utils.flop_counter.FlopCounterMode``. With a frozen teacher the extra work is one teacher forward, so the
ideal ratio is 1 + F_teacher_fwd / F_student_step (≈ 1 + N_teacher / (3·N_student)); a teacher backward would add
twice its forward again.

    python benchmarks/kd_step_cost.py                 # ~2 min on 2 CPU cores
    python benchmarks/kd_step_cost.py --teacher_layers 12 --teacher_width 768 --batch 8 --length 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, Trainer

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.plots import plot_bars


def gpt2(layers: int, width: int, vocab: int, length: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
        n_positions=length,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "wte" not in name and "wpe" not in name)


def interleaved_step_times(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds of ``training_step`` per named ``(trainer, batch)``, the kinds taking turns step by step so
    that machine drift (clock, other load) affects them alike."""
    times = {name: [] for name in steps}
    for trainer, _ in steps.values():
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
        trainer.model.train()
    for repeat in range(repeats + 2):  # the first two rounds warm up
        for name, (trainer, batch) in steps.items():
            start = time.perf_counter()
            trainer.training_step(trainer.model, batch)
            if repeat >= 2:
                times[name].append(time.perf_counter() - start)
            trainer.model.zero_grad()
    return {name: statistics.median(values) for name, values in times.items()}


def step_flops(trainer, batch) -> float:
    with FlopCounterMode(display=False) as counter:
        trainer.training_step(trainer.model, batch)
    trainer.model.zero_grad()
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student_layers", type=int, default=2)
    parser.add_argument("--student_width", type=int, default=256)
    parser.add_argument("--teacher_layers", type=int, default=6)
    parser.add_argument("--teacher_width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--plot", default="outputs/benchmarks/kd_step_cost.png", help="Where to draw the ratios.")
    options = parser.parse_args()

    student = gpt2(options.student_layers, options.student_width, options.vocab, options.length, seed=0)
    teacher = gpt2(options.teacher_layers, options.teacher_width, options.vocab, options.length, seed=1)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, options.vocab, (options.batch, options.length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    with tempfile.TemporaryDirectory() as output_dir:
        args = DistillationConfig(output_dir=output_dir, use_cpu=True, report_to=[], losses="kl", alpha=0.5)
        plain = Trainer(model=student, args=args)
        distill = DistillationTrainer(model=student, teacher_model=teacher, args=args)
        times = interleaved_step_times({"plain": (plain, batch), "kd": (distill, batch)}, options.repeats)
        plain_time, kd_time = times["plain"], times["kd"]
        plain_flops, kd_flops = step_flops(plain, batch), step_flops(distill, batch)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            teacher(input_ids=ids, attention_mask=batch["attention_mask"])
        teacher_forward = counter.get_total_flops()

    n_student, n_teacher = non_embedding_parameters(student), non_embedding_parameters(teacher)
    ideal_flops = 1 + teacher_forward / plain_flops
    print(
        f"student {n_student / 1e6:.2f}M / teacher {n_teacher / 1e6:.2f}M non-embedding parameters, "
        f"vocab {options.vocab:,}, batch {options.batch} × {options.length} tokens, fp32, 2 CPU threads\n"
    )
    print("| | plain fine-tuning | distillation (CE + KL) | ratio | ideal | ratio / ideal |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| step time (s) | {plain_time:.3f} | {kd_time:.3f} | {kd_time / plain_time:.2f} | "
        f"{ideal_flops:.2f} | {kd_time / plain_time / ideal_flops:.2f} |"
    )
    print(
        f"| step GFLOPs | {plain_flops / 1e9:.2f} | {kd_flops / 1e9:.2f} | {kd_flops / plain_flops:.2f} | "
        f"{ideal_flops:.2f} | {kd_flops / plain_flops / ideal_flops:.2f} |"
    )
    extra = kd_flops - plain_flops
    print(
        f"\nextra FLOPs of distillation = {extra / teacher_forward:.2f} × one teacher forward "
        f"(a teacher backward would make it ≈ 3); 1 + N_teacher / (3·N_student) = "
        f"{1 + n_teacher / (3 * n_student):.2f}"
    )
    ratios = {"step time": kd_time / plain_time, "step FLOPs": kd_flops / plain_flops, "ideal (FLOPs)": ideal_flops}
    plot_bars(ratios, options.plot, xlabel="distillation / plain fine-tuning", reference=1.0, title="a KD step")
    print(f"\npicture: {options.plot}")


if __name__ == "__main__":
    main()
