"""The row type of the refusal table (``tests/test_bad_inputs.py``) and the per-area tables beside it.

A per-area table is a module ``tests/refusals_<area>.py`` with a list ``CASES`` of :class:`Case`; ``area_cases``
collects them in name order, so the refusal table (``docs/refusals.md``, generated at build time) is stable.
"""

from __future__ import annotations

import importlib
import pathlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what the user did, as the refusals page shows it
    run: Callable  # run(tmp_path): raises, or returns what ``check`` inspects
    error: type[BaseException] | None = None
    says: str = ""  # a phrase the error must contain (the page's column "hf_kd says")
    check: Callable | None = None  # check(result, tmp_path) for cases whose correct outcome is a value


def area_cases() -> list[Case]:
    cases = []
    for path in sorted(pathlib.Path(__file__).parent.glob("refusals_*.py")):
        cases += importlib.import_module(path.stem).CASES
    return cases
