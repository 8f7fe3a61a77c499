"""The docs site builds in strict mode, and every example on its pages runs or names things that exist.

- ``test_site_builds_strictly``: ``mkdocs build --strict`` of ``mkdocs.yml`` into a temporary folder (a broken link,
  a missing reference, a docstring that does not render or a generated part that fails stops it), and the generated
  pages list every exported name, every module (the API reference), every loss and every scheme. Skipped, saying
  so, where the ``docs`` extra is not installed.
- ``test_python_examples``: each page's ```` ```python ```` blocks run in order in one namespace, in a fresh
  temporary folder (tiny models from configs, a few steps).
- ``test_shell_examples``: each page's ```` ```bash ```` commands name repository files that exist, ``make`` targets
  of the Makefile, extras of ``pyproject.toml``, and flags that the recipe or script they run accepts.
- ``test_code_blocks_are_python_or_bash``: no third kind of block escapes both checks.
- The checkers themselves on planted cases: the shell check, the build hook (unknown markers, a scheme without its
  page, a stale reference; the refusals page holds every row of ``refusal_table()``), and the griffe extension that
  turns the docstrings' Sphinx roles into cross-references (a stale ``hf_kd`` path is a warning: the build fails).

The pages are ``docs/**/*.md``, the files they include (``<!-- hf_kd:include PATH -->``) and ``README.md``, whose
examples run and whose bash commands are checked as the docs' are; ``test_readme_links_resolve`` checks that its
relative links (read on GitHub and the Hub, not by MkDocs) name files that exist and headings those files have.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import pathlib
import pkgutil
import re
import shlex
import sys
import textwrap
import types

import pytest
from conftest import ROOT

ROOT = pathlib.Path(ROOT)
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
INCLUDE = re.compile(r"^<!-- hf_kd:include (?P<path>\S+) -->$", re.M)
PARSED_CONFIGS = ("DistillationConfig", "FederatedConfig")  # the library's argument dataclasses recipes parse
REPO_TOP = {path.name for path in ROOT.iterdir() if not path.name.startswith(".")} - {"outputs", "build"}


def doc_pages() -> list[pathlib.Path]:
    """The docs' Markdown pages, the repository files they include, and the README."""
    pages = sorted(path for path in DOCS.rglob("*.md") if "hooks" not in path.parts)
    included = {ROOT / match["path"] for page in pages for match in INCLUDE.finditer(page.read_text(encoding="utf-8"))}
    return pages + sorted(included) + [ROOT / "README.md"]


