"""What importing celery-fleet costs, and what it adds to every ``celery`` command.

Every figure comes from fresh interpreters, one per measurement, the kinds alternating (their
order rotates every round) so a load change on a shared machine hits them all alike:

- ``bare``: ``import celery_fleet``;
- ``quickstart``: ``from celery import Celery; from celery_fleet import Fleet, fleet_task``
  (the Quick start's imports);
- ``floor``: ``from celery import Celery; import celery.app.task, redis``: what those two names
  cannot avoid (Celery's ``Task``, which ``FleetTask`` subclasses, and redis-py, which
  ``Fleet`` talks through). ``quickstart / floor`` is what the package adds;
- ``help with`` / ``help without``: ``celery --help``, the whole process, with the
  ``celery.commands`` entry point of celery-fleet as installed, and without it.

"Without" is the same environment with celery-fleet's entry points filtered out of
``importlib.metadata.entry_points`` (the only way Celery finds plugins) by a launcher both sides
run: the two differ in that one entry point and nothing else (same interpreter, same
site-packages, same launcher), which a second venv without the package could not promise.
The launcher checks that ``fleet`` is listed with, and absent without.

Timed in the child: wall (``perf_counter``) and CPU (``process_time``) around the import; for
``celery --help`` the child's whole CPU (user + sys, from the parent's ``getrusage``) and
wall. Peak RSS (``ru_maxrss``) per kind. Bytecode is cached in a temporary directory
(``PYTHONPYCACHEPREFIX``; a warm-up round fills it) as for an installed package, even when the
environment sets ``PYTHONDONTWRITEBYTECODE``.

``--before DIR`` measures a second tree in the same run (its package first on
``PYTHONPATH``), e.g. ``git archive HEAD~3 | tar -x -C /tmp/before``: then every kind runs
for both trees, alternating, and the table gains after/before ratios.

Usage::

    .venv/bin/python benchmarks/imports.py [--rounds 15] [--before DIR] [--append]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import machine  # benchmarks/ is on sys.path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

IMPORTS = {
    "bare": "import celery_fleet",
    "quickstart": "from celery import Celery; from celery_fleet import Fleet, fleet_task",
    "floor": "from celery import Celery; import celery.app.task, redis",
}
HELP = ("help with", "help without")

_TIMED = """
import json, resource, sys, time
w, c = time.perf_counter(), time.process_time()
{stmt}
w, c = time.perf_counter() - w, time.process_time() - c
print(json.dumps({{"wall_ms": w * 1e3, "cpu_ms": c * 1e3,
    "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "fleet_modules": sorted(m for m in sys.modules if m.startswith("celery_fleet"))}}))
"""

# Runs `celery --help` as the console script does; with FILTER set, celery-fleet's entry
# points are left out of what importlib.metadata tells Celery. At exit, to stderr: the
# celery_fleet modules the process imported and its peak RSS.
_LAUNCHER = """
import atexit, importlib.metadata as md, json, os, resource, sys
if os.environ.get("BENCH_FILTER_FLEET"):
    _all = md.entry_points
    def entry_points(**params):
        found = _all(**params)
        if "group" not in params:
            return found
        return md.EntryPoints(ep for ep in found if not ep.value.startswith("celery_fleet"))
    md.entry_points = entry_points
def _report():
    print("BENCH " + json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "fleet_modules": sorted(m for m in sys.modules if m.startswith("celery_fleet"))}),
        file=sys.stderr)
atexit.register(_report)
sys.argv = ["celery", "--help"]
from celery.__main__ import main
main()
"""


def _env(tree: Path, cache: str) -> dict[str, str]:
    # The children run in an empty directory: `python -c` puts the current directory first
    # on sys.path, which in a checkout would shadow the tree measured.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONPYCACHEPREFIX"] = cache
    return env


def _run_import(kind: str, env: dict[str, str]) -> dict[str, float]:
    code = _TIMED.format(stmt=IMPORTS[kind])
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=env["PYTHONPYCACHEPREFIX"],
    )
    if done.returncode:
        raise SystemExit(f"{kind}: {done.stderr}")
    found = json.loads(done.stdout)
    return {**found, "modules": len(found.pop("fleet_modules"))}


def _run_help(kind: str, env: dict[str, str]) -> dict[str, float]:
    env = dict(env)
    if kind == "help without":
        env["BENCH_FILTER_FLEET"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=env["PYTHONPYCACHEPREFIX"],
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    listed = any(line.split()[:1] == ["fleet"] for line in done.stdout.splitlines())
    if done.returncode or listed != (kind == "help with"):
        raise SystemExit(f"{kind}: exit {done.returncode}, fleet listed: {listed}\n{done.stderr}")
    report = json.loads(done.stderr.rsplit("BENCH ", 1)[1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_ms": wall * 1e3,
        "cpu_ms": cpu * 1e3,
        "rss_kb": report["rss_kb"],
        "modules": len(report["fleet_modules"]),
    }


def measure(trees: dict[str, Path], rounds: int) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Every (tree, kind) ``rounds`` times, the order rotating each round; one warm-up round."""
    kinds = [*IMPORTS, *HELP]
    jobs = [(side, kind) for kind in kinds for side in trees]
    found: dict[tuple[str, str], list[dict[str, float]]] = {job: [] for job in jobs}
    with tempfile.TemporaryDirectory(prefix="bench-imports-") as tmp:
        envs = {side: _env(tree, os.path.join(tmp, side)) for side, tree in trees.items()}
        for env in envs.values():
            os.makedirs(env["PYTHONPYCACHEPREFIX"])
        for r in range(rounds + 1):
            shift = r % len(jobs)
            for side, kind in jobs[shift:] + jobs[:shift]:
                run = _run_help if kind in HELP else _run_import
                figures = run(kind, envs[side])
                if r:  # round 0 fills the bytecode cache
                    found[(side, kind)].append(figures)
            print(f"round {r}/{rounds}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    return found


def _med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(x[key] for x in runs)


def report(found: dict[tuple[str, str], list[dict[str, float]]], sides: list[str]) -> str:
    """The markdown table: medians (and best CPU) per tree and kind, then the ratios."""
    lines = [
        "| tree | measure | wall ms (median) | CPU ms (median) | CPU ms (best) "
        "| peak RSS MB | celery_fleet modules |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (side, kind), runs in found.items():
        label = f"`celery --help` {kind[5:]} the entry point" if kind in HELP else f"{kind}"
        lines.append(
            f"| {side} | {label} | {_med(runs, 'wall_ms'):.1f} | {_med(runs, 'cpu_ms'):.1f} "
            f"| {min(x['cpu_ms'] for x in runs):.1f} | {_med(runs, 'rss_kb') / 1024:.1f} "
            f"| {_med(runs, 'modules'):.0f} |"
        )
    lines += ["", "| ratio (medians) | " + " | ".join(f"{s} wall | {s} CPU" for s in sides) + " |"]
    lines.append("|---|" + "---:|---:|" * len(sides))

    def ratio(name: str, top: str, bottom: str) -> None:
        cells = []
        for s in sides:
            for key in ("wall_ms", "cpu_ms"):
                cells.append(f"{_med(found[(s, top)], key) / _med(found[(s, bottom)], key):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    ratio("quickstart / floor (what the package adds)", "quickstart", "floor")
    ratio("`celery --help` with / without the entry point", "help with", "help without")
    for kind in ("quickstart", "help with"):
        for key in ("wall_ms", "cpu_ms") if len(sides) == 2 else ():
            a, b = _med(found[(sides[0], kind)], key), _med(found[(sides[1], kind)], key)
            lines.append(f"\n{kind}, {key[:-3]}: {sides[0]} / {sides[1]} = {a / b:.2f}")
    for s in sides:
        extra = _med(found[(s, "quickstart")], "rss_kb") - _med(found[(s, "floor")], "rss_kb")
        lines.append(f"\n{s}: quickstart - floor peak RSS = {extra / 1024:+.1f} MB")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    parser.add_argument("--before", type=Path, help="another tree measured alongside")
    parser.add_argument("--append", action="store_true", help="append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    trees = {"this tree": ROOT}
    if args.before is not None:
        trees["before"] = args.before.resolve()
    found = measure(trees, args.rounds)
    body = report(found, list(trees))
    print(body)
    if args.append:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
        with (HERE / "RESULTS.md").open("a", encoding="utf-8") as fh:
            fh.write(f"\n## Import time and `celery --help` (issue 26) ({stamp})\n\n")
            fh.write(f"Machine: {machine('not used')}  \nCommand: `{command}`\n\n{body}")


if __name__ == "__main__":
    main()
