"""The package's shape, as rules on its imports (read from the source, not run).

Each subpackage may import only the packages listed for it below; the Celery-independent
core (``store``, ``resilience``, ``admission``, ``coordination``, ``durability``, the
shared ``errors``/``checks``/``clock``/``background``/``logfields`` and ``settings``) never imports
Celery, not even lazily; the facade (``fleet.py``) reaches the Celery glue only through
``celery/app.py`` when it is given an app; only the glue, ``observability`` and the
public aliases import the facade; and the modules' top-level imports have no cycle.
Imports under ``TYPE_CHECKING`` count for the package rules (a type is a dependency too)
but not for cycles, nor as importing Celery (``Fleet(app: Celery)`` is an annotation).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import celery_fleet
from tests.graphs import import_cycle

PACKAGE = Path(celery_fleet.__file__).parent
SHARED = {"errors", "checks", "clock", "background", "logfields"}
CORE = ["store", "resilience", "admission", "coordination", "durability", "distribution", "quality"]
# What each part may import besides itself and SHARED. A dotted entry allows one module.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "checks": set(),
    "clock": set(),
    "background": set(),
    "logfields": set(),  # the extra= fields of log lines
    "store": set(),
    # the store-down strategies answer with the limiter's own value types
    "resilience": {"store", "admission.config", "admission.decision"},
    "admission": {"store", "resilience", "quality"},
    "quality": {"store"},  # the detectors and the quality breaker (issue 25)
    "coordination": {"store"},
    "durability": {"store"},
    "distribution": {"store"},
    "settings": {"store", "admission", "resilience", "durability", "distribution"},
    # observability.tracing: the optional OpenTelemetry span of admission waits
    "fleet": {
        *CORE,
        "settings",
        "observability.counters",
        "observability.tracing",
        "contrib",
        "celery.app",
    },
    "observability": {*CORE, "settings", "fleet"},
    # django_celery_beat: a beat scheduler whose entries run on celery.beat's Jittered
    # schedules and whose headers hold celery.stagger's fleet_jitter option
    "contrib": {"admission", "celery.beat", "celery.stagger"},
    "celery": {*CORE, "settings", "fleet", "observability"},
    "testing": {*CORE, "settings", "fleet", "observability", "celery"},
    "signals": {"celery"},  # public aliases of the glue's modules
    "httpx": {"contrib"},  # the public transports over contrib.httpx_transport (issue 22)
    "httpx2": {"contrib"},  # the same over httpx2, which the openai and anthropic SDKs use
    "metrics": {"observability"},
    "__init__": {*CORE, "fleet", "celery"},
}
NO_CELERY = {*CORE, *SHARED, "settings", "fleet"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool, bool]]:
    """(absolute module, at module level, under TYPE_CHECKING) for each import in ``path``."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, bool, bool]] = []

    def visit(node: ast.AST, top: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = ".".join(package[: len(package) - child.level + 1])
                    target = f"{base}.{child.module}" if child.module else base
                    names = [f"{base}.{a.name}" for a in child.names]
                    targets = [target] if child.module else names
                else:
                    targets = [child.module or ""]
                found.extend((t, top, typing_only) for t in targets)
            elif isinstance(child, ast.Import):
                found.extend((a.name, top, typing_only) for a in child.names)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, top, True)
            elif isinstance(child, ast.If) and "__name__" in ast.unparse(child.test):
                visit(child, False, typing_only)  # runs as a script only
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False, typing_only)
            else:
                visit(child, top, typing_only)

    visit(ast.parse(path.read_text()), True, False)
    return found


def _part(module: str) -> str:
    """The part a module belongs to: its subpackage, or its own name at the top."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _allowed(part: str, target: str) -> bool:
    inner = target.split(".", 1)[1]  # without "celery_fleet."
    rules = ALLOWED[part] | SHARED | {part}
    return any(inner == r or inner.startswith(r + ".") for r in rules)


@pytest.mark.fast
def test_every_part_has_rules_and_a_docstring() -> None:
    parts = {_part(m) for m in _modules()}
    assert parts <= set(ALLOWED), f"no import rules for {sorted(parts - set(ALLOWED))}"
    for sub in PACKAGE.iterdir():
        init = sub / "__init__.py"
        if sub.is_dir() and init.exists():
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            assert "import" in doc, f"{sub.name}/__init__.py must say what it may import"


@pytest.mark.fast
def test_each_part_imports_only_what_its_rules_allow() -> None:
    bad = [
        f"{module} imports {target}"
        for module, path in _modules().items()
        for target, _top, _typing in _imports(path)
        if target.startswith("celery_fleet.") and not _allowed(_part(module), target)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.fast
def test_the_core_never_imports_celery() -> None:
    bad = [
        f"{module} imports {target}"
        for module, path in _modules().items()
        if _part(module) in NO_CELERY
        for target, _top, typing_only in _imports(path)
        if target.split(".")[0] in ("celery", "kombu") and not typing_only
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.fast
def test_the_facade_reaches_the_glue_only_lazily() -> None:
    eager = [
        t
        for t, top, typing_only in _imports(PACKAGE / "fleet.py")
        if top and not typing_only and t.startswith("celery_fleet.celery")
    ]
    assert not eager, f"fleet.py imports the Celery glue at module level: {eager}"


@pytest.mark.fast
def test_top_level_imports_have_no_cycle() -> None:
    modules = _modules()
    graph = {
        m: {t for t, top, typing_only in _imports(p) if top and not typing_only and t in modules}
        for m, p in modules.items()
    }
    cycle = import_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_fleet_runs_where_celery_cannot_be_imported(redis_url: str) -> None:
    """The facade works in a plain process: a slot is taken with Celery made unimportable."""
    code = (
        "import sys; sys.modules['celery'] = None; sys.modules['kombu'] = None\n"
        "from celery_fleet import Fleet, Throttled\n"
        f"f = Fleet(redis_url={redis_url!r}, namespace='layout-{os.getpid()}',\n"
        "          limits={'x': {'rpm': 60, 'max_in_flight': 1}})\n"
        "with f.slot('x'):\n"
        "    print('admitted')\n"
        "f.reset_buckets('x')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "admitted"