def page_id(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(path: pathlib.Path) -> list[tuple[str, int, str]]:
    """``(language, line, code)`` of every fenced block of a page, dedented."""
    text = path.read_text(encoding="utf-8")
    return [
        (match["lang"], text.count("\n", 0, match.start()) + 2, textwrap.dedent(match["code"]))
        for match in FENCE.finditer(text)
    ]


def pages_with(language: str) -> list[pathlib.Path]:
    return [page for page in doc_pages() if any(lang == language for lang, _, _ in code_blocks(page))]


# --- (a) the site -------------------------------------------------------------------------------------------------


def test_site_builds_strictly(tmp_path, monkeypatch):
    pytest.importorskip("mkdocs", reason='the docs extra is not installed (pip install -e ".[docs]")')
    pytest.importorskip("mkdocstrings", reason='the docs extra is not installed (pip install -e ".[docs]")')
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    import hf_kd
    from hf_kd.losses import available_losses
    from hf_kd.schemes import available_schemes

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")  # Material's banner about its successor, printed on every build
    site, warnings = tmp_path / "site", _Warnings()
    logging.getLogger("mkdocs").addHandler(warnings)
    try:
        build(load_config(str(ROOT / "mkdocs.yml"), site_dir=str(site), strict=True))  # raises on any warning
    except Abort:
        if not warnings.messages:
            raise  # a build error, not a warning
    finally:
        logging.getLogger("mkdocs").removeHandler(warnings)
    assert not warnings.messages, "the strict build warns:\n" + "\n".join(warnings.messages)

    exports = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in hf_kd.__all__:
        assert f"<code>{name}</code></a>" in exports, f"the API index has no link for hf_kd.{name}"
    reference = "".join(page.read_text(encoding="utf-8") for page in (site / "api").glob("*/index.html"))
    for module in pkgutil.walk_packages(hf_kd.__path__, "hf_kd."):
        assert module.ispkg or f'id="{module.name}"' in reference, f"the API reference lacks {module.name}"
    losses = (site / "losses" / "index.html").read_text(encoding="utf-8")
    for name in available_losses():
        assert f'id="{name}"' in losses, f"the losses page has no section for {name!r}"
    for name in available_schemes():
        page = (site / "schemes" / name / "index.html").read_text(encoding="utf-8")
        assert f"--scheme {name}" in page, f"the page of scheme {name!r} lacks its generated registry entry"
    refusals = (site / "refusals" / "index.html").read_text(encoding="utf-8")
    assert "teacher_model is the student itself" in refusals


class _Warnings(logging.Handler):
    """Collects the build's warnings (strict mode fails on them; the test names them)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def docs_hook():
    """``docs/hooks/hf_kd_docs.py``, imported as MkDocs imports it."""
    pytest.importorskip("mkdocs", reason='the docs extra is not installed (pip install -e ".[docs]")')
    spec = importlib.util.spec_from_file_location("docs_hook_hf_kd_docs", DOCS / "hooks" / "hf_kd_docs.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    return hook


def test_the_refusals_page_holds_every_row_of_the_refusal_table():
    from test_bad_inputs import refusal_table

    page = docs_hook().refusals_page()
    rows = refusal_table().splitlines()[2:]
    assert rows and all(row in page for row in rows)
    assert f"{len(rows)} refusals in all." in page


def test_the_hook_refuses_unknown_markers_and_schemes_without_a_page():
    from mkdocs.exceptions import PluginError

    from hf_kd.schemes import available_schemes

    hook = docs_hook()
    with pytest.raises(PluginError, match="unknown docs marker <!-- hf_kd:lossess -->"):
        hook.on_page_markdown("# Losses\n\n<!-- hf_kd:lossess -->\n", page=None, config=None, files=None)
    with pytest.raises(PluginError, match="no scheme 'nope' is registered"):
        hook.generated("scheme", "nope")
    # A role in a loss's or scheme's docstring: a re-exported name links where it is defined; a stale one fails.
    text = ":class:`~hf_kd.teachers.LiveTeacher` and :func:`hf_kd.noise`"
    assert (
        hook.markdown_text(text) == "[`LiveTeacher`][hf_kd.teachers.live.LiveTeacher] and [`hf_kd.noise`][hf_kd.noise]"
    )
    with pytest.raises(PluginError, match="names 'hf_kd.no_such_module.f', which is not an object of hf_kd"):
        hook.markdown_text(":func:`hf_kd.no_such_module.f`")
    pages = [types.SimpleNamespace(src_uri=f"schemes/{name}.md") for name in available_schemes()]
    assert hook.on_files(pages, config=None) == pages
    with pytest.raises(PluginError, match=r"registered schemes without a page: \['born_again'\]"):
        hook.on_files([page for page in pages if page.src_uri != "schemes/born_again.md"], config=None)
    with pytest.raises(PluginError, match=r"scheme pages of no registered scheme: \['dml'\]"):
        hook.on_files([*pages, types.SimpleNamespace(src_uri="schemes/dml.md")], config=None)


def test_sphinx_roles_become_checked_cross_references(caplog):
    # The griffe extension on planted roles, seen from hf_kd.losses.response: an absolute path, a relative one, an
    # imported name followed to its definition, a method of it, another library's name, and a stale hf_kd path.
    griffe = pytest.importorskip("griffe", reason='the docs extra is not installed (pip install -e ".[docs]")')
    spec = importlib.util.spec_from_file_location("docs_sphinx_roles", DOCS / "hooks" / "sphinx_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    response = griffe.load("hf_kd", search_paths=[str(ROOT)])["losses.response"]
    expected = {
        ":func:`~hf_kd.losses.functional.forward_kl`": "[`forward_kl`][hf_kd.losses.functional.forward_kl]",
        ":mod:`.functional`": "[`functional`][hf_kd.losses.functional]",
        ":class:`DistillationLoss`": "[`DistillationLoss`][hf_kd.losses.base.DistillationLoss]",
        ":meth:`~DistillationLoss.setup`": "[`setup`][hf_kd.losses.base.DistillationLoss.setup]",
        ":class:`transformers.TrainingArguments`": "`transformers.TrainingArguments`",
    }
    for role, markdown in expected.items():
        assert roles.markdown_roles(response, role) == markdown
    with caplog.at_level(logging.WARNING):
        assert roles.markdown_roles(response, ":func:`hf_kd.no_such_function`") == "`hf_kd.no_such_function`"
    assert "'hf_kd.no_such_function', which is not an object of hf_kd" in caplog.text


# --- (b) the examples ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", pages_with("python"), ids=page_id)
def test_python_examples(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples write where they stand ("out/", "cache/")
    # The page runs as a module of its own, as a script runs as __main__: a class it defines has an importable path.
    module = types.ModuleType("docs_example_" + re.sub(r"\W", "_", page_id(page)))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for language, line, code in code_blocks(page):
        if language == "python":
            before = dict(module.__dict__)
            exec(compile(code, f"{page_id(page)}:{line}", "exec"), module.__dict__)  # a failure names page and line
            made = {name for name, value in module.__dict__.items() if before.get(name, object()) is not value}
            printed = capsys.readouterr().out
            # An example shows something: it binds the names the page goes on with, or prints its result.
            assert made or printed.strip(), f"{page_id(page)}:{line} runs but neither binds a name nor prints anything"


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([\w.-]+):", text, re.M))


def extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = \[", section, re.M))


@functools.cache
def recipe_module(script: str) -> types.ModuleType:
    """A recipe imported from its file (its argument dataclasses; nothing runs: ``main()`` is behind ``__name__``)."""
    name = "docs_recipe_" + pathlib.Path(script).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def script_flags(script: str, tokens: list[str]) -> set[str]:
    """The flags ``script`` accepts: a recipe's ``HfArgumentParser`` dataclasses (and, for recipes with schemes, the
    ``--scheme`` chosen in ``tokens``), or the ``"--flag"`` strings of another script's argument parser."""
    path = ROOT / script
    if not script.startswith("recipes/"):
        return set(re.findall(r"[\"'](--[\w-]+)[\"']", path.read_text(encoding="utf-8")))
    from transformers import HfArgumentParser

    module = recipe_module(script)
    # What a recipe parses: its own *Arguments dataclass, and the DistillationConfig (or FederatedConfig) it imports.
    classes = [
        value
        for name, value in vars(module).items()
        if isinstance(value, type)
        and dataclasses.is_dataclass(value)
        and (value.__module__ == module.__name__ and name.endswith("Arguments") or name in PARSED_CONFIGS)
    ]
    if "parse_recipe_args" in vars(module):
        from hf_kd.recipe_support.schemes import SchemeChoice
        from hf_kd.schemes import get_scheme

        scheme = tokens[tokens.index("--scheme") + 1] if "--scheme" in tokens else "offline"
        classes += [SchemeChoice, get_scheme(scheme).config]
    parser = HfArgumentParser(classes)
    return {option for action in parser._actions for option in action.option_strings} | {"--config"}


