"""One distillation run for the multi-process tests: `python train_worker.py OUT BATCH ACCUM [ENGINE]` under torchrun
or not, ENGINE being `ddp` (default), `zero2` or `zero3` (DeepSpeed, CPU accelerator).

Tiny GPT-2 teacher/student, rows with uneven supervised-token counts (exact for the per-token response losses), KL +
TVD + a hidden-state loss with a learned projector (so the loss's own parameters must be synchronised too; rows are
unpadded because that loss averages per micro-batch over real tokens). DeepSpeed runs leave the projector out (its
optimizer takes only the model's parameters). Rank 0 writes the final student weights, the loss parameters and the
log history to OUT.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from conftest import config, lm_data, tiny_gpt2  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes")


def deepspeed_config(stage: int) -> str:
    """The DeepSpeed config the recipes ship (what `--deepspeed` and the accelerate zero*.yaml files use)."""
    return os.path.join(RECIPES, "accelerate", f"ds_zero{stage}.json")


def main(output_dir: str, batch_size: int, accumulation: int, engine: str = "ddp") -> None:
    """``engine``: ``ddp`` (default), ``none`` (one process, the DeepSpeed runs' losses), ``zero2`` or ``zero3``;
    with ``-chunked`` (``none-chunked``, ``zero3-chunked``) the token KD is chunked (``chunk_size=5``)."""
    torch.set_num_threads(1)
    engine, _, variant = engine.partition("-")
    extra = {"deepspeed": deepspeed_config(int(engine[-1]))} if engine.startswith("zero") else {}
    if variant == "chunked":
        extra["chunk_size"] = 5
    args = config(
        output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        losses="kl,tvd,hidden_mse:1.0:projector=linear" if engine == "ddp" else "kl,tvd",
        **extra,
    )
    trainer = DistillationTrainer(
        model=tiny_gpt2(hidden=16, layers=1, seed=2),
        teacher_model=tiny_gpt2(seed=1),
        args=args,
        train_dataset=lm_data(n=16, padded=False),
    )
    trainer.train()
    trainer.save_model(os.path.join(output_dir, "student"))  # under ZeRO-3 this gathers the shards
    if trainer.is_world_process_zero():
        student = load_file(os.path.join(output_dir, "student", "model.safetensors"))
        weights = {f"student.{k}": v for k, v in student.items()}
        weights.update({f"losses.{k}": v.detach().clone() for k, v in trainer.distillation_losses.state_dict().items()})
        save_file(weights, os.path.join(output_dir, "weights.safetensors"))
        placement = {
            "teacher_type": type(trainer.teacher_model).__name__,
            "teacher_sharded": all(hasattr(p, "ds_id") for p in trainer.teacher_model.parameters()),
            "summary": trainer.distillation_summary(),
        }
        with open(os.path.join(output_dir, "logs.json"), "w") as handle:
            json.dump(trainer.state.log_history + [placement], handle)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
    # Everything is written; skip interpreter teardown, where DeepSpeed's CPU threads now and then abort the process
    # ("terminate called without an active exception") after a successful run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
