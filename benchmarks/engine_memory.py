"""What each process holds under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2: teacher and student tensor memory.

A GPT-2 teacher (12×768, vocab 8k) distils into a GPT-2 student (4×384) with ``DistillationTrainer`` for two
AdamW steps on 2 CPU processes (gloo), once per engine, loading both models with ``from_pretrained`` as a user would
(ZeRO-3 partitions them while loading). After training, each process counts the bytes of every tensor storage it
holds (weights, gradients, optimizer state, engine buffers; each storage once) and, apart, its share of the teacher's
weights. FSDP2 runs on CPU through ``tests/distributed/cpu_fsdp.py``, as the tests do (Accelerate enables FSDP on GPU
back-ends only). Process memory (RSS) is printed too, but tensor bytes are what the engines change: they are exact,
RSS carries the interpreter, libraries and allocator slack.

    python benchmarks/engine_memory.py          # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("ddp", "zero2", "zero3", "fsdp2")


def gpt2(layers: int, width: int, vocab: int, length: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=width, n_head=width // 64, n_positions=length)
    )


def held_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process (DeepSpeed partitions and DTensor shards
    included: they are ordinary tensors underneath)."""
    import torch

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and not obj.is_meta and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):  # tensors without storage (wrapper subclasses), dead proxies
            continue
    return sum(storages.values())


def local_bytes(parameters) -> int:
    """Bytes of the given parameters that this process holds: its ZeRO-3 partition or FSDP2 shard, else all."""
    from torch.distributed.tensor import DTensor

    total = 0
    for parameter in parameters:
        if hasattr(parameter, "ds_tensor"):
            held = parameter.ds_tensor
        elif isinstance(parameter, DTensor):
            held = parameter.to_local()
        else:
            held = parameter
        total += held.numel() * held.element_size()
    return total


def worker(engine: str, models: str, output: str) -> None:
    """One process of one engine's run (under torchrun)."""
    import resource

    import torch
    from datasets import Dataset

    from hf_kd import DistillationConfig, DistillationTrainer

    torch.set_num_threads(1)
    extra = {}
    if engine.startswith("zero"):
        extra["deepspeed"] = os.path.join(ROOT, "recipes", "accelerate", f"ds_zero{engine[-1]}.json")
    if engine == "fsdp2":
        sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
        import cpu_fsdp

        cpu_fsdp.enable()
        extra.update(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]})
    args = DistillationConfig(
        output_dir=os.path.join(os.path.dirname(output), engine),
        use_cpu=True,
        report_to=[],
        max_steps=2,
        per_device_train_batch_size=2,
        save_strategy="no",
        losses="kl",
        **extra,
    )
    if engine.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed()  # before from_pretrained, whose zero.Init reads the world size
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8000, (16, 128), generator=generator).tolist()
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(os.path.join(models, "student")),
        teacher_model=os.path.join(models, "teacher"),
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
    )
    trainer.train()
    result = {
        "tensor_bytes": held_tensor_bytes(),
        "teacher_bytes": local_bytes(trainer.teacher_model.parameters()),
        "student_bytes": local_bytes(trainer.model.parameters()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    with open(f"{output}.{trainer.args.process_index}", "w") as handle:
        json.dump(result, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--plot", default="outputs/benchmarks/engine_memory.png", help="Where to draw the ratios.")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        models = os.path.join(folder, "models")
        import torch

        torch.manual_seed(0)
        gpt2(12, 768, 8000, 128).save_pretrained(os.path.join(models, "teacher"))
        gpt2(4, 384, 8000, 128).save_pretrained(os.path.join(models, "student"))
        rows = {}
        for port, engine in enumerate(options.engines, start=29650):
            output = os.path.join(folder, f"{engine}.json")
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            command += ["--master_port", str(port), __file__, "--worker", engine, models, output]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            completed = subprocess.run(command, env=env, capture_output=True, text=True)
            if completed.returncode != 0:
                raise SystemExit(f"{engine} failed:\n{completed.stderr[-3000:]}")
            ranks = [json.load(open(f"{output}.{rank}")) for rank in (0, 1)]
            rows[engine] = {key: max(rank[key] for rank in ranks) for key in ranks[0]}  # the larger process
    mb = 2**20
    baseline = rows.get("ddp")
    print("\nPer process (the larger of 2), after 2 AdamW steps, fp32:\n")
    print("| engine | teacher weights held | student weights held | all tensors held | vs DDP | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for engine, row in rows.items():
        ratio = f"{row['tensor_bytes'] / baseline['tensor_bytes']:.2f}" if baseline else "–"
        print(
            f"| {engine} | {row['teacher_bytes'] / mb:.0f} MiB | {row['student_bytes'] / mb:.0f} MiB | "
            f"{row['tensor_bytes'] / mb:.0f} MiB | {ratio} | {row['peak_rss_bytes'] / mb:.0f} MiB |"
        )
    from hf_kd.plots import plot_bars

    held = {engine: row["tensor_bytes"] / mb for engine, row in rows.items()}
    plot_bars(held, options.plot, xlabel="MiB of tensors held per process", title="teacher + student under each engine")
    print(f"\npicture: {options.plot}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
        sys.stdout.flush()
        os._exit(0)  # results are written; DeepSpeed's CPU threads can abort at interpreter teardown
    main()
