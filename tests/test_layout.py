"""The package reads top-down: each module imports only modules listed before it.

The order is the README's (Development, Layout); a cycle, or the core reaching up into the
Celery glue, fails here, counting imports under TYPE_CHECKING too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import celery_fleet

ORDER = [
    "errors",
    "checks",
    "config",
    "batch",
    "cluster",
    "sentinel",
    "connect",
    "store",
    "aio",
    "wakeups",
    "calls",
    "providers",
    "backoff",
    "line",
    "decision",
    "local_limiter",
    "fallback",
    "replay",
    "admission",
    "adaptive",
    "breaker",
    "run",
    "steps",
    "counters",
    "presence",
    "deferred",
    "ledger",
    "keeper",
    "locks",
    "election",
    "records",
    "slot",
    "guarded",
    "aslot",
    "loops",
    "circuit",
    "settings",
    "signals",
    "stagger",
    "beat",
    "idempotency",
    "reschedule",
    "fleet",
    "status",
    "metrics",
    "pools",
    "pump",
    "task",
    "cli",
]
CORE = ORDER[: ORDER.index("circuit") + 1]  # the last Celery-independent module
PACKAGE = Path(celery_fleet.__file__).parent


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
            )
            found.update(n.split(".")[1] for n in names if n.startswith("celery_fleet."))
    return found & set(ORDER)


def test_every_module_is_placed() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(ORDER)


def test_each_module_imports_only_modules_before_it() -> None:
    for i, module in enumerate(ORDER):
        later = _imports(module) - set(ORDER[:i])
        assert not later, f"{module} imports {sorted(later)}, which come after it"


def test_the_core_needs_no_celery() -> None:
    for module in CORE:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        names = {
            (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [None])  # type: ignore[list-item]
        }
        assert not any(name == "celery" or name.startswith("celery.") for name in names), module
