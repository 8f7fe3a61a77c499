"""Teacher caches written by several processes: `torchrun --nproc_per_node 2 cache_worker.py OUT VARIANT`.

``write``: for each cache kind (unpacked, packed top-k, packed sampled), rank 0 first writes it alone
(``all_processes=False``) into OUT/one/KIND while the other waits, then both processes write it together into
OUT/two/KIND — 14 rows in shards of 3, so rank 0 writes shards 0, 2, 4 and rank 1 shards 1, 3. ``mismatch``: the
processes call the writer with different ``top_k`` (cache folder OUT/out); each writes the error it raised to
OUT/refusal-RANK.txt. ``main_only``: only rank 0 calls the writer (``join_timeout=3``) while rank 1 stays away past the
writer's join timeout, busy elsewhere; rank 0 writes the error it raised to OUT/refusal-0.txt.
"""

import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from clean_exit import exit_cleanly  # noqa: E402
from conftest import DDP_TIMEOUT, lm_data, tiny_gpt2  # noqa: E402

from hf_kd.cache import write_teacher_cache  # noqa: E402

KINDS = {
    "unpacked": {"top_k": 8},
    "packed": {"top_k": 8, "packed": True},
    "sampled": {"top_k": 8, "mode": "sampled", "packed": True},
}


def main(output_dir: str, variant: str) -> None:
    torch.set_num_threads(1)
    data, teacher = lm_data(n=14), tiny_gpt2(seed=1)
    options = dict(shard_size=3, batch_size=2, progress=False)
    if variant == "mismatch":  # no group yet: the writer joins the launch's group itself
        rank = int(os.environ["RANK"])
        try:
            write_teacher_cache(teacher, data, os.path.join(output_dir, "out"), top_k=4 + rank, **options)
        except ValueError as error:
            with open(os.path.join(output_dir, f"refusal-{rank}.txt"), "w") as handle:
                handle.write(str(error))
        return
    if variant == "main_only":  # the mistake: the writer called under `if is_main_process:`
        state = PartialState(cpu=True, timeout=timedelta(seconds=DDP_TIMEOUT))
        said = os.path.join(output_dir, "refusal-0.txt")
        if state.is_main_process:
            try:
                write_teacher_cache(teacher, data, os.path.join(output_dir, "out"), top_k=4, join_timeout=3, **options)
            except RuntimeError as error:
                with open(said + ".part", "w") as handle:
                    handle.write(str(error))
                os.replace(said + ".part", said)
        else:  # busy elsewhere (no collective) until rank 0 has given up on it
            for _ in range(600):
                if os.path.exists(said):
                    break
                time.sleep(0.1)
        # gloo closes the connections of a barrier that timed out: the group is gone, so no goodbye barrier
        os._exit(0)
    # The group of a CPU run's Trainer, with the tests' timeout on collectives; the writer shares the work over it.
    state = PartialState(cpu=True, timeout=timedelta(seconds=DDP_TIMEOUT))
    rank = torch.distributed.get_rank()
    for kind, settings in KINDS.items():
        if rank == 0:
            one = os.path.join(output_dir, "one", kind)
            write_teacher_cache(teacher, data, one, all_processes=False, **settings, **options)
        state.wait_for_everyone()
        write_teacher_cache(teacher, data, os.path.join(output_dir, "two", kind), **settings, **options)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_cleanly()  # barrier, destroy_process_group, os._exit(0): see clean_exit.py
