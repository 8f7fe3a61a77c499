"""What a deep-mutual-learning step of K peers costs against the K peers' plain fine-tuning steps, side by side in
one run.

The peers are BERT sequence classifiers of different widths (or, with ``--task lm``, GPT-2 causal LMs). On one
batch, taking turns: the median time of the cohort's ``training_step`` (every peer's forward and backward, each
peer's CE and KL towards the others) and of each peer's plain ``transformers.Trainer.training_step`` (its CE
alone), plus the same DML step written by hand in plain PyTorch (every peer's forward, CE + KL towards the others'
detached logits, one backward). The ratio cohort / Σ plain is the price of the mutual terms (the bar: ≤ 1.05);
hand-written / Σ plain is what DML itself costs, without hf_kd. Optimizer steps are left out of all three.

    python benchmarks/mutual_learning_cost.py                 # 2 peers, ~1 min on 2 CPU cores
    python benchmarks/mutual_learning_cost.py --peers 3
    python benchmarks/mutual_learning_cost.py --task lm --vocab 8000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from kd_step_cost import gpt2
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from hf_kd import DistillationConfig
from hf_kd.evaluation import count_parameters
from hf_kd.plots import plot_bars
from hf_kd.schemes.mutual_learning import MutualLearningTrainer


def bert(width: int, layers: int, vocab: int, length: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        intermediate_size=4 * width,
        max_position_embeddings=length,
        num_labels=5,
    )
    return BertForSequenceClassification(config)


def hand_written_dml_step(peers, batch) -> None:
    """DML without hf_kd: each peer's CE plus KL (T = 1) towards the mean over the others' detached predictions."""
    logits = [peer(input_ids=batch["input_ids"]).logits for peer in peers]
    if logits[0].dim() == 3:  # causal LMs: position t predicts token t + 1
        logits = [each[:, :-1].reshape(-1, each.shape[-1]) for each in logits]
        labels = batch["labels"][:, 1:].reshape(-1)
    else:
        labels = batch["labels"]
    log_probs = [torch.log_softmax(each.float(), -1) for each in logits]
    total = 0
    for k, own in enumerate(log_probs):
        others = [other.detach() for j, other in enumerate(log_probs) if j != k]
        kl = sum(torch.nn.functional.kl_div(own, other, log_target=True, reduction="batchmean") for other in others)
        total = total + torch.nn.functional.nll_loss(own, labels) + kl / len(others)
    total.backward()


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["classification", "lm"], default="classification")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--plot", default="outputs/benchmarks/mutual_learning_cost.png", help="Where to draw.")
    options = parser.parse_args()

    widths = [128 + 64 * k for k in range(options.peers)]  # peers of different sizes
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, options.vocab, (options.batch, options.length), generator=generator)
    if options.task == "lm":
        peers = [gpt2(options.layers, w, options.vocab, options.length, seed=k) for k, w in enumerate(widths)]
        batch = {"input_ids": ids, "labels": ids.clone()}
    else:
        peers = [bert(w, options.layers, options.vocab, options.length, seed=k) for k, w in enumerate(widths)]
        batch = {"input_ids": ids, "labels": torch.randint(0, 5, (options.batch,), generator=generator)}
    data = Dataset.from_dict({key: value.tolist() for key, value in batch.items()})
    with tempfile.TemporaryDirectory() as folder:
        common = dict(output_dir=folder, use_cpu=True, report_to=[])
        cohort = MutualLearningTrainer(
            peers, DistillationConfig(**common, losses="kl", check_finite=False), train_dataset=data
        )
        plain = [Trainer(model=peer, args=TrainingArguments(**common), train_dataset=data) for peer in peers]
        for trainer in [cohort, *plain]:
            trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
            trainer.model.train()

        def cohort_step():
            cohort.training_step(cohort.model, dict(batch))
            cohort.model.zero_grad()

        def plain_steps():
            for trainer in plain:
                trainer.training_step(trainer.model, dict(batch))
                trainer.model.zero_grad()

        def hand_step():
            hand_written_dml_step(peers, batch)
            for peer in peers:
                peer.zero_grad()

        times = {cohort_step: [], plain_steps: [], hand_step: []}
        for repeat in range(options.repeats + 1):  # the first round warms up
            for step, measured in times.items():
                # Each kind runs once untimed right before its timed run, so the allocator holds that kind's own
                # working set, as in training (a cohort step after two smaller plain steps would grow it first).
                step()
                seconds = timed(step)
                if repeat >= 1:
                    measured.append(seconds)
        cohort_times, plain_times, hand_times = times.values()
    together, alone = statistics.median(cohort_times), statistics.median(plain_times)
    by_hand = statistics.median(hand_times)
    sizes = ", ".join(f"{count_parameters(peer) / 1e6:.1f}M" for peer in peers)
    print(
        f"{options.peers} {options.task} peers ({sizes} parameters), {options.layers} layers, vocab "
        f"{options.vocab:,}, batch {options.batch} × {options.length} tokens, fp32, {torch.get_num_threads()} CPU "
        f"threads, median of {options.repeats}\n"
    )
    print("| | s per step | ratio |")
    print("|---|---:|---:|")
    print(f"| the peers' plain fine-tuning steps, summed | {alone:.4f} | 1.00 |")
    print(f"| the same DML step by hand in plain PyTorch | {by_hand:.4f} | {by_hand / alone:.3f} |")
    print(f"| one deep-mutual-learning step of the cohort (hf_kd) | {together:.4f} | {together / alone:.3f} |")
    print(f"\nhf_kd's cohort step / the hand-written DML step: {together / by_hand:.3f}")
    ratios = {
        "plain steps, summed": 1.0,
        "DML by hand (PyTorch)": by_hand / alone,
        "DML cohort step (hf_kd)": together / alone,
    }
    plot_bars(ratios, options.plot, xlabel="s per step / the plain steps", reference=1.05, reference_label="bar 1.05")
    print(f"picture: {options.plot}")


if __name__ == "__main__":
    main()
