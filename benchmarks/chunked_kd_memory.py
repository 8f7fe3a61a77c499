"""Peak memory and time of token-level KD: plain full-logits loss vs hf_kd's chunked path, side by side.

Forward + backward of KL(teacher ‖ student) + label CE from final hidden states and LM heads at a 128k vocabulary,
plain and chunked (the fused chunks the trainer runs: gradients computed in the chunk loop). Peak memory is the
allocation profiler's peak of live bytes: every CPU allocation and free during the step (``torch.profiler`` with
``profile_memory=True``, its allocation events in order), so the inputs made before do not count and the gradients
made during the step do.

    python benchmarks/chunked_kd_memory.py                      # V = 128k, 2,048 and 8,192 tokens (~2 min)
    python benchmarks/chunked_kd_memory.py --vocab 32000 --tokens 1024 4096 --chunk_size 512
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from hf_kd import ModelFeatures, get_loss
from hf_kd.losses.chunked import chunked_token_terms
from hf_kd.losses.lm_head import LogitsHead
from hf_kd.plots import plot_bars


def peak_bytes(step) -> tuple[int, float]:
    """(peak live bytes allocated during ``step()``, seconds): the running sum of the profiler's allocation events
    (frees are negative) in time order, intra-operator temporaries included."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    allocations, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.typed[0] == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.typed[1].alloc_size))
        pending.extend(event.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak, seconds


def make_inputs(tokens: int, vocab: int, hidden_student: int, hidden_teacher: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student_head = nn.Linear(hidden_student, vocab, bias=False)
    teacher_head = nn.Linear(hidden_teacher, vocab, bias=False).requires_grad_(False)
    student_hidden = torch.randn(tokens, hidden_student, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(tokens, hidden_teacher, generator=generator)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    return student_head, teacher_head, student_hidden, teacher_hidden, targets


def plain_step(student_head, teacher_head, student_hidden, teacher_hidden, targets, kl):
    student_logits = student_head(student_hidden)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    loss = torch.nn.functional.cross_entropy(student_logits, targets, reduction="sum") + kl(
        ModelFeatures(logits=student_logits), ModelFeatures(logits=teacher_logits)
    )
    loss.backward()


def chunked_step(student_head, teacher_head, student_hidden, teacher_hidden, targets, kl, chunk_size):
    weights = torch.ones(2)  # CE + KL, each summed over the tokens
    sums = chunked_token_terms(
        student_hidden,
        (teacher_hidden,),
        targets,
        student_head=LogitsHead.of_head(student_head),
        teacher_logits=teacher_head,
        losses=[kl],
        with_label_loss=True,
        chunk_size=chunk_size,
        weights=weights,
    )
    (sums * weights).sum().backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128_000)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--hidden_student", type=int, default=256)
    parser.add_argument("--hidden_teacher", type=int, default=512)
    parser.add_argument("--chunk_size", type=int, default=256)
    parser.add_argument("--plot", default="outputs/benchmarks/chunked_kd_memory.png", help="Where to draw the ratios.")
    options = parser.parse_args()
    kl = get_loss("kl", temperature=2.0)

    rows = []
    for tokens in options.tokens:
        inputs = make_inputs(tokens, options.vocab, options.hidden_student, options.hidden_teacher)
        chunked = peak_bytes(lambda inputs=inputs: chunked_step(*inputs, kl, options.chunk_size))
        plain = peak_bytes(lambda inputs=inputs: plain_step(*inputs, kl)) if tokens == options.tokens[0] else None
        rows.append((tokens, plain, chunked))

    gib = 2**30
    print(
        f"V = {options.vocab:,}, student/teacher hidden {options.hidden_student}/{options.hidden_teacher}, "
        f"chunk {options.chunk_size} tokens, fp32, forward + backward of CE + KL\n"
    )
    print(
        "| tokens | plain peak | chunked peak | chunked / plain memory | plain s | chunked s | chunked / plain time |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for tokens, plain, chunked in rows:
        if plain:
            print(
                f"| {tokens:,} | {plain[0] / gib:.2f} GiB | {chunked[0] / gib:.3f} GiB | {chunked[0] / plain[0]:.3f} | "
                f"{plain[1]:.2f} | {chunked[1]:.2f} | {chunked[1] / plain[1]:.2f} |"
            )
        else:
            print(f"| {tokens:,} | – | {chunked[0] / gib:.3f} GiB | – | – | {chunked[1]:.2f} | – |")
    first, last = rows[0][2][0], rows[-1][2][0]
    print(f"\nchunked peak growth from {rows[0][0]:,} to {rows[-1][0]:,} tokens: {last / first:.2f}×")
    peaks = {}
    for tokens, plain, chunked in rows:
        if plain:
            peaks[f"plain, {tokens:,} tokens"] = plain[0] / gib
        peaks[f"chunked, {tokens:,} tokens"] = chunked[0] / gib
    plot_bars(peaks, options.plot, xlabel="peak GiB of the loss step", title=f"token-level KD at V = {options.vocab:,}")
    print(f"picture: {options.plot}")


if __name__ == "__main__":
    main()
