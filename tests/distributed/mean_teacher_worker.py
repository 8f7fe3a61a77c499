"""A mean-teacher run for the EMA rule under DDP: `python mean_teacher_worker.py OUT` under torchrun (2 processes).
Every process records the student's parameters after each optimizer step and, at the end, its teacher's; each writes
them to OUT/rank{R}.pt."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from clean_exit import exit_cleanly  # noqa: E402
from conftest import DDP_TIMEOUT, classification_data, config, tiny_bert  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402
from hf_kd.schemes.mean_teacher import EMATeacher  # noqa: E402


class RecordStudent(TrainerCallback):
    def __init__(self, student):
        self.student, self.steps = student, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append([p.detach().clone() for p in self.student.parameters()])


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    student = tiny_bert(hidden=16, seed=2)
    initial = [p.detach().clone() for p in student.parameters()]
    args = config(
        output_dir,
        per_device_train_batch_size=4,
        max_steps=6,
        losses="logit_mse",
        learning_rate=0.05,
        ddp_timeout=DDP_TIMEOUT,
    )
    teacher = EMATeacher(student, decay=0.8)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data())
    recorder = RecordStudent(student)
    trainer.add_callback(recorder)
    trainer.train()
    rank = trainer.accelerator.process_index
    teacher_parameters = [p.detach().clone() for p in teacher.model.parameters()]
    torch.save(
        {"initial": initial, "steps": recorder.steps, "teacher": teacher_parameters}, f"{output_dir}/rank{rank}.pt"
    )


if __name__ == "__main__":
    main(sys.argv[1])
    exit_cleanly()  # barrier, destroy_process_group, os._exit(0): see clean_exit.py
