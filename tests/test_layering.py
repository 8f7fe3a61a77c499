"""The layers of hf_kd import downwards only: losses / features / positions → teachers / cache / objective → trainer →
schemes (``hf_kd/schemes/``, ``hf_kd/federated.py``) → recipe support (``hf_kd/recipe_support/``) → recipes. This test
reads every module's imports (top-level and inside functions) and fails on one that points up."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "hf_kd"
SCHEMES = ("hf_kd.schemes", "hf_kd.federated")
RECIPE_SUPPORT = ("hf_kd.recipe_support",)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import schemes`
    return found


def layer(module: str) -> int:
    if module.startswith(RECIPE_SUPPORT):
        return 2
    if module.startswith(SCHEMES):
        return 1
    return 0


# The package root (hf_kd/__init__.py) is the public facade: it imports the core and exports the schemes lazily (on
# first use); no module under it may import the root back (checked below).
MODULES = sorted(path for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=[module_name(path) for path in MODULES])
def test_imports_point_down(path):
    here = layer(module_name(path))
    upward = sorted(m for m in imported_modules(path) if m.startswith("hf_kd") and layer(m) > here)
    assert not upward, f"{module_name(path)} (layer {here}) imports a higher layer: {upward}"


@pytest.mark.parametrize("path", MODULES, ids=[module_name(path) for path in MODULES])
def test_no_module_imports_the_package_root(path):
    tree = ast.parse(path.read_text(), str(path))
    absolute = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "hf_kd"]
    assert not absolute, f"{module_name(path)} imports from the package root (import the defining module instead)"


def test_importing_the_package_loads_no_scheme_until_one_is_used():
    code = (
        "import sys, hf_kd; assert not any(m.startswith('hf_kd.schemes') for m in sys.modules), 'eager'; "
        "from hf_kd import run_scheme, BornAgainConfig; import hf_kd.schemes; "
        "assert run_scheme is hf_kd.schemes.run_scheme"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_the_walk_sees_relative_and_function_level_imports(tmp_path):
    # The walk itself: an upward import written relatively inside a function is found.
    assert "hf_kd.schemes.stages" in imported_modules(PACKAGE / "recipe_support" / "schemes.py")
    assert "hf_kd.teachers.ensemble" in imported_modules(PACKAGE / "config.py")  # inside __post_init__
