"""The chaos suite, long: every scenario of ``tests/chaos/suite.py`` with its long parameters.

Real ``celery worker`` processes against private redis-servers (nothing else is touched),
the provider simulator, and faults: SIGKILL storms of pool children holding slots and keys,
duplicate publishes, the broker down, the fleet's Redis restarted empty / frozen / slowed, a
provider outage, Celery time limits inside a slot, empty restarts under fencing tokens.
Prints a table per scenario (faults injected, tasks, executions, leaks, 429s, pass/fail)
and appends them to benchmarks/RESULTS.md. Exits 1 when a scenario failed.

    python benchmarks/chaos.py                      # all, long (~10-15 minutes)
    python benchmarks/chaos.py --short              # the CI parameters
    python benchmarks/chaos.py --only sigkill_storm fencing --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from provenance import machine as _machine  # noqa: E402  (benchmarks/ is on sys.path)
from provenance import out  # noqa: E402

from celery_fleet.testing.chaos import Figures, format_table  # noqa: E402
from tests.chaos.suite import SCENARIOS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run the chaos scenarios (long parameters unless --short); print a table "
        "per scenario and append them to benchmarks/RESULTS.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios (and the issue-20 defects each depends on):\n"
        + "\n".join(f"  {n}: {sc.depends_on}" for n, sc in SCENARIOS.items()),
    )
    p.add_argument("--short", action="store_true", help="the CI parameters (as pytest runs)")
    p.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="NAME",
                   help="run only these scenarios")  # fmt: skip
    p.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    return p.parse_args(argv)


def machine() -> str:
    redis_version = out("redis-server", "--version").split("v=")[-1].split(" ")[0] or "?"
    return _machine(redis_version)


def markdown(rows: list[Figures], command: str, started: str) -> str:
    lines = [
        f"\n## Chaos suite ({started})\n",
        f"Machine: {machine()}  ",
        f"Command: `{command}`\n",
        format_table(rows),
        "",
    ]
    for f in rows:
        if f.extra:
            lines.append(f"- {f.scenario}: " + ", ".join(f"{k} {v}" for k, v in f.extra.items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(SCENARIOS)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows: list[Figures] = []
    for name in names:
        scenario = SCENARIOS[name]
        params = scenario.short if args.short else scenario.long
        print(f"\n== {name} ({'short' if args.short else 'long'})", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            figures = scenario.run(params)
        except Exception as exc:  # a broken scenario is a row, not the end of the run
            figures = Figures(name, params=str(params))
            figures.check("ran", False, f"{type(exc).__name__}: {exc}")
            figures.seconds = time.monotonic() - t0
        if not figures.passed:
            figures.extra["depends on defects"] = scenario.depends_on
        rows.append(figures)
        print(figures.report(), flush=True)
    print("\n" + format_table(rows))
    if not args.no_write:
        command = "python benchmarks/chaos.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with RESULTS.open("a") as f:
            f.write(markdown(rows, command.strip(), started))
        print(f"appended to {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0 if all(f.passed for f in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
