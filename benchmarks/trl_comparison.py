"""hf_kd vs TRL's DistillationTrainer on the same loss step: value, step time and peak memory side by side, one run.

TRL 1.16's stable ``trl.DistillationTrainer`` (generalized JSD, on-policy: every step first generates completions,
then computes its chunked JSD loss from both models' hidden states) against hf_kd's ``DistillationTrainer`` with
``losses="jsd:1.0:beta=…"`` and no label loss, plain and with ``chunk_size``. The generation is left out (it is random
and has nothing to do with the loss): every trainer gets the same prompt + completion batch, TRL as the inputs its
``compute_loss`` receives after generation (``prompt_ids``/``completion_ids``), hf_kd as rows whose labels mask the
prompt, so both compute the JSD over the completion tokens. Same GPT-2-style student and teacher, same process. Time
is the median of ``compute_loss`` + ``backward`` with the trainers taking turns; peak memory is the allocation
profiler's peak of live bytes during one such step (as in ``chunked_kd_memory.py``).

    pip install -c constraints/cpu.txt trl==1.16.0    # only the benchmarks need it
    python benchmarks/trl_comparison.py               # vocab 8k (~1 min on 2 CPU cores)
    python benchmarks/trl_comparison.py --vocab 32000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from chunked_kd_memory import peak_bytes
from datasets import Dataset
from kd_step_cost import gpt2
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.plots import plot_bars

try:
    import trl
except ImportError as error:  # a benchmark-only dependency
    raise SystemExit(f"this benchmark compares against TRL: pip install -c constraints/cpu.txt trl ({error})") from None

TRL = "TRL DistillationTrainer"


def loss_step(trainer, student, batch):
    """One ``compute_loss`` + ``backward`` from zeroed gradients; the loss."""
    student.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    return loss.detach()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row (no loss on them)")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--chunk_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--plot", default="outputs/benchmarks/trl_comparison.png", help="Where to draw the ratios.")
    options = parser.parse_args()

    student = gpt2(2, 256, options.vocab, options.length, seed=0)
    teacher = gpt2(6, 512, options.vocab, options.length, seed=1)
    student.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, options.vocab, (options.batch, options.length), generator=generator)
    labels = ids.clone()
    labels[:, : options.prompt] = -100
    hf_kd_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    completion = ids[:, options.prompt :]
    trl_batch = {  # what TRL's compute_loss reads once its generation step has made the completions
        "prompt_ids": ids[:, : options.prompt],
        "prompt_mask": torch.ones(options.batch, options.prompt, dtype=torch.long),
        "completion_ids": completion,
        "completion_mask": torch.ones_like(completion),
        "num_items_in_batch": torch.tensor(float(completion.numel())),
    }
    # TRL reads its tokenizer for generation only (not run here).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")),
        pad_token="[PAD]",
        unk_token="[UNK]",
    )

    with tempfile.TemporaryDirectory() as folder:
        common = dict(output_dir=folder, use_cpu=True, report_to=[], temperature=1.0)
        trl_trainer = trl.DistillationTrainer(
            model=student,
            teacher_model=teacher,
            # bf16=False: TRL's configs default to bf16 autocast, which its accelerator would also wrap around the
            # shared teacher's forward; this comparison is fp32 for all.
            args=trl.DistillationConfig(**common, beta=options.beta, disable_dropout=False, bf16=False),
            processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": ["w"] * options.batch}),  # not iterated
        )
        hf_kd_args = dict(**common, losses=f"jsd:1.0:beta={options.beta}", hard_label_weight=0.0)
        plain = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(**hf_kd_args))
        chunked = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=DistillationConfig(**hf_kd_args, chunk_size=options.chunk_size),
        )
        runs = {
            TRL: (trl_trainer, trl_batch),
            "hf_kd DistillationTrainer": (plain, hf_kd_batch),
            f"hf_kd DistillationTrainer, chunk_size={options.chunk_size}": (chunked, hf_kd_batch),
        }
        for trainer, _ in runs.values():
            trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
        values = {name: loss_step(trainer, student, batch).item() for name, (trainer, batch) in runs.items()}
        seconds = {name: [] for name in runs}
        for _ in range(options.repeats + 1):  # the first round warms up
            for name, (trainer, batch) in runs.items():
                start = time.perf_counter()
                loss_step(trainer, student, batch)
                seconds[name].append(time.perf_counter() - start)
        times = {name: statistics.median(values[1:]) for name, values in seconds.items()}
        peaks = {}
        for name, (trainer, batch) in runs.items():
            peaks[name], _ = peak_bytes(lambda trainer=trainer, batch=batch: loss_step(trainer, student, batch))

    print(
        f"student GPT-2 2×256, teacher 6×512, vocab {options.vocab:,}, batch {options.batch} × {options.length} "
        f"tokens ({options.length - options.prompt} completion tokens per row), generalized JSD β={options.beta}, "
        f"τ=1, fp32, {torch.get_num_threads()} CPU threads, trl {trl.__version__}\n"
    )
    print("| trainer | loss | s / step | time vs TRL | peak step memory (MiB) | memory vs TRL |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in runs:
        print(
            f"| {name} | {values[name]:.6f} | {times[name]:.3f} | {times[name] / times[TRL]:.2f} | "
            f"{peaks[name] / 2**20:,.0f} | {peaks[name] / peaks[TRL]:.2f} |"
        )
    ratios = {
        f"{name}: {kind}": measured[name] / measured[TRL]
        for name in runs
        for kind, measured in (("time", times), ("memory", peaks))
    }
    plot_bars(ratios, options.plot, xlabel="vs TRL DistillationTrainer", reference=1.0, title="hf_kd vs TRL")
    print(f"\npicture: {options.plot}")


if __name__ == "__main__":
    main()
