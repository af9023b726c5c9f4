"""Adaptive limits and the shared breaker, measured against a provider whose capacity moves.

Part 1, AIMD: the fleet declares max_in_flight=32 but the simulated provider serves 8 at a
time; its capacity halves to 4 at t=10 s and recovers to 8 at t=25 s. The same herd of
research agents (example_project, real `celery worker` processes) runs with
``adaptive=True`` and with ``adaptive=False``. Per phase, from the provider's own log: the
429s in the first 5 s after the change and after that (target: none after 5 s), when the
last one came, and the utilisation of the real capacity (mean requests in service / real
capacity; target >= 85%).

Part 2, breaker: the provider answers 503 for 10 s. Counted: requests the provider sees
while the breaker is open (target: at most one probe per reset_timeout) and failed agents
(target: 0; a 503 or an open breaker reschedules an agent, it never fails it).

Run: ``python benchmarks/adaptive.py`` (REDIS_URL, else 127.0.0.1:6379). Appends to
benchmarks/RESULTS.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.demo import progress  # noqa: E402
from benchmarks.harness.herd import Herd, RunResult, Scenario  # noqa: E402
from celery_fleet.testing import Phase  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
CHANGES = [(0.0, 8), (10.0, 4), (25.0, 8)]  # (phase start, real capacity)
PHASE_END = 40.0


def served_level(records: list[tuple[float, str, float]], t: float) -> int:
    return sum(a <= t < a + lat for a, outcome, lat in records if outcome in ("ok", "garbage"))


def phase_report(run: RunResult, end_s: float) -> list[dict[str, float]]:
    rows = []
    bounds = [*(start for start, _ in CHANGES), end_s]
    for (start, capacity), stop in zip(CHANGES, bounds[1:], strict=True):
        refused = [t for t, outcome, _ in run.records if outcome == "429" and start <= t < stop]
        samples = [start + i * 0.05 for i in range(int((stop - start) / 0.05))]
        busy = [min(served_level(run.records, t), capacity) for t in samples]
        rows.append(
            {
                "phase": f"{start:.0f}-{stop:.0f} s (capacity {capacity})",
                "429_first_5s": sum(t < start + 5 for t in refused),
                "429_after_5s": sum(t >= start + 5 for t in refused),
                "last_429_s": round(max(refused) - start, 2) if refused else 0.0,
                "utilisation": round(sum(busy) / (len(busy) * capacity), 3) if busy else 0.0,
            }
        )
    return rows


def breaker_report(run: RunResult, start: float, stop: float) -> dict[str, object]:
    """Requests the provider saw while the breaker was open, from the workers' events."""
    opened = [t for t, _, state in run.breaker_events if state == "open"]
    shut = [t for t, _, state in run.breaker_events if state in ("half_open", "closed")]
    intervals = [(a, min((t for t in shut if t > a), default=stop)) for a in opened]
    during = [t for t, _, _ in run.records if start <= t < stop]
    while_open = [t for t, _, _ in run.records if any(a < t < b for a, b in intervals)]
    return {
        "requests_during_outage": len(during),
        "breaker_opened_after_s": round(min(opened, default=stop) - start, 2),
        "requests_while_open": len(while_open),
        "probes": sum(state == "half_open" for _, _, state in run.breaker_events),
        "open_s": round(sum(b - a for a, b in intervals), 2),
        "events": [(round(t, 2), state) for t, _, state in run.breaker_events],
        "agents_failed": run.failed,
        "agents_completed": run.completed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=180, help="agents in the AIMD runs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--reset-timeout", type=float, default=2.0)
    p.add_argument("--only", choices=["aimd", "breaker"], help="run one part (nothing is written)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    phases = (Phase(start=10, end=25, max_in_flight=4),)
    out: dict[str, object] = {}
    for adaptive in (True, False) if args.only != "breaker" else ():
        scenario = Scenario(
            agents=args.agents,
            steps=5,
            rpm=100_000,
            tpm=10_000_000,
            max_in_flight=8,
            declared_in_flight=32,
            adaptive=adaptive,
            workers=args.workers,
            concurrency=args.concurrency,
            pool="threads",
            phases=phases,
            timeout_s=600,
        )
        with Herd(scenario, redis_url) as herd:
            run = herd.run("fleet", progress)
        out[f"adaptive={adaptive}"] = {
            "run": run.summary(),
            "phases": phase_report(run, min(run.makespan_s, PHASE_END)),
        }
    if args.only == "aimd":
        print(json.dumps(out, indent=2))
        return 0
    outage = (Phase(start=3, end=13, status=503),)
    scenario = Scenario(
        agents=40,
        steps=5,
        rpm=100_000,
        tpm=10_000_000,
        max_in_flight=8,
        workers=args.workers,
        concurrency=8,
        pool="threads",
        phases=outage,
        breaker_reset_s=args.reset_timeout,
        timeout_s=600,
    )
    with Herd(scenario, redis_url) as herd:
        run = herd.run("fleet", progress)
    out["breaker"] = breaker_report(run, 3.0, 13.0)
    text = json.dumps(out, indent=2)
    print(text)
    if not args.no_write and not args.only:
        with RESULTS.open("a") as f:
            f.write(markdown(out, args))
        print(f"appended to {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


def markdown(out: dict[str, object], args: argparse.Namespace) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## Adaptive limits and breaker ({when})\n",
        f"`python benchmarks/adaptive.py` on {os.cpu_count()} cores: {args.agents} agents x 5 "
        f"calls, {args.workers} x {args.concurrency} thread worker slots; the fleet declares "
        "32 in flight, the provider serves 8, then 4 from t=10 s, then 8 from t=25 s.\n",
        "| run | phase | 429s in first 5 s | 429s after 5 s | last 429 | utilisation |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("adaptive=True", "adaptive=False"):
        entry = out[key]
        assert isinstance(entry, dict)
        for row in entry["phases"]:
            lines.append(
                f"| {key} | {row['phase']} | {row['429_first_5s']} | {row['429_after_5s']} "
                f"| {row['last_429_s']} s | {row['utilisation']:.0%} |"
            )
    b = out["breaker"]
    assert isinstance(b, dict)
    lines.append(
        f"\nBreaker (reset_timeout {args.reset_timeout} s, 10 s of 503s from t=3 s): the "
        f"provider saw {b['requests_during_outage']} requests during the outage; the breaker "
        f"opened {b['breaker_opened_after_s']} s into it and was open {b['open_s']} s in all, "
        f"during which the provider saw {b['requests_while_open']} requests (target: only "
        f"probes; {b['probes']} half-open probes ran, one per reset_timeout); agents failed: "
        f"{b['agents_failed']}, completed: {b['agents_completed']}.\n"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
