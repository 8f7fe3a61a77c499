"""hf_kd's fused chunked loss vs Liger-Kernel's and TRL's chunked losses vs dense logits, side by side in one run.

The same tensors for all four: the final hidden states of N supervised positions of a student (width 256) and a
teacher (width 512), their LM heads (256 × V and 512 × V, no bias), a generalized JSD with β = 0.5 at τ = 1 averaged
over the positions, forward and backward (gradients of the student's hidden states and head):

- hf_kd: ``chunked_token_terms`` (``chunk_size`` 256) with the term's weight, so gradients are computed in its chunk
  loop (``hf_kd.losses.chunked``);
- Liger-Kernel 0.8.5: ``LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, compiled=False,
  chunk_size=256)`` (pure torch, no torch.compile);
- TRL 1.16: the stable ``DistillationTrainer``'s loss, ``trl.trainer.distillation_trainer._chunked_divergence_loss``
  (its own tiles: 4,096 positions × 32,768 vocabulary entries; off CUDA it projects every position);
- dense: both models' whole N × V logits and ``hf_kd.losses.functional.generalized_jsd`` through autograd.

Time is the median of ``--repeats`` forward + backward passes, the four taking turns (after one untimed pass each,
which is also compared with dense: loss and gradients). Peak memory is the allocation profiler's peak of live bytes:
every CPU allocation and free during one pass (``torch.profiler`` with ``profile_memory=True``, its allocation events
in order), so the inputs and heads made before do not count and the gradients made during it do; on CUDA
(``--device cuda``), the caching allocator's peak of allocated bytes during the pass above what was live before it.
Losses and gradients are compared with dense logits in fp32 on the same values, also when the four run in bf16.
Ratios are against the faster (time) and the smaller (memory) of the two peers.

    pip install -c constraints/cpu.txt trl==1.16.0 liger-kernel==0.8.5   # benchmark-only dependencies
    python benchmarks/fused_loss.py                      # V = 32k and 128k, 2,048 positions (~15 min on 2 cores)
    python benchmarks/fused_loss.py --vocab 32000 --repeats 3
    # on a GPU, bf16, a 1B-class student and 3B-class teacher's widths, Liger as its users run it (torch.compile):
    python benchmarks/fused_loss.py --device cuda --dtype bfloat16 --liger_compiled --tokens 8192 \
        --hidden_student 2048 --hidden_teacher 3072 --vocab 32000 128256 --chunk_size 1024 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from chunked_kd_memory import peak_bytes
from torch import nn

from hf_kd import get_loss
from hf_kd.losses import functional
from hf_kd.losses.chunked import chunked_token_terms
from hf_kd.losses.lm_head import LogitsHead
from hf_kd.plots import plot_bars

try:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
except ImportError as error:  # benchmark-only dependencies
    raise SystemExit(
        f"this benchmark compares against Liger-Kernel and TRL: pip install -c constraints/cpu.txt trl==1.16.0 "
        f"liger-kernel==0.8.5 ({error})"
    ) from None

HF_KD, LIGER, TRL, DENSE = "hf_kd fused chunks", "Liger LigerFusedLinearJSDLoss", "TRL 1.16 chunked loss", "dense"


def make_inputs(
    tokens: int,
    vocab: int,
    hidden_student: int,
    hidden_teacher: int,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Student/teacher hidden states and heads (scaled so the logits spread over a few nats, as trained LMs' do),
    drawn in fp32 on the CPU (the same values on every device and dtype), then moved."""
    generator = torch.Generator().manual_seed(seed)
    student_head = nn.Linear(hidden_student, vocab, bias=False)
    teacher_head = nn.Linear(hidden_teacher, vocab, bias=False).requires_grad_(False)
    scale = (256 / hidden_student) ** 0.5, (512 / hidden_teacher) ** 0.5  # logits' spread independent of the width
    with torch.no_grad():
        student_head.weight.normal_(0.0, 0.1 * scale[0], generator=generator)
        teacher_head.weight.normal_(0.0, 0.1 * scale[1], generator=generator)
    student_hidden = torch.randn(tokens, hidden_student, generator=generator)
    teacher_hidden = torch.randn(tokens, hidden_teacher, generator=generator)
    student_head, teacher_head = student_head.to(device, dtype), teacher_head.to(device, dtype)
    student_hidden = student_hidden.to(device, dtype).requires_grad_()
    return student_head, teacher_head, student_hidden, teacher_hidden.to(device, dtype)


def steps(
    student_head, teacher_head, student_hidden, teacher_hidden, beta: float, chunk_size: int, liger_compiled=False
):
    """name → a function running one forward + backward and returning the loss."""
    tokens, device = len(student_hidden), student_hidden.device
    jsd = get_loss("jsd", beta=beta)
    head = LogitsHead.of_head(student_head)
    liger = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=liger_compiled, chunk_size=chunk_size
    )
    targets = torch.zeros(tokens, dtype=torch.long, device=device)  # Liger reads them only for its mask (no -100)

    def hf_kd():
        weights = torch.tensor([1.0 / tokens], device=device)
        sums = chunked_token_terms(
            student_hidden,
            (teacher_hidden,),
            None,
            student_head=head,
            teacher_logits=teacher_head,
            losses=[jsd],
            with_label_loss=False,
            chunk_size=chunk_size,
            weights=weights,
        )
        loss = (sums * weights).sum()
        loss.backward()
        return loss

    def liger_step():
        loss = liger(student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, targets)
        loss.backward()
        return loss

    def trl_step():
        loss, _, _ = _chunked_divergence_loss(
            student_hidden[None],
            teacher_hidden[None],
            student_head.weight,
            teacher_head.weight,
            torch.ones(1, tokens, device=device),
            beta,
        )
        loss.backward()
        return loss

    def dense():
        student_logits = student_head(student_hidden)
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        loss = functional.generalized_jsd(student_logits, teacher_logits, beta=beta)
        loss.backward()
        return loss

    return {HF_KD: hf_kd, LIGER: liger_step, TRL: trl_step, DENSE: dense}


