"""MkDocs hook: the docs pages' generated parts, written at build time from hf_kd's registries and from the tests.

A page asks for a generated part with an HTML comment alone on its line:

- ``<!-- hf_kd:losses -->``: every registered loss (:func:`hf_kd.losses.available_losses`): its id, family, formula,
  options with their defaults, paper, what it reads from each model and its default weight.
- ``<!-- hf_kd:schemes -->``: the registered schemes (:func:`hf_kd.schemes.available_schemes`), one row each.
- ``<!-- hf_kd:scheme NAME -->``: one scheme's registry entry, its settings (its config dataclass: field, flag,
  default, the ``Args:`` text of its docstring) and the refusals the tests hold for it.
- ``<!-- hf_kd:refusals -->``: every refusal of ``tests/test_bad_inputs.py`` and ``tests/refusals_*.py``, grouped by
  the file it comes from (the rows ``python tests/test_bad_inputs.py`` prints as one table).
- ``<!-- hf_kd:exports -->``: every name ``hf_kd`` exports, linked to its API reference.
- ``<!-- hf_kd:benchmark-scripts -->``: every script in ``benchmarks/`` with the first sentence of its docstring.
- ``<!-- hf_kd:include PATH -->``: a Markdown file of the repository (its first heading dropped).
- ``<!-- hf_kd:api PAGE -->``: the mkdocstrings directives of an API reference page: every module of hf_kd is on one
  page (:data:`API_PAGES`), a new module included without anyone listing it.

An unknown marker, a registered scheme without its page (``docs/schemes/NAME.md``) or a page of a scheme that is not
registered fails the build, so the site cannot fall behind the registries. Links written as ``[text][hf_kd.x.y]``
are resolved by mkdocs-autorefs against the API reference; a strict build fails on any that does not resolve.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import sys

from mkdocs.exceptions import PluginError

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SIDES = ("student", "teacher")
MARKER = re.compile(r"^<!-- hf_kd:(?P<kind>[\w-]+)(?: (?P<argument>\S+))? -->$", re.MULTILINE)

# The loss modules of hf_kd.losses, in the order the catalogue lists them, with the family each holds.
FAMILIES = {
    "response": "response",
    "intermediate": "intermediate",
    "relation": "relation",
    "mutual_info": "mutual information",
    "embedding": "embedding",
    "ranking": "ranking",
    "regression": "regression",
}

# What a scheme takes as teacher_model (hf_kd.schemes.registry.TEACHERS), in words.
SCHEME_TEACHERS = {
    "none": "none: its teachers train with the student (give no `teacher`)",
    "one": "one teacher (a model, a folder, a cache or a served teacher)",
    "many": "one teacher or several (a list or a dict, combined by `teacher_aggregation`)",
}

# The refusal cases of each scheme, by the prefix of their id in the tests' tables.
SCHEME_REFUSALS = {
    "offline": ("aggregation-", "aggregator-", "weighted-one-teacher", "recipe-one-of-teachers"),
    "cross_modal": ("cross-modal-", "views-"),
    "teacher_assistant": ("teacher-assistant-", "chain-", "recipe-chain-of-teachers"),
    "born_again": ("born-again-",),
    "noisy_student": ("noisy-", "pseudo-label-", "scheme-noise-twice"),
    "mean_teacher": ("mean-teacher-", "recipe-mean-teacher-", "rampup-", "resume-incomplete-checkpoint-mean-teacher"),
    "mutual_learning": ("dml-", "recipe-dml-", "online-", "resume-incomplete-checkpoint-mutual"),
    "self_distillation": ("byot-", "self-distillation-", "resume-incomplete-checkpoint-self-distillation"),
    "graph": ("graph-",),
    "amalgamation": ("amalgamation-",),
}

# Titles of the per-area refusal tables (tests/refusals_AREA.py); an area not listed gets its file name.
REFUSAL_AREAS = {
    "test_bad_inputs": "Configuration, data, teachers and the trainer",
    "adaptation": "Domain adaptation: confidence thresholds and class balance",
    "aggregation": "Several teachers",
    "amalgamation": "Knowledge amalgamation",
    "cache": "Teacher caches",
    "federated": "Federated distillation",
    "graph": "Distillation graphs",
    "hub_embeddings": "The Hub and sentence embeddings",
    "llm": "Causal LMs' own logits",
    "pretrained": "Packaged pretrained models",
    "schemes": "Schemes",
    "served": "Served teachers",
    "stages_security": "Stages, resuming, loss imports and cache files",
    "tasks": "Tasks",
    "token_classification": "Named entities",
}

# The API reference pages (docs/api/NAME.md, marker <!-- hf_kd:api NAME -->) and the modules each documents, in order:
# a name, or PREFIX.* for the modules under PREFIX not claimed before, or * for every module no page claims (the
# internals page, expanded last). So a new module is in the reference without anyone adding it.
API_PAGES = {
    "config": ("hf_kd.config",),
    "trainer": ("hf_kd.trainer.trainer", "hf_kd.trainer.members", "hf_kd.trainer.reporting"),
    "losses": (
        "hf_kd.losses.registry",
        "hf_kd.losses.base",
        "hf_kd.losses.functional",
        *(f"hf_kd.losses.{module}" for module in FAMILIES),
        "hf_kd.losses.*",
    ),
    "teachers": (
        "hf_kd.teachers.base",
        "hf_kd.teachers.live",
        "hf_kd.teachers.adapter_base",
        "hf_kd.teachers.served",
        "hf_kd.teachers.precomputed",
        "hf_kd.teachers.ensemble",
        "hf_kd.teachers.*",
        "hf_kd.cache",
        "hf_kd.cache_format",
    ),
    "schemes": (
        "hf_kd.schemes.registry",
        "hf_kd.schemes.stages",
        "hf_kd.schemes.offline",
        "hf_kd.schemes.multi_teacher",
        "hf_kd.schemes.*",
    ),
    "data": (
        "hf_kd.data",
        "hf_kd.noise",
        "hf_kd.views",
        "hf_kd.features",
        "hf_kd.positions",
        "hf_kd.projectors",
        "hf_kd.metrics",
        "hf_kd.evaluation",
        "hf_kd.generation",
        "hf_kd.cross_tokenizer",
        "hf_kd.hub",
        "hf_kd.plots",
    ),
    "tasks": ("hf_kd.sentence_embeddings", "hf_kd.ranking", "hf_kd.token_classification", "hf_kd.federated"),
    "pretrained": ("hf_kd.pretrained.packaged", "hf_kd.pretrained.gguf", "hf_kd.pretrained.*"),
    "internals": ("hf_kd.objective", "hf_kd.term_log", "hf_kd.checks", "hf_kd.checkpoints", "hf_kd.model_kinds", "*"),
}

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(?P<tilde>~?)(?P<target>[\w.]+)`")


def markdown_text(text: str) -> str:
    """A docstring's text as Markdown: Sphinx roles become links (public ``hf_kd`` objects) or code.

    Args:
        text: Docstring text with ``:func:`~hf_kd.x.y``` style roles.

    Returns:
        The text with each role replaced by ``[`y`][hf_kd.x.y]`` or by ```y```.
    """

    def replace(match: re.Match) -> str:
        target = match["target"]
        shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
        path = canonical(target) if target.startswith("hf_kd.") else None
        return f"[`{shown}`][{path}]" if path else f"`{shown}`"

    return ROLE.sub(replace, text)


def canonical(target: str) -> str | None:
    """Where the API reference documents the object ``target`` names (a re-exported name is followed to the module
    that defines it); ``None`` for a private or undocumented object, which the reference does not show.

    Raises:
        PluginError: ``target`` names no object: a stale reference in a docstring.
    """
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            break
        path = obj.__name__ if inspect.ismodule(obj) else reference(obj) if hasattr(obj, "__qualname__") else None
        if path is None or not inspect.getdoc(obj) or any(part.startswith("_") for part in path.split(".")):
            return None
        return path
    raise PluginError(f"a docstring names {target!r}, which is not an object of hf_kd.")


def parse_docstring(obj) -> tuple[str, dict[str, str]]:
    """The text before a docstring's sections and its ``Args:`` entries.

    Args:
        obj: A class or function with a Google-style docstring.

    Returns:
        ``(text, {argument: description})``, both as Markdown.
    """
    from griffe import Docstring

    text, arguments = [], {}
    for section in Docstring(inspect.cleandoc(obj.__doc__ or ""), parser="google").parse(warn_missing_types=False):
        if section.kind.value == "text":
            text.append(section.value)
        elif section.kind.value in ("parameters", "other parameters"):
            arguments.update({item.name: " ".join(item.description.split()) for item in section.value})
    return markdown_text("\n\n".join(text)), {name: markdown_text(doc) for name, doc in arguments.items()}


def summary(text: str) -> str:
    """The first paragraph of ``text`` (a docstring's summary), on one line."""
    return " ".join(text.strip().split("\n\n")[0].split())


def cell(text: str) -> str:
    """``text`` made safe for one cell of a Markdown table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def reference(obj) -> str:
    """The identifier mkdocstrings gives ``obj`` on the API pages: its module and qualified name."""
    return f"{obj.__module__}.{obj.__qualname__}"


def losses_page() -> str:
    """Every registered loss: a summary table, then one section per loss."""
    from hf_kd.losses import available_losses, get_loss, resolve_loss_class

    by_family: dict[str, list[str]] = {family: [] for family in FAMILIES}
    for name in available_losses():
        module = resolve_loss_class(name).__module__.rsplit(".", 1)[-1]
        if module not in by_family:
            raise PluginError(f"loss {name!r} lives in hf_kd.losses.{module}, a family the docs hook does not know.")
        by_family[module].append(name)
    table = ["| id | family | loss | options (defaults) |", "|---|---|---|---|"]
    sections = []
    for module, names in by_family.items():
        if names:
            sections.append(f"## {FAMILIES[module].capitalize()} losses\n")
        for name in names:
            cls = resolve_loss_class(name)
            text, arguments = parse_docstring(cls)
            options = [
                (parameter.name, parameter.default)
                for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]
                if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
            ]
            shown_options = ", ".join(f"`{key}={default!r}`" for key, default in options) or "none"
            table.append(
                f"| [`{name}`](#{name}) | {FAMILIES[module]} | {cell(summary(text))} | {cell(shown_options)} |"
            )
            loss = get_loss(name)
            reads = {side: ", ".join(f"`{need}`" for need in sorted(loss.side_needs(side))) for side in SIDES}
            facts = [
                ("family", FAMILIES[module]),
                ("class", f"[`{cls.__name__}`][{reference(cls)}]"),
                ("reads", f"student: {reads['student']}; teacher: {reads['teacher']}"),
                ("default weight", f"{cls.default_weight:g}" + (" (its paper's)" if cls.default_weight != 1 else "")),
                (
                    "reduction",
                    "a sum over the distilled positions, divided by their count over the accumulated batch"
                    if cls.per_position
                    else "a mean over the micro-batch, divided by the number of accumulated micro-batches",
                ),
                ("paper", cls.paper or "–"),
            ]
            if cls.min_batch_size > 1:
                facts.append(("batch", f"at least {cls.min_batch_size} examples per process (identically 0 below)"))
            if cls.min_group_size > 1:
                facts.append(("candidates", f"at least {cls.min_group_size} per query"))
            if cls.needs_sample_index:
                facts.append(("data", "a `sample_index` column ([`add_sample_index`][hf_kd.data.add_sample_index])"))
            if cls.cross_vocabulary:
                facts.append(("vocabularies", "teacher and student tokenizers may differ"))
            if cls.linear_in_teacher:
                facts.append(("sampled cache", 'unbiased with a `mode="sampled"` teacher cache (temperature 1)'))
            rows = "\n".join(f"| {key} | {cell(value)} |" for key, value in facts)
            option_lines = "\n".join(
                f"- `{key}` (default `{default!r}`): {arguments.get(key, '')}".rstrip(": ") for key, default in options
            )
            sections.append(
                f"### `{name}` {{#{name}}}\n\n{text}\n\n| | |\n|---|---|\n{rows}\n\n"
                + (f"Options:\n\n{option_lines}\n" if options else "No options.\n")
            )
    return "\n".join(table) + "\n\n" + "\n".join(sections)


def schemes_table() -> str:
    """One row per registered scheme: its page, what it takes as teacher, and its description."""
    from hf_kd.schemes import available_schemes, get_scheme

    rows = ["| scheme | teachers | several trainers | what it does |", "|---|---|---|---|"]
    for name in available_schemes():
        entry = get_scheme(name)
        rows.append(
            f"| [`{name}`]({name}.md) | {entry.teachers} | {'yes' if entry.stages else 'no'} | "
            f"{cell(markdown_text(entry.description))} |"
        )
    return "\n".join(rows)


def scheme_part(name: str) -> str:
    """One scheme's registry entry, settings and refusals."""
    from hf_kd.schemes import available_schemes, get_scheme

    if name not in available_schemes():
        raise PluginError(f"<!-- hf_kd:scheme {name} -->: no scheme {name!r} is registered ({available_schemes()}).")
    entry = get_scheme(name)
    config = entry.config
    text, arguments = parse_docstring(config)
    facts = [
        ("registry name", f'`{name}`: `run_scheme("{name}", ...)`, `--scheme {name}` in the recipes'),
        ("settings", f"[`{config.__name__}`][{reference(config)}]"),
        ("run function", f"[`{entry.run.__name__}`][{reference(entry.run)}]"),
        ("teachers", SCHEME_TEACHERS[entry.teachers]),
        (
            "trainers",
            "several in one process (stages, peers): one device or DDP, not DeepSpeed or FSDP"
            if entry.stages
            else "one `DistillationTrainer`: every engine it supports",
        ),
    ]
    lines = ["## In the registry", "", "| | |", "|---|---|", *(f"| {key} | {cell(value)} |" for key, value in facts)]
    lines.append("")
    fields = dataclasses.fields(config)
    if fields:
        lines += ["## Settings", "", f"Each is also a recipe flag. {' '.join(text.split())}", ""]
        lines += ["| setting | flag | default | meaning |"]
        lines.append("|---|---|---|---|")
        for field in fields:
            default = field.default if field.default is not dataclasses.MISSING else "required"
            meaning = (arguments.get(field.name) or field.metadata.get("help", "")).removeprefix(f"{name}: ")
            lines.append(f"| `{field.name}` | `--{field.name}` | `{default!r}` | {cell(meaning)} |")
    else:
        lines += ["## Settings", "", "None of its own: `DistillationConfig` and the teachers say it all."]
    cases = [case for case in refusal_cases() if case.id.startswith(SCHEME_REFUSALS.get(name, ()))]
    lines += ["", "## Refused", ""]
    if cases:
        lines += ["Each row is a test case; the full list: [What hf_kd refuses](../refusals.md).", ""]
        lines += ["| input | hf_kd says |", "|---|---|", *map(refusal_row, cases)]
    else:
        lines.append("Nothing of its own; the general refusals apply ([What hf_kd refuses](../refusals.md)).")
    return "\n".join(lines)


_REFUSALS: list | None = None


def refusal_cases() -> list:
    """Every case of the refusal tables (loaded once per build: importing the tests builds tiny models)."""
    global _REFUSALS
    if _REFUSALS is None:
        tests = str(ROOT / "tests")
        if tests not in sys.path:
            sys.path.insert(0, tests)
        _REFUSALS = [case for case in importlib.import_module("test_bad_inputs").CASES if case.error is not None]
    return _REFUSALS


def refusal_row(case) -> str:
    """A case as a row of the refusal table (the same row as ``tests/test_bad_inputs.py``'s ``refusal_table``)."""
    return f"| {case.input} | `{case.error.__name__}`: “{case.says}…” |"


def refusals_page() -> str:
    """The refusal table, one section per file of cases."""
    cases = refusal_cases()
    area_of = {}  # id(case) -> the area file it comes from; the others are tests/test_bad_inputs.py's own
    for path in sorted((ROOT / "tests").glob("refusals_*.py")):
        area = path.stem.removeprefix("refusals_")
        area_of.update({id(case): area for case in importlib.import_module(path.stem).CASES})
    areas: dict[str, list] = {}
    for case in cases:
        areas.setdefault(area_of.get(id(case), "test_bad_inputs"), []).append(case)
    parts = [f"{len(cases)} refusals in all.\n"]
    for area, rows in areas.items():
        source = "tests/test_bad_inputs.py" if area == "test_bad_inputs" else f"tests/refusals_{area}.py"
        title = REFUSAL_AREAS.get(area, area.replace("_", " ").capitalize())
        parts.append(f"## {title}\n\nFrom `{source}`.\n\n| input | hf_kd says |\n|---|---|")
        parts.append("\n".join(map(refusal_row, rows)) + "\n")
    return "\n".join(parts)


def exports_table() -> str:
    """Every name in ``hf_kd.__all__``, linked to its reference, with the first sentence of its docstring."""
    import hf_kd

    rows = ["| name | what it is |", "|---|---|"]
    for name in sorted(hf_kd.__all__, key=str.lower):
        obj = getattr(hf_kd, name)
        text, _ = parse_docstring(obj)
        rows.append(f"| [`{name}`][{reference(obj)}] | {cell(summary(text))} |")
    return "\n".join(rows)


def benchmark_scripts() -> str:
    """Every ``benchmarks/*.py`` with the first sentence of its module docstring and its command."""
    rows = ["| script | what it measures |", "|---|---|"]
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if not doc:
            raise PluginError(f"benchmarks/{path.name} has no docstring saying what it measures.")
        rows.append(f"| `python benchmarks/{path.name}` | {cell(markdown_text(summary(doc)))} |")
    return "\n".join(rows)


def include(path: str) -> str:
    """A Markdown file of the repository, without its first heading (the page has its own), its relative links made
    relative to ``docs/`` (a link to a file outside ``docs/`` would leave the site: refused)."""
    file = (ROOT / path).resolve()
    if ROOT not in file.parents or not file.is_file():
        raise PluginError(f"<!-- hf_kd:include {path} -->: no such file in the repository.")

    def relink(match: re.Match) -> str:
        target = pathlib.Path(os.path.normpath(file.parent / match["target"]))
        if DOCS not in target.parents:
            raise PluginError(f"{path} links to {match['target']}, which is outside docs/ and so not in the site.")
        return f"]({target.relative_to(DOCS).as_posix()})"

    text = re.sub(r"\A# .*\n", "", file.read_text(encoding="utf-8"), count=1)
    return re.sub(r"\]\((?P<target>(?![a-z]+:|#)[^)\s]+)\)", relink, text)


_API: dict[str, list[str]] | None = None


def api_modules() -> dict[str, list[str]]:
    """Each API page's modules: every module of hf_kd (packages' ``__init__`` re-export and are left out) on exactly
    one page, by :data:`API_PAGES`."""
    global _API
    if _API is None:
        import hf_kd

        left = sorted(module.name for module in pkgutil.walk_packages(hf_kd.__path__, "hf_kd.") if not module.ispkg)
        _API = {}
        for page in sorted(API_PAGES, key=lambda name: "*" in API_PAGES[name]):  # the catch-all page last
            claimed = []
            for pattern in API_PAGES[page]:
                if pattern == "*":
                    matches = list(left)
                elif pattern.endswith(".*"):
                    matches = [name for name in left if name.startswith(pattern[:-1])]
                else:
                    matches = [pattern] if pattern in left else []
                claimed += matches
                left = [name for name in left if name not in matches]
            _API[page] = claimed
    return _API


def api_page(page: str) -> str:
    """The mkdocstrings directives of an API page, one per module."""
    if page not in API_PAGES:
        raise PluginError(f"<!-- hf_kd:api {page} -->: no such API page; the pages are {sorted(API_PAGES)}.")
    return "\n\n".join(f"::: {module}" for module in api_modules()[page])


def generated(kind: str, argument: str | None) -> str:
    """The Markdown a marker stands for."""
    parts = {
        "losses": losses_page,
        "schemes": schemes_table,
        "refusals": refusals_page,
        "exports": exports_table,
        "benchmark-scripts": benchmark_scripts,
    }
    if kind in parts and argument is None:
        return parts[kind]()
    if kind == "scheme" and argument:
        return scheme_part(argument)
    if kind == "include" and argument:
        return include(argument)
    if kind == "api" and argument:
        return api_page(argument)
    raise PluginError(f"unknown docs marker <!-- hf_kd:{kind}{' ' + argument if argument else ''} -->.")


def on_files(files, config):
    """Refuse a build where a registered scheme has no page, or a scheme page names no registered scheme."""
    from hf_kd.schemes import available_schemes

    pages = {
        pathlib.PurePosixPath(file.src_uri).stem
        for file in files
        if file.src_uri.startswith("schemes/") and file.src_uri.endswith(".md")
    } - {"index"}
    registered = set(available_schemes())
    if registered - pages:
        raise PluginError(f"registered schemes without a page: {sorted(registered - pages)}: add docs/schemes/NAME.md.")
    if pages - registered:
        raise PluginError(f"scheme pages of no registered scheme: {sorted(pages - registered)}.")
    return files


def on_page_markdown(markdown, page, config, files):
    """Replace every marker of the page by what it stands for."""
    return MARKER.sub(lambda match: generated(match["kind"], match["argument"]), markdown)
