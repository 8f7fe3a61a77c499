"""Distil a tiny student for 2 steps and push it: `python push_worker.py OUTPUT_DIR REPO_ID [create_pr] [lora]
[private] [checkpoints] [zero3|fsdp2]`.

``lora``: the student is a LoRA adapter on the teacher's own base (``AdapterBaseTeacher``), pushed as an adapter.
``private``: the repo is made private by ``push_to_hub(private=True)`` rather than ``hub_private_repo``.
``checkpoints``: ``push_to_hub=True`` with ``hub_strategy="checkpoint"`` and a checkpoint every step, so the Trainer
pushes during training.

Run in a subprocess so that HF_ENDPOINT (read when huggingface_hub is imported) points at the test hub.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_fsdp  # noqa: E402
from clean_exit import exit_cleanly  # noqa: E402
from conftest import DDP_TIMEOUT, ROOT, classification_data, config, tiny_bert  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402
from hf_kd.metrics import classification_metrics  # noqa: E402
from hf_kd.teachers import AdapterBaseTeacher  # noqa: E402


def main(output_dir: str, repo_id: str, flags: list[str], engine: str | None = None) -> None:
    lora = "lora" in flags
    extra = {}
    if "checkpoints" in flags:
        extra.update(push_to_hub=True, hub_strategy="checkpoint", save_strategy="steps", save_steps=1)
    if engine == "zero3":
        extra["deepspeed"] = os.path.join(ROOT, "recipes", "accelerate", "ds_zero3.json")
    if engine == "fsdp2":
        cpu_fsdp.enable()
        extra.update(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]})
    args = config(
        output_dir,
        **extra,
        max_steps=2,
        ddp_timeout=DDP_TIMEOUT,
        hub_model_id=repo_id,
        hub_private_repo="private" not in flags,
        per_device_eval_batch_size=8,
        losses="kl" if lora else "kl,hidden_mse:0.5:projector=linear",
    )
    data = classification_data()
    if lora:
        import peft

        student = peft.get_peft_model(
            tiny_bert(seed=1),
            peft.LoraConfig(
                r=4, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"
            ),
        )
        teacher = AdapterBaseTeacher(student)
    else:
        student, teacher = tiny_bert(hidden=16, seed=2), tiny_bert(seed=1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=classification_metrics,
    )
    trainer.train()
    if trainer.teacher_model is not None and engine is None:  # like the recipes: a teacher copy, not uploaded
        trainer.teacher_model.save_pretrained(os.path.join(output_dir, "teacher"))
    trainer.push_to_hub(
        dataset="synthetic-tokens",
        create_pr="create_pr" in flags,
        revision="main",
        **({"private": True} if "private" in flags else {}),
    )


if __name__ == "__main__":
    flags = sys.argv[3:]
    engine = next((flag for flag in flags if flag in ("zero3", "fsdp2")), None)
    main(sys.argv[1], sys.argv[2], flags, engine)
    exit_cleanly()  # barrier, destroy_process_group, os._exit(0): see clean_exit.py
