"""What one step of a distillation graph costs: the sum of its nodes' forward and backward passes, FLOP-counted side
by side in one run with the schemes it contains.

The three nodes of ``graph_digits.py`` / ``graph_bbc.py`` — a frozen teacher, a trained student and a trained peer —
on one batch: the digits ViTs (teacher 4×64, student 1×16, peer 2×32; 64 images of 8×8) and the BBC BERTs (teacher
4×256, student 2×128, peer 2×192; 32 articles × 128 tokens, MiniLM's vocabulary of 30,522). For each ``training_step``
(``torch.utils.flop_counter``, as ``multi_teacher_cost.py`` counts; optimizer steps left out): the student alone
(CE), offline KD (teacher → student), deep mutual learning (student ⇄ peer) and the graph of all four edges
(teacher → student, teacher → peer, peer → student, student → peer, every gate ``through``), each against the sum of
its nodes' own passes: a trained node's plain CE step (forward + backward) and a frozen node's forward. A ratio of
1.00 means the graph adds nothing but its nodes' passes: each node runs once per step, however many edges read it.
Also the median seconds per step, the kinds taking turns (``kd_step_cost.interleaved_step_times``).

    python benchmarks/graph_cost.py                  # ~1 min on 2 CPU cores
    python benchmarks/graph_cost.py --tasks digits   # the ViTs alone, seconds
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from graph_digits import full_graph
from kd_step_cost import interleaved_step_times, step_flops
from mutual_learning_cost import bert
from schemes_digits import load_recipe
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer, TrainingArguments

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.evaluation import count_parameters
from hf_kd.schemes.graph import GraphTrainer
from hf_kd.schemes.mutual_learning import MutualLearningTrainer


def digits_nodes(batch_size: int, generator: torch.Generator):
    """The digits benchmark's ViTs (teacher 4×64, student 1×16, peer 2×32) and a batch of 8×8 images."""
    module = load_recipe("image_classification")
    recipe = module.ImageRecipeArguments()

    def vit(hidden, layers, seed):
        torch.manual_seed(seed)
        return module.vit(recipe, hidden, layers, 10)

    side = recipe.image_side
    batch = {
        "pixel_values": torch.randn(batch_size, 1, side, side, generator=generator),
        "labels": torch.randint(0, 10, (batch_size,), generator=generator),
    }
    nodes = {"teacher": vit(64, 4, 0), "student": vit(16, 1, 1), "peer": vit(32, 2, 2)}
    return nodes, batch, f"{batch_size} images of {side}×{side}"


def bbc_nodes(batch_size: int, generator: torch.Generator, length: int = 128, vocab: int = 30522):
    """The BBC benchmark's BERTs (teacher 4×256, student 2×128, peer 2×192) and a batch of token ids."""
    ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 5, (batch_size,), generator=generator),
    }
    nodes = {
        "teacher": bert(256, 4, vocab, length, 0),
        "student": bert(128, 2, vocab, length, 1),
        "peer": bert(192, 2, vocab, length, 2),
    }
    return nodes, batch, f"{batch_size} articles × {length} tokens"


def measure(nodes: dict, batch: dict, folder: str, repeats: int) -> tuple[list[tuple], dict, dict]:
    """Each scheme's step FLOPs against the sum of its nodes' passes, and seconds per step."""
    data = Dataset.from_dict({key: value.tolist() for key, value in batch.items()})
    common = dict(output_dir=folder, use_cpu=True, report_to=[])
    args = DistillationConfig(**common, losses="kl", alpha=0.5, temperature=2.0, check_finite=False)
    teacher, student, peer = nodes["teacher"].eval(), nodes["student"], nodes["peer"]
    plain = {
        name: Trainer(model=nodes[name], args=TrainingArguments(**common), train_dataset=data)
        for name in ("student", "peer")
    }
    for trainer in plain.values():
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
        trainer.model.train()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(**{key: value for key, value in batch.items() if key != "labels"})
    passes = {
        "teacher forward": counter.get_total_flops(),
        "student step": step_flops(plain["student"], dict(batch)),
        "peer step": step_flops(plain["peer"], dict(batch)),
    }
    schemes = {
        "student alone (CE)": (plain["student"], ["student step"]),
        "offline KD (teacher → student)": (
            DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data),
            ["student step", "teacher forward"],
        ),
        "mutual learning (student ⇄ peer)": (
            MutualLearningTrainer({"student": student, "peer": peer}, args, train_dataset=data),
            ["student step", "peer step"],
        ),
        "graph of all four edges, through": (
            GraphTrainer(full_graph(), dict(nodes), args, train_dataset=data),
            ["student step", "peer step", "teacher forward"],
        ),
    }
    rows = []
    for name, (trainer, parts) in schemes.items():
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        flops = step_flops(trainer, dict(batch))
        rows.append((name, flops, sum(passes[part] for part in parts), " + ".join(parts)))
    times = {}
    if repeats > 0:
        times = interleaved_step_times(
            {name: (trainer, dict(batch)) for name, (trainer, _) in schemes.items()}, repeats
        )
    return rows, times, passes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "bbc"], choices=["digits", "bbc"])
    parser.add_argument("--digits_batch", type=int, default=64)
    parser.add_argument("--bbc_batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps of each kind (0: FLOPs only).")
    options = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    for task in options.tasks:
        if task == "digits":
            nodes, batch, shape = digits_nodes(options.digits_batch, generator)
        else:
            nodes, batch, shape = bbc_nodes(options.bbc_batch, generator)
        with tempfile.TemporaryDirectory() as folder:
            rows, times, passes = measure(nodes, batch, folder, options.repeats)
        sizes = ", ".join(f"{name} {count_parameters(model):,}" for name, model in nodes.items())
        timing = f", median of {options.repeats} steps" if times else ""
        print(f"\n{task}: {sizes} parameters; {shape}; fp32, {torch.get_num_threads()} CPU threads{timing}\n")
        header = "| step | GFLOPs | Σ its nodes' passes | GFLOPs / Σ | ratio to the student alone |"
        print(header + (" s / step | time ratio to the student alone |" if times else ""))
        print("|---|---:|---|---:|---:|" + ("---:|---:|" if times else ""))
        alone = rows[0][0]
        for name, flops, expected, parts in rows:
            line = f"| {name} | {flops / 1e9:.3f} | {parts} = {expected / 1e9:.3f} | {flops / expected:.4f} "
            line += f"| {flops / rows[0][1]:.2f} |"
            if times:
                line += f" {times[name]:.4f} | {times[name] / times[alone]:.2f} |"
            print(line)
        print("\n" + ", ".join(f"{name} {value / 1e9:.3f} GFLOPs" for name, value in passes.items()))


if __name__ == "__main__":
    main()
