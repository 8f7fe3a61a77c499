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
in order), so the inputs and heads made before do not count and the gradients made during it do. Ratios are against
the faster (time) and the smaller (memory) of the two peers.

    pip install -c constraints/cpu.txt trl==1.16.0 liger-kernel==0.8.5   # benchmark-only dependencies
    python benchmarks/fused_loss.py                      # V = 32k and 128k, 2,048 positions (~15 min on 2 cores)
    python benchmarks/fused_loss.py --vocab 32000 --repeats 3
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


def make_inputs(tokens: int, vocab: int, hidden_student: int, hidden_teacher: int, seed: int = 0):
    """Student/teacher hidden states and heads (scaled so the logits spread over a few nats, as trained LMs' do)."""
    generator = torch.Generator().manual_seed(seed)
    student_head = nn.Linear(hidden_student, vocab, bias=False)
    teacher_head = nn.Linear(hidden_teacher, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        student_head.weight.normal_(0.0, 0.1, generator=generator)
        teacher_head.weight.normal_(0.0, 0.1, generator=generator)
    student_hidden = torch.randn(tokens, hidden_student, generator=generator).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden_teacher, generator=generator)
    return student_head, teacher_head, student_hidden, teacher_hidden


def steps(student_head, teacher_head, student_hidden, teacher_hidden, beta: float, chunk_size: int):
    """name → a function running one forward + backward and returning the loss."""
    tokens = len(student_hidden)
    jsd = get_loss("jsd", beta=beta)
    head = LogitsHead.of_head(student_head)
    liger = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=False, chunk_size=chunk_size
    )
    targets = torch.zeros(tokens, dtype=torch.long)  # Liger reads them only for its mask (no -100: all count)

    def hf_kd():
        weights = torch.tensor([1.0 / tokens])
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
            torch.ones(1, tokens),
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


def measure(vocab: int, options) -> dict:
    student_head, teacher_head, student_hidden, teacher_hidden = make_inputs(
        options.tokens, vocab, options.hidden_student, options.hidden_teacher
    )
    parameters = [student_hidden, student_head.weight]
    by_name = steps(student_head, teacher_head, student_hidden, teacher_hidden, options.beta, options.chunk_size)
    reference_loss, reference_grads = run(by_name[DENSE], parameters)
    results = {}
    for name, step in by_name.items():  # the untimed pass: each against dense
        loss, grads = run(step, parameters)
        results[name] = {
            "loss": loss.item(),
            "loss_gap": abs(loss.item() - reference_loss.item()),
            "grad_gap": max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, reference_grads)),
            "seconds": [],
        }
    for _ in range(options.repeats):  # the four take turns, so a slow spell of the machine hits them alike
        for name, step in by_name.items():
            for parameter in parameters:
                parameter.grad = None
            start = time.perf_counter()
            step()
            results[name]["seconds"].append(time.perf_counter() - start)
    for name, step in by_name.items():
        for parameter in parameters:
            parameter.grad = None
        results[name]["peak"], _ = peak_bytes(step)
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
    parser.add_argument("--plot", default="outputs/benchmarks/fused_loss.png", help="Where to draw the ratios.")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    ratios = {}
    print(
        f"{options.tokens:,} positions, student head {options.hidden_student} × V, teacher head "
        f"{options.hidden_teacher} × V, chunks of {options.chunk_size}, generalized JSD β = {options.beta}, fp32, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}\n"
    )
    for vocab in options.vocab:
        results = measure(vocab, options)
        faster = min(results[LIGER]["time"], results[TRL]["time"])
        smaller = min(results[LIGER]["peak"], results[TRL]["peak"])
        print(f"V = {vocab:,}")
        print(
            "| implementation | s per forward + backward (median) | peak live MiB | time / faster peer | "
            "memory / smaller peer | loss | |Δ loss| vs dense | max |Δ grad| / max |grad| vs dense |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, result in results.items():
            print(
                f"| {name} | {result['time']:.2f} | {result['peak'] / 2**20:,.0f} | {result['time'] / faster:.2f} | "
                f"{result['peak'] / smaller:.2f} | {result['loss']:.6f} | {result['loss_gap']:.1e} | "
                f"{result['grad_gap']:.1e} |"
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
