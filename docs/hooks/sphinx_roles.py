"""Griffe extension (mkdocs.yml loads it into mkdocstrings): Sphinx roles in hf_kd's docstrings become links.

hf_kd's Google-style docstrings name other objects with Sphinx roles — ``:func:`~hf_kd.losses.functional.kl```,
``:class:`DistillationConfig```, ``:meth:`setup```, ``:mod:`.functional``` — which Markdown would print as they
are. Each role is resolved the way Python resolves the name where the docstring is written: a path from ``hf_kd``, a
relative path (leading dots, from the docstring's package), or a name seen from the documented object, its class or
its module (an imported name is followed to its definition). A role that resolves to a public hf_kd object becomes a
cross-reference ``[`name`][hf_kd.path]``, which mkdocs-autorefs links and a strict build checks; one that resolves to
a private or undocumented object (the reference shows neither) or to another library's
(``transformers.TrainingArguments``) is shown as code; one that names an
hf_kd path that does not exist is a warning, which fails the strict build: a stale reference.
"""

from __future__ import annotations

import logging
import re

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(?P<tilde>~?)(?P<target>\.*[\w.]+)`")
PACKAGE = "hf_kd"
# Under MkDocs' logger, so that a strict build counts the warnings (and fails on them).
logger = logging.getLogger("mkdocs.plugins.hf_kd_docs.sphinx_roles")


def _lookup(collection, path: str):
    """The object at ``path`` with aliases followed to their definition; ``None`` where there is none in hf_kd."""
    try:
        found = collection[path]
        while isinstance(found, griffe.Alias):
            found = found.final_target
    except (KeyError, ValueError, IndexError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    return found


def _scopes(obj) -> list:
    """Where a bare name in ``obj``'s docstring is looked up: the object, its parents, up to its module."""
    scopes, current = [], obj
    while current is not None:
        scopes.append(current)
        if current.is_module:
            break
        current = current.parent
    return scopes


def resolve(obj, target: str):
    """The hf_kd object a role in ``obj``'s docstring names, or ``None``.

    Args:
        obj: The documented object whose docstring holds the role.
        target: The role's target as written (``hf_kd.x.y``, ``.x``, ``y``).

    Returns:
        The griffe object, aliases followed; ``None`` when the name is not an hf_kd object.
    """
    collection = obj.modules_collection
    if target.startswith("."):
        module = obj.module
        package = module if module.is_init_module else module.parent
        dots = len(target) - len(target.lstrip("."))
        for _ in range(dots - 1):
            package = package.parent
        return _lookup(collection, f"{package.path}.{target.lstrip('.')}")
    if target.split(".")[0] == PACKAGE:
        return _lookup(collection, target)
    for scope in _scopes(obj):
        found = _lookup(collection, f"{scope.path}.{target}")
        if found is not None:
            return found
    return None


def markdown_roles(obj, text: str) -> str:
    """``text`` with every role replaced by a cross-reference or by code.

    Args:
        obj: The documented object (the context of relative names).
        text: Its docstring.

    Returns:
        The docstring, roles replaced.
    """

    def replace(match: re.Match) -> str:
        target = match["target"]
        shown = target.lstrip(".").rsplit(".", 1)[-1] if match["tilde"] else target.lstrip(".")
        found = resolve(obj, target)
        if found is None:
            if target.startswith(".") or target.split(".")[0] == PACKAGE:
                logger.warning(f"{obj.path}: the docstring names {target!r}, which is not an object of {PACKAGE}")
            return f"`{shown}`"
        if any(part.startswith("_") for part in found.path.split(".")) or not found.docstring:
            return f"`{shown}`"  # private or undocumented: the reference has no entry to link to
        return f"[`{shown}`][{found.path}]"

    return ROLE.sub(replace, text)


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        """Rewrite the roles in every docstring of ``pkg``.

        Args:
            pkg: The loaded package.
            loader: The loader (unused).
            **kwargs: Further arguments griffe passes (unused).
        """
        pending = [pkg]
        while pending:
            obj = pending.pop()
            if obj.docstring is not None:
                obj.docstring.value = markdown_roles(obj, obj.docstring.value)
            pending.extend(member for member in obj.members.values() if not member.is_alias)
