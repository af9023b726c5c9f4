"""Collaborators are typed, never ``Any`` (STYLE.md, practice 1), read from the source.

A module that takes ``fleet: Any`` can reach into anything of it, and mypy checks none of
it: the dependency is invisible. Each module declares instead a small ``Protocol`` naming
what it uses (``StatusSource``, ``RescheduleSource``, ``KeyedFleet``...), or takes the
class itself (a Celery app is a ``Celery``). This test finds a parameter or an annotated
attribute whose name says it holds one of the package's collaborators, annotated with
``Any``. Celery's own untyped objects handed to us (a bootstep's ``worker``, a signal's
``sender``) and redis-py internals are not collaborators of our making and are not named.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import celery_fleet

PACKAGE = Path(celery_fleet.__file__).parent

#: Names that hold a collaborator: the facade, its parts, the Celery app and task.
COLLABORATORS = frozenset(
    {
        "fleet",
        "admission",
        "store",
        "ledger",
        "claims",
        "presence",
        "counters",
        "keeper",
        "deferred",
        "breaker",
        "clock",
        "app",
        "task",
    }
)


def _annotated_names(tree: ast.AST) -> Iterator[tuple[str, ast.expr, int]]:
    """(name, annotation, line) of every annotated parameter and attribute."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs):
                if arg.annotation is not None:
                    yield arg.arg, arg.annotation, arg.lineno
        elif isinstance(node, ast.AnnAssign):
            target = node.target
            if isinstance(target, ast.Name):
                yield target.id, node.annotation, node.lineno
            elif isinstance(target, ast.Attribute):  # self.store: Any = ...
                yield target.attr, node.annotation, node.lineno


def _mentions_any(annotation: ast.expr) -> bool:
    for node in ast.walk(annotation):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "Any | None"
            if _mentions_any(ast.parse(node.value, mode="eval").body):
                return True
        elif isinstance(node, ast.Name) and node.id == "Any":
            return True
    return False


def untyped_collaborators(source: str) -> list[str]:
    return [
        f"{line}: {name}: {ast.unparse(annotation)}"
        for name, annotation, line in _annotated_names(ast.parse(source))
        if name in COLLABORATORS and _mentions_any(annotation)
    ]


def test_the_scan_finds_a_collaborator_typed_any() -> None:
    source = (
        "from typing import Any\n"
        "def limit_status(fleet: Any, name: str) -> None: ...\n"
        "class Task:\n"
        "    store: Any | None = None\n"
        "    def __init__(self, *, app: 'Any') -> None:\n"
        "        self.ledger: Any = None\n"
        "def fine(sender: Any, fleet: 'StatusSource') -> None: ...\n"
    )
    found = {f.split(":")[1].strip() for f in untyped_collaborators(source)}
    assert found == {"fleet", "store", "app", "ledger"}


def test_no_collaborator_is_typed_any() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{hit}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for hit in untyped_collaborators(path.read_text())
    ]
    assert not found, "type these with a Protocol of what the module uses:\n" + "\n".join(found)
