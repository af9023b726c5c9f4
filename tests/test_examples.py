"""The example project and the benchmark harness beside it, kept apart and working together.

``example_project/`` is what a user reads (app, settings, tasks, model client); the
machinery that measures it lives in ``benchmarks/`` (scripts) and ``benchmarks/harness/``
(the herd runner, the baselines, the agents of the goodput and beat benchmarks, the demo).
Checked here, without starting a worker:

- the example imports nothing of the harness, and the package imports neither;
- the benchmarks import one another without a cycle, counting lazy imports (a script that
  reaches another's ``main`` and back is a cycle even when both imports sit in functions);
- a harness's workers register every task the harness sends them: the example's app loads
  only the example's tasks, so the baselines and the benchmarks' agents arrive through
  ``celery worker -I`` (``Herd.includes``), and a run whose workers lack one would only
  time out.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from benchmarks.harness import goodput, herd
from tests.graphs import import_cycle

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (relative imports made absolute)."""
    package = ".".join(path.relative_to(ROOT).parent.parts)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                found.add(f"{base}.{node.module}" if node.module else base)
                found.update(f"{base}.{a.name}" for a in node.names if not node.module)
            else:
                found.add(node.module or "")
    return found


def _benchmark_modules() -> dict[str, Path]:
    """The benchmarks by the name their importers use: scripts by their bare name (they
    import each other from ``benchmarks/`` on ``sys.path``), the harness by its full one."""
    scripts = {p.stem: p for p in BENCHMARKS.glob("*.py")}
    harness = {
        f"benchmarks.harness.{p.stem}": p
        for p in (BENCHMARKS / "harness").glob("*.py")
        if p.stem != "__init__"
    }
    return {**scripts, **harness}


def test_the_example_imports_no_harness_and_the_package_neither() -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for folder, banned in (
            ("example_project", ("benchmarks",)),
            ("celery_fleet", ("benchmarks", "example_project")),
        )
        for path in (ROOT / folder).rglob("*.py")
        for name in _imported(path)
        if name.split(".")[0] in banned
    ]
    assert not bad, "\n".join(bad)


def test_the_benchmarks_import_one_another_without_a_cycle() -> None:
    modules = _benchmark_modules()
    graph = {m: {t for t in _imported(p) if t in modules and t != m} for m, p in modules.items()}
    cycle = import_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _registered(command: list[str]) -> set[str]:
    """The task names a ``celery worker`` started with ``command`` knows: its app's own
    (the config's ``imports``) and its ``-I`` modules, loaded as the worker loads them."""
    app_module = command[command.index("-A") + 1]
    includes = command[command.index("-I") + 1].split(",") if "-I" in command else []
    code = (
        "import importlib, json\n"
        f"app = importlib.import_module({app_module!r}).app\n"
        "app.loader.import_default_modules()\n"
        f"for name in {includes!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(app.tasks)))\n"
    )
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def _load_script(name: str) -> ModuleType:
    """A benchmark script as a module (registered: its dataclasses look themselves up)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SCENARIO = herd.Scenario(agents=1, steps=1)
URL = "redis://127.0.0.1:1"  # never reached: nothing here connects


def test_herd_workers_know_the_task_of_every_mode() -> None:
    command = herd.Herd(SCENARIO, URL)._worker_command("w@%h", "q")
    assert set(herd.TASKS.values()) <= _registered(command)


def test_goodput_workers_know_its_agents_and_whoami() -> None:
    runner = goodput.GoodputHerd(SCENARIO, URL, db=14, burst=0.05, headroom=0.05)
    sent = {f"{goodput.AGENTS_MODULE}.{task}" for task in goodput.KINDS.values()}
    sent.add(f"{goodput.AGENTS_MODULE}.whoami")
    assert sent <= _registered(runner._worker_command("w@%h", "q"))


def test_beat_workers_know_the_agents_its_beat_publishes() -> None:
    beat = _load_script("beat")
    runner = beat.BeatHerd(SCENARIO, URL, args=None)
    sent = {f"{beat.AGENTS_MODULE}.agent", f"{beat.AGENTS_MODULE}.kickoff"}
    assert sent <= _registered(runner._worker_command("w@%h", "q"))


@pytest.mark.parametrize(
    "entry",
    [
        *(f"benchmarks/{name}.py" for name in ("herd", "goodput", "beat", "adaptive", "outage")),
        "-m benchmarks.harness.demo",
    ],
)
def test_a_harness_entry_point_still_answers_help(entry: str) -> None:
    """The scripts that use the harness, and ``make demo``'s module, start and parse."""
    out = subprocess.run(
        [sys.executable, *entry.split(), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:")


def test_the_admission_benchmark_runs_a_tiny_round(redis_url: str) -> None:
    """``make bench`` reads the admission's own keys and arguments (not copies of them): a
    tiny run catches an internal rename the benchmark was not told about."""
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/admission.py",
            *("--redis-url", redis_url, "--samples", "20", "--seconds", "0.3"),
            *("--rounds", "1", "--runs", "1", "--procs", "1", "--no-write"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "slot() / lean Lua" in out.stdout
