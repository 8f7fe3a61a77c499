"""Run a recipe under FSDP2 on CPU processes: `torchrun --nproc_per_node 2 fsdp2_recipe.py RECIPE.py ARGS...`.

Accelerate enables FSDP on GPU back-ends only; cpu_fsdp keeps the Trainer's Accelerator in FSDP mode over gloo, and
the recipe then runs unchanged, as `accelerate launch --config_file recipes/accelerate/fsdp2.yaml RECIPE.py` would.
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_fsdp  # noqa: E402
from clean_exit import exit_cleanly  # noqa: E402

if __name__ == "__main__":
    cpu_fsdp.enable()
    recipe, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(recipe, run_name="__main__")
    exit_cleanly()  # barrier, destroy_process_group, os._exit(0): see clean_exit.py
