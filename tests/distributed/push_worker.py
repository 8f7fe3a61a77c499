"""Distil a tiny student for 2 steps and push it: `python push_worker.py OUTPUT_DIR REPO_ID [create_pr]`.

Run in a subprocess so that HF_ENDPOINT (read when huggingface_hub is imported) points at the test hub.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import classification_data, config, tiny_bert  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402
from hf_kd.metrics import classification_metrics  # noqa: E402


def main(output_dir: str, repo_id: str, create_pr: bool) -> None:
    args = config(
        output_dir,
        max_steps=2,
        hub_model_id=repo_id,
        hub_private_repo=True,
        per_device_eval_batch_size=8,
        losses="kl,hidden_mse:0.5:projector=linear",
    )
    data = classification_data()
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, seed=2),
        teacher_model=tiny_bert(seed=1),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=classification_metrics,
    )
    trainer.train()
    os.makedirs(os.path.join(output_dir, "teacher"), exist_ok=True)  # like the recipes: must not be uploaded
    trainer.teacher_model.save_pretrained(os.path.join(output_dir, "teacher"))
    trainer.push_to_hub(dataset="synthetic-tokens", create_pr=create_pr, revision="main")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], len(sys.argv) > 3)
