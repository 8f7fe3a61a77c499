"""Deep mutual learning of two peers: `python mutual_learning_worker.py OUT BATCH` (BATCH rows per process), under
torchrun with 2 processes or alone with 1. Writes the logs and, from rank 0, the peers' final parameters to
OUT/result.pt."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from clean_exit import exit_cleanly  # noqa: E402
from conftest import DDP_TIMEOUT, classification_data, config, tiny_bert  # noqa: E402

from hf_kd.schemes.mutual_learning import MutualLearningTrainer  # noqa: E402


def main(output_dir: str, batch: int) -> None:
    torch.set_num_threads(1)
    peers = [tiny_bert(hidden=16, seed=1), tiny_bert(hidden=32, seed=2)]
    # Plain SGD: Adam would turn float noise in near-zero gradients into whole steps, on either side.
    args = config(
        output_dir,
        per_device_train_batch_size=batch,
        max_steps=4,
        losses="kl",
        learning_rate=0.5,
        optim="sgd",
        ddp_timeout=DDP_TIMEOUT,
    )
    trainer = MutualLearningTrainer(peers, args, train_dataset=classification_data(n=32))
    trainer.train()
    if trainer.accelerator.is_main_process:
        parameters = {name: [p.detach().clone() for p in peer.parameters()] for name, peer in trainer.peers.items()}
        torch.save({"logs": trainer.state.log_history, "parameters": parameters}, f"{output_dir}/result.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    exit_cleanly()  # barrier, destroy_process_group, os._exit(0): see clean_exit.py
