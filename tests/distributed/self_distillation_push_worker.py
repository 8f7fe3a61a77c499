"""Train a tiny BERT with an early exit by self-distillation for 2 steps with ``push_to_hub=True``:
`python self_distillation_push_worker.py OUTPUT_DIR REPO_ID [save_exits] [checkpoints]`.

``save_exits``: ``self_distillation(..., save_exits=True)``. ``checkpoints``: a checkpoint every step, each pushed to
the repo root (``hub_strategy="every_save"``) before the final push.

Run in a subprocess so that HF_ENDPOINT (read when huggingface_hub is imported) points at the test hub.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clean_exit import exit_cleanly  # noqa: E402
from conftest import classification_data, config, tiny_bert  # noqa: E402

from hf_kd.schemes.self_distillation import self_distillation  # noqa: E402


def main(output_dir: str, repo_id: str, flags: list[str]) -> None:
    extra = {"save_strategy": "steps", "save_steps": 1} if "checkpoints" in flags else {}
    args = config(output_dir, max_steps=2, losses="kl", push_to_hub=True, hub_model_id=repo_id, **extra)
    self_distillation(
        tiny_bert(layers=3, seed=2),
        args,
        exits_after=[1],
        save_exits="save_exits" in flags,
        train_dataset=classification_data(n=16),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    exit_cleanly()  # barrier, destroy_process_group, os._exit(0): see clean_exit.py
