"""Where a run that is started again resumes: its last *complete* checkpoint, made under the same set-up; and
reading a model's weights back.

A kill inside a save (out of memory, a preempted job, Ctrl-C) leaves a ``checkpoint-N`` folder without the files
written after the model. ``transformers.Trainer`` writes ``trainer_state.json`` last, so a checkpoint counts as
complete when that file is there and reads as JSON; resuming from an incomplete one would stop every rerun with a
raw ``FileNotFoundError``. Every scheme that resumes from its output folder asks here.

Each checkpoint also records the run's set-up (``hf_kd_run_setup.json``: losses, weights, teachers, the trained
members and a graph's edges, the scheme's settings); resuming under another set-up is refused, since it would
continue the other run (a rerun with a changed graph in the same ``output_dir``, say) rather than start this one.
"""

from __future__ import annotations

import json
import os
import re

from safetensors.torch import load_file
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
RUN_SETUP_NAME = "hf_kd_run_setup.json"


def changed_fields(saved: dict | None, requested: dict) -> str:
    """The fields of ``requested`` that differ from ``saved``, as ``field: saved → requested`` (``saved`` None: a
    record from before set-ups were recorded, nothing to compare, nothing reported).

    Args:
        saved: The set-up read back from a file, or None.
        requested: This run's set-up (JSON-serialisable).

    Returns:
        The differences joined by ``"; "``, empty when there is none.
    """
    if saved is None:
        return ""
    requested = json.loads(json.dumps(requested))  # as it reads back from the file (tuples as lists, ...)
    return "; ".join(
        f"{key}: {saved.get(key)!r} → {value!r}" for key, value in requested.items() if saved.get(key) != value
    )


def without_stage_count(setup: dict | None, stage_count_field: str | None) -> dict | None:
    """A recorded set-up without its scheme's stage count (``rounds``, ``generations``), which records written
    before hf_kd left it out still hold: how many stages follow does not change a finished one.

    Args:
        setup: The set-up read back, or None.
        stage_count_field: The scheme's :attr:`~hf_kd.schemes.registry.SchemeConfig.stage_count_field`, or None.

    Returns:
        The set-up, its ``"scheme"`` without that field.
    """
    scheme = (setup or {}).get("scheme")
    if not stage_count_field or not isinstance(scheme, dict) or stage_count_field not in scheme:
        return setup
    return {**setup, "scheme": {key: value for key, value in scheme.items() if key != stage_count_field}}


def write_run_setup(checkpoint: str, setup: dict) -> None:
    """Record the run's set-up in a checkpoint folder (made if need be), for :func:`check_run_setup` on resuming.

    Args:
        checkpoint: The ``checkpoint-N`` folder.
        setup: The trainer's set-up (JSON-serialisable).
    """
    os.makedirs(checkpoint, exist_ok=True)
    with open(os.path.join(checkpoint, RUN_SETUP_NAME), "w") as handle:
        json.dump(setup, handle, indent=2)


def check_run_setup(checkpoint: str, setup: dict, stage_count_field: str | None = None) -> None:
    """Refuse to resume from ``checkpoint`` when the run that saved it had another set-up.

    Args:
        checkpoint: The ``checkpoint-N`` folder to resume from.
        setup: This run's set-up.
        stage_count_field: The scheme's stage count, left out of the comparison (see :func:`without_stage_count`).

    Raises:
        ValueError: the recorded set-up differs; the message names each difference.
    """
    path = os.path.join(checkpoint, RUN_SETUP_NAME)
    if not os.path.isfile(path):  # saved before hf_kd recorded set-ups, or by a plain Trainer: nothing to compare
        return
    with open(path) as handle:
        changed = changed_fields(without_stage_count(json.load(handle), stage_count_field), setup)
    if changed:
        raise ValueError(
            f"{checkpoint} was saved by a run with another set-up ({changed}): resuming from it would continue that "
            f"run, not this one. Remove the checkpoint-N folders of {os.path.dirname(checkpoint) or '.'} (or give "
            "another output_dir) to start this run afresh."
        )


def last_complete_checkpoint(folder: str) -> str | None:
    """The ``checkpoint-N`` in ``folder`` with the largest N whose save finished.

    Each later one a save left incomplete is skipped with a warning naming it and what it lacks.

    Args:
        folder: A run's output folder.

    Returns:
        The checkpoint's path, or ``None`` for none (or no such folder).
    """
    if not os.path.isdir(folder):
        return None
    checkpoints = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(folder)
        if (match := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(folder, name))
    )
    skipped = []
    resume = None
    for _, name in reversed(checkpoints):
        path = os.path.join(folder, name)
        problem = _incomplete(path)
        if problem is None:
            resume = path
            break
        skipped.append(f"{path} (its {TRAINER_STATE_NAME} {problem})")
    if skipped:
        logger.warning(
            f"skipping {'; '.join(skipped)}: a save was cut short there (a kill while saving). Resuming from "
            f"{resume or 'the start (no complete checkpoint)'} instead; the skipped folder is overwritten when "
            "training reaches its step again."
        )
    return resume


def _incomplete(checkpoint: str) -> str | None:
    """What a checkpoint lacks (its trainer state, written last), or ``None`` when its save finished."""
    state = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(state):
        return "is missing"
    try:
        with open(state) as handle:
            json.load(handle)
    except (OSError, ValueError) as error:
        return f"does not read as JSON ({error})"
    return None


def load_model_weights(model: nn.Module, path: str) -> None:
    """A transformers model's weights from the ``model.safetensors`` its ``save_pretrained`` wrote.

    ``save_pretrained`` leaves out the weights it ties to others (such as an LM head on the embeddings); those may
    be missing.

    Args:
        model: The model to load into.
        path: The ``model.safetensors`` file.

    Raises:
        ValueError: the file misses weights of the model (other than tied ones) or holds weights it lacks.
    """
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: missing {sorted(set(missing) - tied)}, unexpected "
            f"{sorted(unexpected)}."
        )


def load_saved_weights(model: nn.Module, folder: str, what: str = "the model") -> None:
    """Read back into ``model`` the weights its ``save_pretrained(folder)`` wrote.

    A PEFT model's adapter (``adapter_model.safetensors``, the only trainable part) or a transformers model's
    ``model.safetensors``.

    Args:
        model: The model (or PEFT model) to load into.
        folder: The folder ``save_pretrained`` wrote.
        what: What the model is, for the messages.

    Raises:
        ValueError: the folder lacks the file, or its weights do not fit the model.
    """
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        path = os.path.join(folder, "adapter_model.safetensors")
        if not os.path.exists(path):
            raise ValueError(
                f"{folder} has no adapter_model.safetensors: it is not a checkpoint of {what} (a PEFT model)."
            )
        result = set_peft_model_state_dict(model, load_file(path))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{path} does not fit {what}: unexpected {sorted(result.unexpected_keys)}.")
        return
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"{folder} has no model.safetensors: it is not a checkpoint of {what}.")
    load_model_weights(model, path)
