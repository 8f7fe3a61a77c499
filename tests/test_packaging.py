"""The distribution holds every package of hf_kd: an editable install hides a missing one, ``pip install .`` does
not."""

import os

import pytest
from conftest import ROOT


def test_every_hf_kd_package_is_in_the_distribution():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        listed = set(tomllib.load(handle)["tool"]["setuptools"]["packages"])
    found = {
        os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for folder, _, files in os.walk(os.path.join(ROOT, "hf_kd"))
        if "__init__.py" in files
    }
    assert found and found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
