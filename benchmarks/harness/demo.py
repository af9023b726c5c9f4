"""``make demo``: the same herd of agents twice, plain Celery then celery-fleet.

Starts a simulated OpenAI-compatible provider and real ``celery worker`` processes, fires
every agent in the same second, shows progress, and prints a side-by-side table of what
the provider saw; writes ``demo-herd.png`` (in-flight requests and 429s over time).

Run: ``python -m benchmarks.harness.demo [--agents 60 --steps 5 ...]`` with REDIS_URL set,
or ``make demo``, which starts a Redis when none answers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .herd import Herd, RunResult, add_scenario_args, scenario_from_args

BAR = 30


_last: dict[str, tuple[int, int, int]] = {}


def progress(mode: str, done: int, failed: int, total: int, n429: int) -> None:
    """A one-line progress bar on stderr, redrawn only when something changed."""
    state = (done, failed, n429)
    if _last.get(mode) == state:
        return
    _last[mode] = state
    filled = int(BAR * (done + failed) / total) if total else BAR
    line = (
        f"  {mode:<9} [{'#' * filled}{'.' * (BAR - filled)}] "
        f"{done + failed}/{total}  failed {failed}  provider 429s {n429}"
    )
    finished = done + failed == total
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{line}   " + ("\n" if finished else ""))
    elif finished or (done + failed) % max(1, total // 4) == 0:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def table(runs: list[RunResult]) -> str:
    """The side-by-side table of the runs; a footnote explains a ratio that failures skew."""
    rows: list[tuple[str, Callable[[RunResult], str]]] = [
        ("agents completed", lambda r: f"{r.completed}/{r.agents}"),
        ("agents failed", lambda r: str(r.failed)),
        ("provider 429s", lambda r: f"{r.provider_429} ({r.rate_429:.1%})"),
        ("requests sent", lambda r: str(r.requests)),
        ("makespan", lambda r: f"{r.makespan_s:.1f} s"),
        ("lower bound", lambda r: f"{r.lower_bound_s:.1f} s"),
        ("makespan / lower bound", lambda r: f"{r.ratio:.2f}x" + ("*" if r.ratio_note else " ")),
    ]
    width = max(len(name) for name, _ in rows)
    head = f"{'':<{width}}  " + "  ".join(f"{r.mode:>16}" for r in runs)
    lines = [head, "-" * len(head)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{fmt(r):>16}" for r in runs) for name, fmt in rows]
    lines += [footnote(r) for r in runs if r.ratio_note]
    return "\n".join(lines)


def footnote(run: RunResult) -> str:
    """The table's footnote on a ratio that failed agents skew (``*`` marks the cell)."""
    below = "; below 1x is not faster than possible" if run.ratio < 1 else ""
    return f"* {run.mode}: {run.ratio:.2f}x lower bound: {run.ratio_note}{below}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scenario_args(p)
    p.add_argument("--modes", default="plain,fleet", help="comma list of plain, autoretry, fleet")
    p.add_argument("--plot", default="demo-herd.png", help="PNG path ('' for none)")
    args = p.parse_args(argv)
    scenario = scenario_from_args(args)
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    print(
        f"celery-fleet demo: {scenario.agents} agents x {scenario.steps} model calls, "
        f"{scenario.worker_slots} worker slots, provider allows {scenario.max_in_flight} in "
        f"flight, {scenario.rpm} RPM, {scenario.tpm} TPM, ~{scenario.latency}s per call\n"
    )
    runs = []
    with Herd(scenario, redis_url) as herd:
        for mode in args.modes.split(","):
            runs.append(herd.run(mode.strip(), progress))
    print()
    print(table(runs))
    if args.plot:
        from .plot import plot_runs

        path = plot_runs(runs, scenario.max_in_flight, Path(args.plot))
        print(f"\nplot: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
