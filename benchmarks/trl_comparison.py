"""hf_kd vs TRL's GKD on the same loss and step: value, step time and peak memory side by side, in one run.

TRL (``pip install trl``; only this benchmark needs it) ``experimental.gkd.GKDTrainer`` with ``lmbda=0`` (the
dataset's own completions, no generation: the deterministic part of a GKD step) against hf_kd's
``DistillationTrainer`` with ``losses="jsd:1.0:beta=…"`` and no label loss — the same generalized JSD over the
completion tokens — plain and with ``chunk_size``. Same GPT-2-style student and teacher, same batch with prompts
masked, same process. Time is the median of ``training_step`` with the trainers taking turns; peak memory is the
high-water mark of live bytes during one step (profiler allocation events, as in ``chunked_kd_memory.py``).

    pip install trl && python benchmarks/trl_comparison.py          # ~2 min on 2 CPU cores
    python benchmarks/trl_comparison.py --vocab 32000 --length 256
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from chunked_kd_memory import peak_bytes
from datasets import Dataset
from kd_step_cost import gpt2, interleaved_step_times
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.plots import plot_bars

try:
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError as error:  # a benchmark-only dependency
    raise SystemExit(f"this benchmark compares against TRL: pip install trl ({error})") from None


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
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, options.vocab, (options.batch, options.length), generator=generator)
    labels = ids.clone()
    labels[:, : options.prompt] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    # GKDTrainer reads its tokenizer's pad id only (for generation, unused with lmbda=0).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")),
        pad_token="[PAD]",
        unk_token="[UNK]",
    )

    with tempfile.TemporaryDirectory() as folder:
        common = dict(output_dir=folder, use_cpu=True, report_to=[], temperature=1.0)
        trl = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=GKDConfig(**common, lmbda=0.0, beta=options.beta, seq_kd=False, disable_dropout=False),
            processing_class=tokenizer,
            train_dataset=Dataset.from_dict({key: value.tolist() for key, value in batch.items()}),  # not iterated
        )
        hf_kd_args = dict(**common, losses=f"jsd:1.0:beta={options.beta}", hard_label_weight=0.0)
        plain = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(**hf_kd_args))
        chunked = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=DistillationConfig(**hf_kd_args, chunk_size=options.chunk_size),
        )
        trainers = {
            "TRL GKDTrainer (lmbda=0)": trl,
            "hf_kd DistillationTrainer": plain,
            f"hf_kd DistillationTrainer, chunk_size={options.chunk_size}": chunked,
        }
        # The same loss value from every trainer (each normalises by the completion tokens of the batch).
        values = {}
        for name, trainer in trainers.items():
            count = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
            with torch.no_grad():
                values[name] = trainer.compute_loss(student, dict(batch), num_items_in_batch=count).item()
        times = interleaved_step_times({name: (t, batch) for name, t in trainers.items()}, options.repeats)
        peaks = {}
        for name, trainer in trainers.items():
            peaks[name], _ = peak_bytes(lambda trainer=trainer: trainer.training_step(student, dict(batch)))
            student.zero_grad()

    print(
        f"student GPT-2 2×256, teacher 6×512, vocab {options.vocab:,}, batch {options.batch} × {options.length} "
        f"tokens ({options.length - options.prompt} completion tokens per row), generalized JSD β={options.beta}, "
        "τ=1, fp32, 2 CPU threads\n"
    )
    reference = "TRL GKDTrainer (lmbda=0)"
    print("| trainer | loss | s / step | time vs TRL | peak step memory (MiB) | memory vs TRL |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in trainers:
        print(
            f"| {name} | {values[name]:.6f} | {times[name]:.3f} | {times[name] / times[reference]:.2f} | "
            f"{peaks[name] / 2**20:.0f} | {peaks[name] / peaks[reference]:.2f} |"
        )
    ratios = {
        f"{name}: {kind}": measured[name] / measured[reference]
        for name in trainers
        for kind, measured in (("time", times), ("memory", peaks))
    }
    plot_bars(ratios, options.plot, xlabel="vs TRL GKDTrainer", reference=1.0, title="hf_kd vs TRL GKD")
    print(f"\npicture: {options.plot}")


if __name__ == "__main__":
    main()