def commands(code: str) -> list[list[str]]:
    """A bash block's commands as token lists: continuation lines joined, comments and ``VAR=value`` prefixes
    dropped, ``&&`` / ``;`` split."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        command: list[str] = []
        for token in tokens + [";"]:
            if token in ("&&", ";", "||"):
                while command and re.fullmatch(r"[A-Z_]+=.*", command[0]):
                    command.pop(0)
                if command:
                    found.append(command)
                command = []
            else:
                command.append(token)
    return found


def check_command(tokens: list[str]) -> list[str]:
    """What a shell command names that does not exist (empty when everything does)."""
    problems = []
    for token in tokens:
        for value in [token, *token.split("=", 1)[1:]]:  # --config=FILE names FILE too
            for path in value.split(","):  # --teachers A,B
                if "/" in path and path.split("/")[0] in REPO_TOP and not (ROOT / path).exists():
                    problems.append(f"{path} does not exist")
    if tokens[0] == "make":
        targets = makefile_targets()
        problems += [f"make has no target {t!r}" for t in tokens[1:] if "=" not in t and t not in targets]
    if tokens[0] in ("pip", "pip3") or tokens[:3] == ["python", "-m", "pip"]:
        for token in tokens:
            match = re.fullmatch(r"[\w.-]*\[([\w,-]+)\]", token)
            if match and token.startswith("."):
                problems += [f"pyproject.toml has no extra {x!r}" for x in match[1].split(",") if x not in extras()]
    scripts = [index for index, token in enumerate(tokens) if token.endswith(".py")]
    if scripts and tokens[scripts[0]].split("/")[0] in ("recipes", "benchmarks", "tests"):
        script = tokens[scripts[0]]
        if (ROOT / script).exists():
            accepted = script_flags(script, tokens)
            flags = [token.split("=", 1)[0] for token in tokens[scripts[0] + 1 :] if token.startswith("--")]
            problems += [f"{script} takes no flag {flag}" for flag in flags if flag not in accepted]
    return problems


@pytest.mark.parametrize("page", pages_with("bash"), ids=page_id)
def test_shell_examples(page):
    problems = []
    for language, line, code in code_blocks(page):
        if language == "bash":
            for tokens in commands(code):
                problems += [f"{page_id(page)}:{line}: {problem}" for problem in check_command(tokens)]
    assert not problems, "\n".join(problems)


def test_code_blocks_are_python_or_bash():
    others = [
        f"{page_id(page)}:{line}: ```{language}"
        for page in doc_pages()
        for language, line, _ in code_blocks(page)
        if language not in ("python", "bash")
    ]
    assert not others, "an example is run (```python) or checked (```bash); these are neither:\n" + "\n".join(others)


MARKDOWN_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and the Hub) give a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: pathlib.Path) -> list[str]:
    """The relative links of a Markdown file whose file does not exist or whose ``#anchor`` no heading there has."""
    problems = []
    for match in MARKDOWN_LINK.finditer(page.read_text(encoding="utf-8")):
        target = match["target"]
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not the repository's
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
            if anchor not in {github_anchor(heading) for heading in headings}:
                problems.append(f"{target}: {path or page.name} has no heading with the anchor #{anchor}")
    return problems