def run(step, parameters):
    """One forward + backward from zeroed gradients: (loss, gradients)."""
    for parameter in parameters:
        parameter.grad = None
    loss = step()
    return loss.detach(), [parameter.grad.clone() for parameter in parameters]


def cuda_peak_bytes(step) -> int:
    """Peak bytes the CUDA caching allocator held live during ``step()`` above what was live before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(vocab: int, options) -> dict:
    dtype = getattr(torch, options.dtype)
    shape = options.tokens, vocab, options.hidden_student, options.hidden_teacher
    student_head, teacher_head, student_hidden, teacher_hidden = make_inputs(*shape, device=options.device, dtype=dtype)
    parameters = [student_hidden, student_head.weight]
    by_name = steps(
        student_head,
        teacher_head,
        student_hidden,
        teacher_hidden,
        options.beta,
        options.chunk_size,
        options.liger_compiled,
    )
    # The reference: dense in fp32 on the same values (in a lower dtype every implementation is compared with it).
    reference = make_inputs(*shape, device=options.device)
    reference_loss, reference_grads = run(
        steps(*reference, options.beta, options.chunk_size)[DENSE], [reference[2], reference[0].weight]
    )
    del reference
    results = {}
    for name, step in by_name.items():  # the untimed pass (also compiles what compiles): each against dense
        loss, grads = run(step, parameters)
        results[name] = {
            "loss": loss.item(),
            "loss_gap": abs(loss.item() - reference_loss.item()),
            "grad_gap": max(
                ((g.float() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, reference_grads)
            ),
            "seconds": [],
        }
    for _ in range(options.repeats):  # the four take turns, so a slow spell of the machine hits them alike
        for name, step in by_name.items():
            for parameter in parameters:
                parameter.grad = None
            results[name]["seconds"].append(timed(step, options.device))
    for name, step in by_name.items():
        for parameter in parameters:
            parameter.grad = None
        results[name]["peak"] = cuda_peak_bytes(step) if options.device == "cuda" else peak_bytes(step)[0]
        results[name]["time"] = statistics.median(results[name]["seconds"])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_000])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden_student", type=int, default=256)
    parser.add_argument("--hidden_teacher", type=int, default=512)
    parser.add_argument("--chunk_size", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Heads and hidden states.")
    parser.add_argument(
        "--liger_compiled", action="store_true", help="Liger's default, torch.compile (off: its pure-torch path)."
    )
    parser.add_argument("--plot", default="outputs/benchmarks/fused_loss.png", help="Where to draw the ratios.")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here.")
    if options.device == "cpu" and options.dtype != "float32":
        parser.error("--dtype bfloat16 is measured on --device cuda (CPU bf16 matmuls are not what anyone trains on).")
    device_name = torch.cuda.get_device_name() if options.device == "cuda" else f"{torch.get_num_threads()} CPU threads"

    ratios = {}
    print(
        f"{options.tokens:,} positions, student head {options.hidden_student} × V, teacher head "
        f"{options.hidden_teacher} × V, chunks of {options.chunk_size}, generalized JSD β = {options.beta}, "
        f"{options.dtype}, {device_name}, Liger compiled: {options.liger_compiled}, torch {torch.__version__}\n"
    )
    for vocab in options.vocab:
        results = measure(vocab, options)
        faster = min(results[LIGER]["time"], results[TRL]["time"])
        smaller = min(results[LIGER]["peak"], results[TRL]["peak"])
        print(f"V = {vocab:,}")
        print(
            "| implementation | ms per forward + backward (median) | peak live MiB | time / faster peer | "
            "memory / smaller peer | loss | |Δ loss| vs dense | max |Δ grad| / max |grad| vs dense |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, result in results.items():
            print(
                f"| {name} | {result['time'] * 1000:,.1f} | {result['peak'] / 2**20:,.0f} | "
                f"{result['time'] / faster:.2f} | {result['peak'] / smaller:.2f} | {result['loss']:.6f} | "
                f"{result['loss_gap']:.1e} | {result['grad_gap']:.1e} |"
            )
        print(
            f"\nhf_kd / faster peer: time {results[HF_KD]['time'] / faster:.2f} (goal ≤ 0.9), "
            f"memory / smaller peer {results[HF_KD]['peak'] / smaller:.2f} (goal ≤ 1.1); "
            f"times of each pass: { {name: [round(s, 2) for s in r['seconds']] for name, r in results.items()} }\n"
        )
        for name in (HF_KD, LIGER, TRL):
            ratios[f"{name}, V={vocab // 1000}k: time"] = results[name]["time"] / faster
            ratios[f"{name}, V={vocab // 1000}k: memory"] = results[name]["peak"] / smaller
    plot_bars(ratios, options.plot, xlabel="vs the better peer", reference=1.0, title="fused chunked JSD")
    print(f"picture: {options.plot}")


if __name__ == "__main__":
    main()
