"""How every multi-process test worker ends: ``exit_cleanly()`` after its last write.

Left to interpreter teardown, a process group's threads (gloo's, DeepSpeed's CPU ones) now and then abort a process
that did everything right ("terminate called without an active exception", SIGABRT), most often on a loaded machine.
So a worker waits for the others and closes the group (``hf_kd.recipe_support.cli.leave_process_group``, what the
recipes do), then leaves without teardown.
"""

import os
import sys
from typing import NoReturn

from hf_kd.recipe_support.cli import leave_process_group


def exit_cleanly() -> NoReturn:
    """Barrier and ``destroy_process_group`` when a group is up (a no-op alone), flush, ``os._exit(0)``."""
    leave_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
