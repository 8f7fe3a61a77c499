"""Every public function, class and method of the modules listed in ``MODULES`` has a Google-style docstring that
an API reference (mkdocstrings, Google style) renders whole: an ``Args:`` entry per parameter (a class's
constructor parameters, a dataclass's fields, in the class docstring or ``__init__``'s) and none that the signature
lacks, ``Returns:`` / ``Yields:`` where the body returns or yields a value, and ``Raises:`` naming each exception type
the body raises itself. A field with a ``help`` string (what the command line prints) is documented by that same
text (the help may go on with what is only known at import), so the two cannot drift apart.

Public: the name has no leading underscore and the object is defined in the listed module (a re-export is checked
where it is defined). A method with no docstring of its own that overrides a base class's method inherits that
method's documentation (checked there, or the framework's: ``forward``, ``compute_loss``, callback hooks). Add a
module to ``MODULES`` once its docstrings are written.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap

import pytest

MODULES = [
    "hf_kd.cache",
    "hf_kd.cache_format",
    "hf_kd.checkpoints",
    "hf_kd.checks",
    "hf_kd.config",
    "hf_kd.cross_tokenizer",
    "hf_kd.data",
    "hf_kd.evaluation",
    "hf_kd.features",
    "hf_kd.federated",
    "hf_kd.generation",
    "hf_kd.hub",
    "hf_kd.losses",
    "hf_kd.losses.base",
    "hf_kd.losses.chunked",
    "hf_kd.losses.embedding",
    "hf_kd.losses.functional",
    "hf_kd.losses.intermediate",
    "hf_kd.losses.lm_head",
    "hf_kd.losses.mutual_info",
    "hf_kd.losses.ranking",
    "hf_kd.losses.registry",
    "hf_kd.losses.regression",
    "hf_kd.losses.relation",
    "hf_kd.losses.response",
    "hf_kd.metrics",
    "hf_kd.model_kinds",
    "hf_kd.noise",
    "hf_kd.objective",
    "hf_kd.plots",
    "hf_kd.positions",
    "hf_kd.pretrained",
    "hf_kd.pretrained.ctranslate2_whisper",
    "hf_kd.pretrained.gguf",
    "hf_kd.pretrained.packaged",
    "hf_kd.projectors",
    "hf_kd.ranking",
    "hf_kd.recipe_support",
    "hf_kd.recipe_support.baselines",
    "hf_kd.recipe_support.cli",
    "hf_kd.recipe_support.schemes",
    "hf_kd.recipe_support.speech",
    "hf_kd.recipe_support.tables",
    "hf_kd.schemes",
    "hf_kd.schemes.amalgamation",
    "hf_kd.schemes.born_again",
    "hf_kd.schemes.cross_modal",
    "hf_kd.schemes.graph",
    "hf_kd.schemes.graph_search",
    "hf_kd.schemes.mean_teacher",
    "hf_kd.schemes.multi_teacher",
    "hf_kd.schemes.mutual_learning",
    "hf_kd.schemes.noisy_student",
    "hf_kd.schemes.offline",
    "hf_kd.schemes.peer_cohort",
    "hf_kd.schemes.registry",
    "hf_kd.schemes.self_distillation",
    "hf_kd.schemes.stages",
    "hf_kd.schemes.teacher_assistant",
    "hf_kd.sentence_embeddings",
    "hf_kd.teachers",
    "hf_kd.teachers.adapter_base",
    "hf_kd.teachers.base",
    "hf_kd.teachers.ensemble",
    "hf_kd.teachers.live",
    "hf_kd.teachers.loading",
    "hf_kd.teachers.precomputed",
    "hf_kd.teachers.served",
    "hf_kd.term_log",
    "hf_kd.token_classification",
    "hf_kd.trainer",
    "hf_kd.trainer.batch_loss",
    "hf_kd.trainer.compat",
    "hf_kd.trainer.loss_parts",
    "hf_kd.trainer.members",
    "hf_kd.trainer.reporting",
    "hf_kd.trainer.trainer",
    "hf_kd.views",
]

ARGUMENT_SECTIONS = ("Args", "Arguments", "Parameters")
SECTIONS = (*ARGUMENT_SECTIONS, "Attributes", "Returns", "Yields", "Raises", "Example", "Examples", "Note", "Notes")


def sections(doc: str) -> dict[str, list[str]]:
    """The lines of each Google-style section of ``doc`` (its header at the docstring's own indentation)."""
    found: dict[str, list[str]] = {}
    current = None
    for line in inspect.cleandoc(doc).splitlines():
        header = re.fullmatch(r"([A-Z][A-Za-z ]*):\s*", line)
        if header and header.group(1) in SECTIONS:
            current = header.group(1)
            found.setdefault(current, [])
        elif current and line.strip() and not line[0].isspace():
            current = None  # text back at the docstring's indentation ends the section
        elif current:
            found[current].append(line)
    return found


def entries(lines: list[str]) -> dict[str, str]:
    """``name: text`` entries of a section (the least indented lines start one; deeper ones continue it)."""
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    if not indents:
        return {}
    result: dict[str, str] = {}
    name = None
    for line in lines:
        match = re.match(r"\s*(\*{0,2}[\w.]+)\s*(\([^)]*\))?\s*:(.*)", line)
        if match and len(line) - len(line.lstrip()) == min(indents):
            name = match.group(1)
            result[name] = match.group(3).strip()
        elif name is not None and line.strip():  # a continuation (one not indented is a layout problem)
            result[name] += " " + line.strip()
    return result


def layout_problems(label: str, doc: str) -> list[str]:
    """What renders wrongly under mkdocstrings' Google defaults (``returns_multiple_items``, ``returns_named_value``):
    an Args/Attributes/Raises line at the entries' indentation that is not ``name: text`` (a continuation that is
    not indented), a Returns/Yields text that goes on at its first line's indentation (several values), or that
    opens like ``word:`` (a named value)."""
    problems = []
    for kind, lines in sections(doc).items():
        lines = [line for line in lines if line.strip()]
        if not lines:
            continue
        indent = min(len(line) - len(line.lstrip()) for line in lines)
        if kind in (*ARGUMENT_SECTIONS, "Attributes", "Raises"):
            problems += [
                f"{label}: {kind}: {line.strip()[:40]!r}... is not 'name: text' (indent a continuation further)"
                for line in lines
                if len(line) - len(line.lstrip()) == indent
                and not re.match(r"\s*\*{0,2}[\w.]+\s*(\([^)]*\))?\s*:", line)
            ]
        elif kind in ("Returns", "Yields"):
            if any(len(line) - len(line.lstrip()) <= indent for line in lines[1:]):
                problems.append(f"{label}: {kind}: indent the lines after the first (it reads as several values)")
            if re.match(r"\s*\w+\s*(\([^)]*\))?\s*:", lines[0]):
                problems.append(f"{label}: {kind}: {lines[0].strip()[:40]!r} reads as a named value ('word:')")
    return problems


def documented(doc: str | None, *kinds: str) -> dict[str, str]:
    found = sections(doc or "")
    merged: dict[str, str] = {}
    for kind in kinds:
        for lines in [found[kind]] if kind in found else []:
            merged.update(entries(lines))
    return merged


def own_code(function) -> ast.AST | None:
    """The function's own definition (nested functions and classes left out), or None without source."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return None
    tree = ast.parse(source)
    definition = tree.body[0]
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):  # e.g. a class a decorator returned
        return None
    return definition


def body_nodes(definition: ast.AST):
    """Nodes of ``definition``'s body, not descending into nested functions, lambdas or classes."""
    stack = list(definition.body)
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                stack.append(child)


def raised_types(definition: ast.AST) -> set[str]:
    names = set()
    for node in body_nodes(definition):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id[0].isupper():  # `raise error` re-raises what it caught
                names.add(target.id)
            elif isinstance(target, ast.Attribute):
                names.add(target.attr)
    return names - {"NotImplementedError"}  # an abstract method's marker, not a refusal


def returns_value(definition: ast.AST) -> tuple[bool, bool]:
    returns = yields = False
    for node in body_nodes(definition):
        if isinstance(node, ast.Return) and node.value is not None:
            returns = returns or not (isinstance(node.value, ast.Constant) and node.value.value is None)
        elif isinstance(node, (ast.Yield, ast.YieldFrom)):
            yields = True
    return returns, yields


def parameter_names(function, skip_first: bool) -> list[str]:
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return []
    if skip_first and parameters:
        parameters = parameters[1:]
    names = []
    for parameter in parameters:
        prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
        names.append(prefix + parameter.name)
    return names


def argument_problems(label: str, names: list[str], args: dict[str, str]) -> list[str]:
    given = {name.lstrip("*") for name in args}
    wanted = {name.lstrip("*") for name in names}
    problems = [f"{label}: parameter {name!r} is missing from Args:" for name in names if name.lstrip("*") not in given]
    problems += [f"{label}: Args: documents {name!r}, which is not a parameter" for name in sorted(given - wanted)]
    return problems


def function_problems(label: str, function, doc: str | None, skip_first: bool) -> list[str]:
    if not (doc and doc.strip()):
        return [f"{label}: no docstring"]
    problems = argument_problems(label, parameter_names(function, skip_first), documented(doc, *ARGUMENT_SECTIONS))
    problems += layout_problems(label, doc)
    definition = own_code(function)
    if definition is None:
        return problems
    found = sections(doc)
    returns, yields = returns_value(definition)
    if yields and "Yields" not in found:
        problems.append(f"{label}: yields, and has no Yields: section")
    elif returns and not yields and "Returns" not in found:
        problems.append(f"{label}: returns a value, and has no Returns: section")
    raised = raised_types(definition)
    if raised and "Raises" not in found:
        problems.append(f"{label}: raises {sorted(raised)}, and has no Raises: section")
    elif raised:
        listed = documented(doc, "Raises")
        problems += [f"{label}: Raises: does not name {name}" for name in sorted(raised - set(listed))]
    return problems


def in_package(cls) -> bool:
    return cls.__module__.split(".")[0] == "hf_kd"


def constructor_parameters(cls) -> list[str]:
    """What a user passes to ``cls(...)`` that hf_kd defines: a dataclass's fields (not those of a base outside
    hf_kd, e.g. ``TrainingArguments``), else the parameters of the nearest ``__init__`` defined in hf_kd."""
    if dataclasses.is_dataclass(cls):
        external = {
            field.name
            for base in cls.__mro__[1:]
            if dataclasses.is_dataclass(base) and not in_package(base)
            for field in dataclasses.fields(base)
        }
        return [field.name for field in dataclasses.fields(cls) if field.init and field.name not in external]
    owner = next((base for base in cls.__mro__ if "__init__" in base.__dict__), object)
    if not in_package(owner):
        return []
    return parameter_names(owner.__dict__["__init__"], skip_first=True)


def class_problems(label: str, cls) -> list[str]:
    doc = cls.__dict__.get("__doc__")
    if not (doc and doc.strip()) or (dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}(")):
        return [f"{label}: no docstring"]  # (a dataclass without one gets its signature as __doc__)
    init = cls.__dict__.get("__init__")
    init_doc = getattr(init, "__doc__", None) if init is not None else None
    layout = layout_problems(label, doc) + (layout_problems(f"{label}.__init__", init_doc) if init_doc else [])
    args = {**documented(doc, *ARGUMENT_SECTIONS), **documented(init_doc, *ARGUMENT_SECTIONS)}
    attributes = documented(doc, "Attributes")
    parameters = constructor_parameters(cls)
    given = {name.lstrip("*") for name in {**args, **attributes}}
    problems = layout + [
        f"{label}: parameter {name!r} is missing from Args:" for name in parameters if name.lstrip("*") not in given
    ]
    problems += [
        f"{label}: Args: documents {name!r}, which is not a parameter"
        for name in sorted({name.lstrip("*") for name in args} - {name.lstrip("*") for name in parameters})
    ]
    if dataclasses.is_dataclass(cls):
        for field in dataclasses.fields(cls):
            help_text = field.metadata.get("help")
            text = args.get(field.name, attributes.get(field.name))
            # The help may go on after the docstring's text (a list built at import, e.g. the registered schemes).
            if help_text and text is not None and not " ".join(help_text.split()).startswith(" ".join(text.split())):
                problems.append(f"{label}: the docstring of {field.name!r} differs from its help: {help_text!r}")
    raised = set()
    for name in ("__init__", "__post_init__"):
        definition = own_code(cls.__dict__[name]) if name in cls.__dict__ else None
        raised |= raised_types(definition) if definition is not None else set()
    listed = {**documented(doc, "Raises"), **documented(init_doc, "Raises")}
    problems += [
        f"{label}: raises {name} on construction; Raises: does not name it" for name in sorted(raised - set(listed))
    ]
    for name, attribute in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        problems += member_problems(f"{label}.{name}", cls, name, attribute)
    return problems


def member_problems(label: str, cls, name: str, attribute) -> list[str]:
    if isinstance(attribute, property):
        if attribute.__doc__:
            return []
        inherited = any(name in base.__dict__ for base in cls.__mro__[1:])
        return [] if inherited else [f"{label}: no docstring"]
    skip_first = not isinstance(attribute, staticmethod)
    function = attribute.__func__ if isinstance(attribute, (staticmethod, classmethod)) else attribute
    if not inspect.isfunction(function) or function.__qualname__ != f"{cls.__qualname__}.{name}":
        return []  # not a method written in this class (e.g. a loss's ``function = F.forward_kl``)
    if not function.__doc__ and any(name in base.__dict__ for base in cls.__mro__[1:]):
        return []  # an override: the base documents it
    return function_problems(label, function, function.__doc__, skip_first)


def public_objects(module):
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            yield name, value


def module_problems(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    problems = [] if (module.__doc__ or "").strip() else [f"{module_name}: no module docstring"]
    for name, value in public_objects(module):
        label = f"{module_name}.{name}"
        if inspect.isclass(value):
            problems += class_problems(label, value)
        else:
            problems += function_problems(label, value, value.__doc__, skip_first=False)
    return problems


@pytest.mark.parametrize("module_name", MODULES)
def test_public_api_is_documented(module_name):
    problems = module_problems(module_name)
    assert not problems, "\n".join(problems)


def test_every_config_field_is_documented_with_its_help():
    from hf_kd.config import DistillationConfig

    args = documented(DistillationConfig.__doc__, *ARGUMENT_SECTIONS)
    own = vars(DistillationConfig)["__annotations__"]  # what the config adds to TrainingArguments
    fields = [field for field in dataclasses.fields(DistillationConfig) if field.name in own]
    assert {"losses", "temperature", "teacher_aggregation", "token_level"} <= {field.name for field in fields}
    for field in fields:
        assert field.name in args, f"{field.name} is missing from DistillationConfig's Args:"
        assert " ".join(args[field.name].split()) == " ".join(field.metadata["help"].split()), field.name


def test_the_checker_finds_what_is_missing():
    def undocumented_argument(alpha, beta):
        """Summary.

        Args:
            alpha: the first.
            gamma: not a parameter.

        Returns:
            Nothing useful.
        """
        if alpha:
            raise ValueError("no")
        return beta

    problems = function_problems("f", undocumented_argument, undocumented_argument.__doc__, skip_first=False)
    assert problems == [
        "f: parameter 'beta' is missing from Args:",
        "f: Args: documents 'gamma', which is not a parameter",
        "f: raises ['ValueError'], and has no Raises: section",
    ]
    assert function_problems("g", lambda: None, None, skip_first=False) == ["g: no docstring"]

    def misaligned(alpha):
        """Summary.

        Args:
            alpha: the first,
            and more about it.

        Returns:
            One :class:`int` per row,
            and more about it.
        """
        return alpha

    assert function_problems("h", misaligned, misaligned.__doc__, skip_first=False) == [
        "h: Args: 'and more about it.'... is not 'name: text' (indent a continuation further)",
        "h: Returns: indent the lines after the first (it reads as several values)",
        "h: Returns: 'One :class:`int` per row,' reads as a named value ('word:')",
    ]

    @dataclasses.dataclass
    class Settings:
        """Settings.

        Args:
            rate: The rate.
            depth: How deep.
        """

        rate: float = dataclasses.field(default=1.0, metadata={"help": "The step size."})
        depth: int = 1
        width: int = 2

        @property
        def area(self):
            return self.depth * self.width

        def scaled(self, factor):
            """The rate times ``factor``."""
            return self.rate * factor

    assert class_problems("S", Settings) == [
        "S: parameter 'width' is missing from Args:",
        "S: the docstring of 'rate' differs from its help: 'The step size.'",
        "S.area: no docstring",
        "S.scaled: parameter 'factor' is missing from Args:",
        "S.scaled: returns a value, and has no Returns: section",
    ]
