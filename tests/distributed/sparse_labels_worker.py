"""A transfer-set run in which most processes see no labeled row: `python sparse_labels_worker.py OUT BATCH
[AGGREGATION]` under torchrun (2 processes, BATCH rows each) or alone (BATCH = the global batch). 64 rows, 2 of them
labeled, a log every step; with AGGREGATION two teachers (``strong``, ``weak``) combined that way. Rank 0 writes
every training log's loss terms to OUT/log.json."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from clean_exit import exit_cleanly  # noqa: E402
from conftest import DDP_TIMEOUT, classification_data, config, tiny_bert  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402


def main(output_dir: str, batch_size: int, aggregation: str | None = None) -> None:
    torch.set_num_threads(1)
    data = classification_data(n=64)
    labels = [label if row in (5, 42) else -100 for row, label in enumerate(data["labels"])]
    data = data.remove_columns("labels").add_column("labels", labels)
    args = config(
        output_dir,
        per_device_train_batch_size=batch_size,
        max_steps=16,
        logging_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        losses="kl,tvd",
        ddp_timeout=DDP_TIMEOUT,
        **({"teacher_aggregation": aggregation} if aggregation else {}),
    )
    teacher = {"strong": tiny_bert(seed=1), "weak": tiny_bert(hidden=16, seed=3)} if aggregation else tiny_bert(seed=1)
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2), teacher_model=teacher, args=args, train_dataset=data
    )
    trainer.train()
    if trainer.is_world_process_zero():
        logs = [
            {key: value for key, value in entry.items() if key in ("loss", "ce", "kl", "tvd") or "/" in key}
            for entry in trainer.state.log_history
            if "loss" in entry
        ]
        with open(os.path.join(output_dir, "log.json"), "w") as handle:
            json.dump(logs, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
    exit_cleanly()  # barrier, destroy_process_group, os._exit(0): see clean_exit.py
