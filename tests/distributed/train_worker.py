"""One distillation run for the multi-process tests: `python train_worker.py OUT BATCH ACCUM [ENGINE]` under torchrun
or not, ENGINE being `ddp` (default), `zero2` or `zero3` (DeepSpeed, CPU accelerator) or `fsdp2` (see cpu_fsdp.py).

Tiny GPT-2 teacher/student, rows with uneven supervised-token counts (exact for the per-token response losses), KL +
TVD + a hidden-state loss with a learned projector (so the loss's own parameters must be synchronised too, and under
DeepSpeed optimised beside the engine's optimizer; rows are unpadded because that loss averages per micro-batch over
real tokens). Chunked runs leave the projector out (chunk_size takes logit losses only). Rank 0 writes the final
student weights, the loss parameters and the log history to OUT.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_fsdp  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from clean_exit import exit_cleanly  # noqa: E402
from conftest import DDP_TIMEOUT, VOCAB, config, lm_data, tiny_gpt2  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from hf_kd import AdapterBaseTeacher, DistillationTrainer, write_teacher_cache  # noqa: E402
from hf_kd.data import add_sample_index  # noqa: E402

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes")


def deepspeed_config(stage: int) -> str:
    """The DeepSpeed config the recipes ship (what `--deepspeed` and the accelerate zero*.yaml files use)."""
    return os.path.join(RECIPES, "accelerate", f"ds_zero{stage}.json")


def main(output_dir: str, batch_size: int, accumulation: int, engine: str = "ddp") -> None:
    """``engine``: ``ddp`` (default; one process without torchrun), ``zero2``, ``zero3`` or ``fsdp2``; with
    ``-chunked`` (``ddp-chunked``, ``zero3-chunked``) the token KD is chunked (``chunk_size=5``); with ``-resume`` a
    second run resumes from the first one's step-1 checkpoint (``uninterrupted.safetensors`` holds the first's); with
    ``-crd`` the losses are KL + CRD and every process writes its memory banks before and after training; ``-lora``
    a LoRA student, ``-adapterbase`` taught by its own base; ``-onpolicy`` on its own samples; ``-cache`` taught from
    a full-vocabulary teacher cache."""
    torch.set_num_threads(1)
    engine, _, variant = engine.partition("-")
    extra = {"deepspeed": deepspeed_config(int(engine[-1]))} if engine.startswith("zero") else {}
    if engine == "fsdp2":
        cpu_fsdp.enable()
        extra["fsdp"] = True
        extra["fsdp_config"] = {"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}
    if variant == "chunked":
        extra["chunk_size"] = 5
    if variant == "onpolicy":  # the student's own samples: generation steps in lock-step with sharded weights
        extra.update(on_policy_fraction=1.0, generation_max_new_tokens=4)
    if variant == "resume":  # AdamW: the optimizers' state must resume too; a checkpoint after the first step
        extra.update(optim="adamw_torch", learning_rate=0.05, save_strategy="steps", save_steps=1)

    def make_trainer(folder):
        args = config(
            folder,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            **{"optim": "sgd", "learning_rate": 0.5, **extra},
            lr_scheduler_type="constant",
            train_sampling_strategy="sequential",
            ddp_timeout=DDP_TIMEOUT,
            losses=LOSSES.get(variant, "kl,tvd,hidden_mse:1.0:projector=linear"),
        )
        data = lm_data(n=16, padded=False)
        student = tiny_gpt2(hidden=16, layers=1, seed=2)
        if variant == "onpolicy":  # many stop tokens: processes finish their samples after different numbers of steps
            student.generation_config.eos_token_id = list(range(1, 40))
            student.generation_config.pad_token_id = 0
        if variant in ("lora", "adapterbase"):  # a LoRA student: only its adapters train and are saved
            lora = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
            student = peft.get_peft_model(student, lora)
        if variant in ("crd", "cache"):  # row ids: CRD's memory banks, the cache's rows
            data = add_sample_index(data)
        teacher = tiny_gpt2(seed=1)
        if variant == "adapterbase":  # the teacher is the student's own base, adapters off
            teacher = AdapterBaseTeacher(student)
        if variant == "cache":  # the teacher's full distributions on disk, written once (each process its shards)
            path = os.path.join(output_dir, "cache")
            teacher = write_teacher_cache(teacher, data, path, top_k=VOCAB, dtype="float32", progress=False)
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)

    trainer = make_trainer(output_dir)
    if variant == "crd":  # each process's memory banks before and after training
        save_file(banks(trainer), os.path.join(output_dir, f"banks_before_{trainer.args.process_index}.safetensors"))
    trainer.train()
    if variant == "crd":
        save_file(banks(trainer), os.path.join(output_dir, f"banks_after_{trainer.args.process_index}.safetensors"))
    if variant == "onpolicy":  # the student's own samples: generation steps in lock-step with sharded weights
        extra.update(on_policy_fraction=1.0, generation_max_new_tokens=4)
    if variant == "resume":
        save_weights(trainer, output_dir, "uninterrupted.safetensors")
        trainer = make_trainer(os.path.join(output_dir, "resumed"))
        trainer.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-1"))
    save_weights(trainer, output_dir, "weights.safetensors")
    if trainer.is_world_process_zero():
        teacher_parameters = [] if trainer.teacher_model is None else list(trainer.teacher_model.parameters())
        placement = {
            "teacher_type": type(trainer.teacher_model).__name__,
            "teacher_sharded": all(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in teacher_parameters),
            "summary": trainer.distillation_summary(),
        }
        with open(os.path.join(output_dir, "logs.json"), "w") as handle:
            json.dump(trainer.state.log_history + [placement], handle)


LOSSES = {
    "chunked": "kl,tvd",
    "crd": "kl,crd:0.8:num_negatives=8",
    "onpolicy": "jsd",
    "cache": "kl",
}  # default: kl,tvd,hidden_mse with a projector


def banks(trainer):
    crd = trainer.distillation_losses[1]
    return {"student": crd.student_memory.clone(), "teacher": crd.teacher_memory.clone()}


def save_weights(trainer, output_dir, name):
    """The student's saved weights (``student.*``) and the losses' learned parts (``losses.*``) in one file."""
    folder = os.path.join(output_dir, "student")
    trainer.save_model(folder)  # under ZeRO-3 and FSDP2 this gathers the shards
    if trainer.is_world_process_zero():
        saved = "adapter_model.safetensors" if hasattr(trainer.model, "peft_config") else "model.safetensors"
        weights = {f"student.{k}": v for k, v in load_file(os.path.join(folder, saved)).items()}
        weights.update({f"losses.{k}": v.detach().clone() for k, v in trainer.distillation_losses.state_dict().items()})
        save_file(weights, os.path.join(output_dir, name))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
    exit_cleanly()  # barrier, destroy_process_group, os._exit(0): see clean_exit.py
