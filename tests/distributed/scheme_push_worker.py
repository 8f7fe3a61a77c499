"""Run every registered scheme for 2 steps with ``push_to_hub=True``: `python scheme_push_worker.py OUTPUT_DIR OWNER`.

Each scheme pushes to ``OWNER/SCHEME``; the student each one returns is also saved to ``OUTPUT_DIR/local/SCHEME``, so
the test can compare what reached the Hub with it. ``OUTPUT_DIR/report.json``: scheme → "pushed" or the refusal.
Run in a subprocess so that HF_ENDPOINT (read when huggingface_hub is imported) points at the test hub.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clean_exit import exit_cleanly  # noqa: E402
from conftest import classification_data, config, tiny_bert  # noqa: E402

from hf_kd.schemes import available_schemes, get_scheme, run_scheme  # noqa: E402
from hf_kd.schemes.cross_modal import paired_views  # noqa: E402


def main(output_dir: str, owner: str) -> None:
    report = {}
    for scheme in available_schemes():
        data = classification_data(n=16)
        if scheme == "cross_modal":
            data = paired_views(data, data.remove_columns("labels"))
        args = config(os.path.join(output_dir, scheme), max_steps=2, push_to_hub=True, hub_model_id=f"{owner}/{scheme}")
        try:
            result = run_scheme(
                scheme,
                args,
                teacher=None if get_scheme(scheme).teachers == "none" else tiny_bert(seed=1),
                make_student=lambda k: tiny_bert(hidden=16, seed=10 + k),
                train_dataset=data,
                make_assistant=lambda hidden_size, layers: tiny_bert(hidden=24, seed=5),
            )
        except ValueError as refusal:
            report[scheme] = f"refused: {refusal}"
            continue
        result.trainer.save_model()  # Trainer semantics, as the recipes do: with push_to_hub, it pushes the student
        result.student.save_pretrained(os.path.join(output_dir, "local", scheme))
        report[scheme] = "pushed"
    with open(os.path.join(output_dir, "report.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split("/")[0])  # given OWNER/REPO, as every push worker is
    exit_cleanly()  # barrier, destroy_process_group, os._exit(0): see clean_exit.py
