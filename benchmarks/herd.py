"""The herd benchmark: N agents fired in the same second, plain Celery vs celery-fleet.

Every mode runs the same research agent (``example_project``) in real ``celery worker``
processes against the same simulated provider (``celery_fleet.testing.ProviderSim``):

- ``plain``: a plain task, the OpenAI SDK's default retries (2, honouring retry-after);
- ``autoretry``: ``autoretry_for`` + ``retry_backoff`` + ``retry_jitter``, SDK retries off;
- ``fleet``: ``@fleet_task`` with ``fleet.slot("model", tokens=...)`` around each call.

Counts come from the provider's own log (429s, requests) and the task results (completed,
failed, makespan). The lower bound is what the provider's limits allow at best: the larger
of the RPM/TPM drain time beyond a full bucket, ``calls * mean latency / max_in_flight``
(mean of the log-normal latency = median * exp(sigma^2 / 2)) and one agent's chain of
sequential calls. Prints a table and JSON; appends a section to benchmarks/RESULTS.md.

Run: ``python benchmarks/herd.py`` (REDIS_URL, else 127.0.0.1:6379), or
``python -m celery_fleet.testing.redis_server -- python benchmarks/herd.py`` to start a Redis.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.demo import progress, table  # noqa: E402
from benchmarks.harness.herd import (  # noqa: E402
    Herd,
    RunResult,
    Scenario,
    add_scenario_args,
    scenario_from_args,
)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TARGETS = {"completed": 1.0, "rate_429": 0.01, "ratio": 1.10}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scenario_args(p)
    p.add_argument("--modes", default="plain,autoretry,fleet")
    p.add_argument("--json", default="-", help="where to write the JSON ('-': stdout)")
    p.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    return p.parse_args(argv)


def verdict(run: RunResult) -> str:
    checks = [
        run.completed == run.agents,
        run.rate_429 <= TARGETS["rate_429"],
        run.ratio <= TARGETS["ratio"],
    ]
    return "meets targets" if all(checks) else "misses targets"


def markdown(scenario: Scenario, runs: list[RunResult], command: str) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fleet = next((r for r in runs if r.mode == "fleet"), None)
    lines = [
        f"\n## Herd: {scenario.agents} agents x {scenario.steps} calls ({when})\n",
        f"`{command}` on {os.cpu_count()} cores, Python {platform.python_version()}; provider "
        f"{scenario.rpm} RPM, {scenario.tpm} TPM, {scenario.max_in_flight} in flight, latency "
        f"median {scenario.latency} s (sigma {scenario.latency_sigma}); "
        f"{scenario.workers} x {scenario.concurrency} {scenario.pool} worker slots.\n",
        "| mode | completed | failed | provider 429s | requests | makespan | lower bound "
        "| makespan / bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.mode} | {r.completed}/{r.agents} | {r.failed} | {r.provider_429} "
            f"({r.rate_429:.1%}) | {r.requests} | {r.makespan_s:.1f} s | {r.lower_bound_s:.1f} s "
            f"| {r.ratio:.2f}x |"
        )
    if fleet is not None:
        lines.append(
            f"\ncelery-fleet {verdict(fleet)} (100% completed, 429s <= 1% of requests, "
            f"makespan <= 1.10x the lower bound)."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenario = scenario_from_args(args)
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    runs = []
    with Herd(scenario, redis_url) as herd:
        for mode in (m.strip() for m in args.modes.split(",")):
            runs.append(herd.run(mode, progress))
    print(table(runs), file=sys.stderr)
    payload = {"scenario": asdict(scenario), "runs": [r.summary() for r in runs]}
    text = json.dumps(payload, indent=2)
    if args.json == "-":
        print(text)
    else:
        Path(args.json).write_text(text + "\n")
    if not args.no_write:
        command = "python benchmarks/herd.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        with RESULTS.open("a") as f:
            f.write(markdown(scenario, runs, command.strip()))
        print(f"appended to {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