def test_readme_links_resolve(tmp_path):
    assert broken_links(ROOT / "README.md") == []
    # The checker on planted links: a missing file, a missing anchor, a good one (heading with code and a colon).
    (tmp_path / "page.md").write_text("# `kl`: the loss\n", encoding="utf-8")
    planted = tmp_path / "README.md"
    planted.write_text(
        "[a](page.md#kl-the-loss) [b](nope.md) [c](page.md#nope) [d](https://x.org/y)\n", encoding="utf-8"
    )
    assert [problem.split(":")[0] for problem in broken_links(planted)] == ["nope.md", "page.md#nope"]


def test_shell_checks_catch_what_is_missing():
    # The checker itself, on planted mistakes: a missing file, a make target, an extra, a recipe flag, a script flag.
    assert check_command(["python", "recipes/no_such_recipe.py"]) == ["recipes/no_such_recipe.py does not exist"]
    assert check_command(["make", "demo", "no-such-target"]) == ["make has no target 'no-such-target'"]
    assert check_command(["pip", "install", "-e", ".[docs,nope]"]) == ["pyproject.toml has no extra 'nope'"]
    recipe = ["python", "recipes/text_classification.py", "--scheme", "born_again", "--generations", "2"]
    assert check_command(recipe) == []
    assert check_command(recipe + ["--rounds", "2"]) == ["recipes/text_classification.py takes no flag --rounds"]
    assert check_command(["python", "benchmarks/kd_step_cost.py", "--no_such_flag"]) == [
        "benchmarks/kd_step_cost.py takes no flag --no_such_flag"
    ]
    assert commands("FOO=1 make demo && make test  # both\nmake \\\n  lint") == [
        ["make", "demo"],
        ["make", "test"],
        ["make", "lint"],
    ]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
