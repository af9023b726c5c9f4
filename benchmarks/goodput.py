"""Goodput under sustained overload: never throw paid work away (issue 8).

N agents x S steps (default 100 x 3), each step one model call in ``fleet.slot("model")``,
run in real ``celery worker`` processes (default one worker, ``-P threads -c 40``: fewer
worker slots than agents) against ``ProviderSim`` through the ``openai`` SDK. One binding
limit: the provider allows ``--rpm`` (its bucket holds ``--provider-burst`` seconds of it,
default 6) and the fleet declares the same rpm with ``burst`` and ``headroom`` (0.05 each).
For every ``fleet_max_wait`` in ``--max-wait`` three configurations run (``--kinds``):

- ``baseline``: the plain agent on the package of ``--baseline-commit`` (default 7140f06,
  before issue 8), exported with ``git archive`` to a temporary directory that the
  workers import first (their cwd, so the checkout's package is not on their path;
  checked in the worker);
- ``plain``: the same agent on the current package (``wait_after_call`` by default);
- ``durable``: each call wrapped in ``self.step(f"call-{i}", ...)``.

Measured: agents done within ``--timeout``; paid calls (200s in the provider's log) and
useful ones (distinct agent steps served: N x S when all are done); wasted = (paid -
useful) / paid; makespan (firing to the last agent's end) / ideal, where ideal = N x S /
(rpm x (1 - headroom)), the fleet's sustained rate after headroom, with no credit for the
burst it admits at once from a full bucket (burst x rpm x (1 - headroom) calls: a perfect
run scores about 0.91x at the defaults); p50/p99/max agent completion time from firing;
the provider's 429s; reschedules (the ``task_rescheduled`` signal; Celery's ``task_retry``
on the old package, which rescheduled with ``Retry``); and ticket order: the share of
contended admissions (refused at least once) that no younger agent passed while they
waited, on the Redis clock (admitted at ``slot.decision.at_ms``, first asked
``slot.waited_s`` before). "in order" ages agents by the run's ``slot.run.since_ms`` (what
the line orders by; new package only) and counts differences up to 20 ms as ties (in age,
and from either end of the wait: the first ask is estimated, and callers woken by one
refill are admitted within ms of each other); "strict": the same with no ties; "by stamp"
ages agents by a Redis-clock stamp each takes before its first ask (any package, so the
baseline too; 50 ms ties).

Everything runs in Redis DB 14 (``REDIS_URL``, else 127.0.0.1:6379), flushed before and
after. Prints a table and JSON; appends a section to benchmarks/RESULTS.md.

Run: ``python benchmarks/goodput.py [--quick]`` or ``make bench-goodput``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # also when loaded by path (its tests)

from provenance import machine as _machine  # noqa: E402

from benchmarks.harness.demo import progress  # noqa: E402
from benchmarks.harness.goodput import (  # noqa: E402
    KINDS,
    GoodputHerd,
    Outcome,
    export_commit,
    flush_db,
    ideal_s,
    percentile,
)
from benchmarks.harness.herd import Scenario, add_scenario_args, scenario_from_args  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DB = 14
#: The issue's targets, for plain agents on the current package at fleet_max_wait 3 s.
TARGETS = {"max_wait_s": 3.0, "done": 1.0, "wasted": 0.01, "ratio": 1.10, "in_order": 0.99}
DEFAULTS = {
    "agents": 100,
    "steps": 3,
    "rpm": 600,
    "tpm": 0,
    "max_in_flight": 0,
    "workers": 1,
    "concurrency": 40,
    "pool": "threads",
    "max_wait": "0,3,30",
}
QUICK = {"agents": 30, "steps": 3, "rpm": 300, "concurrency": 10, "max_wait": "3"}
TIMEOUT_FACTOR = {False: 10.0, True: 3.0}  # x ideal, by --quick


def seconds_list(text: str) -> list[float]:
    """``"0,3,30"`` -> ``[0.0, 3.0, 30.0]`` (argparse type of ``--max-wait``)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of seconds: {text!r}") from None
    if not values or any(not (v >= 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"need finite seconds >= 0, got {text!r}")
    return values


def kinds_list(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"kinds are {', '.join(KINDS)}; got {text!r}")
    return kinds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Defaults: 100 agents x 3 steps, provider and fleet at 600 rpm, no tpm or "
        "in-flight limit (0: none), one worker -P threads -c 40. --quick: 30 agents x 3 steps "
        "at 300 rpm, -c 10, max-wait 3, timeout 3x ideal (under ~2 minutes); explicit options "
        "still win.",
    )
    add_scenario_args(p)
    p.add_argument("--quick", action="store_true", help="a short run (see below)")
    p.add_argument("--max-wait", type=seconds_list, help="fleet_max_wait values, s")
    p.add_argument("--kinds", type=kinds_list, default=",".join(KINDS), help="what to run")
    p.add_argument("--burst", type=float, default=0.05, help="the fleet limit's burst")
    p.add_argument("--headroom", type=float, default=0.05, help="the fleet limit's headroom")
    p.add_argument(
        "--provider-burst", type=float, default=6.0, help="s of rpm the provider's bucket holds"
    )
    p.add_argument("--baseline-commit", default="7140f06", help="the package before issue 8")
    p.add_argument(
        "--timeout", type=float, help="s per configuration; None: 10x ideal (3x with --quick)"
    )
    p.add_argument("--json", default="-", help="where to write the JSON ('-': stdout)")
    p.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--dump", help="write each run's admission records and provider log here")
    p.set_defaults(**DEFAULTS)
    quick = p.parse_known_args(argv)[0].quick
    if quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if isinstance(args.max_wait, str):  # a default, not parsed by its type
        args.max_wait = seconds_list(args.max_wait)
    if args.timeout is None:
        ideal = ideal_s(args.agents * args.steps, args.rpm, args.headroom)
        args.timeout = round(TIMEOUT_FACTOR[quick] * ideal, 1)
    return args


def scenario_of(args: argparse.Namespace) -> Scenario:
    return dataclasses.replace(
        scenario_from_args(args),
        provider_burst_s=args.provider_burst,
        timeout_s=args.timeout,
    )


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1%}"


def _s(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1f}"


COLUMNS: list[tuple[str, Callable[[Outcome], str]]] = [
    ("config", lambda o: f"{o.kind} {o.max_wait_s:g}s"),
    ("done", lambda o: f"{o.done}/{o.agents}"),
    ("paid", lambda o: str(o.paid)),
    ("useful", lambda o: str(o.useful)),
    ("wasted", lambda o: _pct(o.wasted)),
    ("429s", lambda o: str(o.provider_429)),
    ("resched", lambda o: str(o.reschedules)),
    ("makespan s", lambda o: (">" if o.timed_out else "") + _s(o.makespan_s)),
    ("/ ideal", lambda o: (">" if o.timed_out else "") + f"{o.ratio:.2f}x"),
    ("p50 s", lambda o: _s(percentile(o.completion_s, 50))),
    ("p99 s", lambda o: _s(percentile(o.completion_s, 99))),
    ("max s", lambda o: _s(percentile(o.completion_s, 100))),
    ("in order", lambda o: _pct(o.in_order("line"))),
    ("strict", lambda o: _pct(o.in_order("strict"))),
    ("by stamp", lambda o: _pct(o.in_order("stamp"))),
]


def table(outcomes: list[Outcome]) -> str:
    """A plain-text table, one row per configuration."""
    cells = [[name for name, _ in COLUMNS]] + [[f(o) for _, f in COLUMNS] for o in outcomes]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(outcomes: list[Outcome]) -> str:
    rows = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    rows += ["| " + " | ".join(f(o) for _, f in COLUMNS) + " |" for o in outcomes]
    return "\n".join(rows)


def verdict(outcomes: list[Outcome]) -> list[str]:
    """One line per target, for plain agents on the current package at max_wait 3 s."""
    run = next(
        (o for o in outcomes if o.kind == "plain" and o.max_wait_s == TARGETS["max_wait_s"]), None
    )
    if run is None:
        return ["no plain run at max_wait 3 s: targets not checked"]
    checks = [
        ("agents done", f"{run.done / run.agents:.0%}", run.done == run.agents, "100%"),
        ("paid calls wasted", _pct(run.wasted), run.wasted <= TARGETS["wasted"], "<= 1%"),
        (
            "makespan / ideal",
            f"{run.ratio:.2f}x",
            not run.timed_out and run.ratio <= TARGETS["ratio"],
            "<= 1.10x",
        ),
        (
            "contended admissions in ticket order",
            f"{_pct(run.in_order('line'))} (strict {_pct(run.in_order('strict'))})",
            run.in_order("line") >= TARGETS["in_order"],
            ">= 99%",
        ),
    ]
    return [
        f"{name}: {value} ({'met' if ok else 'MISSED'}; target {target})"
        for name, value, ok, target in checks
    ]


def machine() -> str:
    import redis

    client = redis.Redis.from_url(redis_base())
    try:
        server = client.info("server").get("redis_version", "?")
    finally:
        client.close()
    return _machine(server)


def redis_base() -> str:
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")


def markdown(args: argparse.Namespace, outcomes: list[Outcome], command: str, baseline: str) -> str:
    """The dated section appended to RESULTS.md: machine, command, setup, table, targets."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    s = scenario_of(args)
    rate = s.rpm * (1 - args.headroom)
    limit = {"rpm": s.rpm, "burst": args.burst, "headroom": args.headroom}
    setup = (
        f"Provider {s.rpm} rpm (its bucket holds {s.provider_burst_s:g} s), latency median "
        f"{s.latency} s (sigma {s.latency_sigma}); fleet limit `{limit}`; "
        f"{s.workers} x {s.concurrency} {s.pool} worker slots; timeout {s.timeout_s:g} s per "
        f"configuration. Ideal = {s.agents * s.steps} useful calls at rpm x (1 - headroom) = "
        f"{rate:g}/min = {ideal_s(s.agents * s.steps, s.rpm, args.headroom):.1f} s (no credit "
        f"for the initial burst). Baseline = commit {args.baseline_commit}: {baseline}."
    )
    targets = "; ".join(verdict(outcomes))
    return "\n".join(
        [
            f"\n## Goodput: {s.agents} agents x {s.steps} calls, sustained overload ({when})\n",
            f"Machine: {machine()}  ",
            f"Command: `{command}`\n",
            setup + "\n",
            markdown_table(outcomes),
            "",
            f"Targets (plain agents, current package, max_wait 3 s): {targets}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenario = scenario_of(args)
    url = f"{redis_base().rstrip('/')}/{DB}"
    outcomes: list[Outcome] = []
    baseline = "not run"
    print(
        f"goodput: {scenario.agents} agents x {scenario.steps} calls, {scenario.rpm} rpm, "
        f"{scenario.workers} x {scenario.concurrency} {scenario.pool} slots, max_wait "
        f"{args.max_wait}, timeout {args.timeout:g} s per configuration",
        file=sys.stderr,
    )
    flush_db(url, DB)
    with (
        tempfile.TemporaryDirectory(prefix="goodput-baseline-") as tmp,
        GoodputHerd(scenario, redis_base(), DB, args.burst, args.headroom) as herd,
    ):
        old = export_commit(args.baseline_commit, Path(tmp)) if "baseline" in args.kinds else None
        try:
            for max_wait in args.max_wait:
                for kind in args.kinds:
                    package = old if kind == "baseline" else None
                    outcome = herd.run_config(kind, max_wait, args.timeout, package, progress)
                    outcomes.append(outcome)
                    if kind == "baseline":
                        baseline = f"its workers imported {outcome.package} (under {tmp}: verified)"
                        print(f"  baseline workers imported {outcome.package}", file=sys.stderr)
        finally:
            flush_db(url, DB)
    print("\n" + table(outcomes), file=sys.stderr)
    print("\n" + "\n".join(verdict(outcomes)), file=sys.stderr)
    payload = {
        "scenario": dataclasses.asdict(scenario),
        "fleet": {"rpm": scenario.rpm, "burst": args.burst, "headroom": args.headroom},
        "baseline": baseline,
        "runs": [o.summary() for o in outcomes],
    }
    text = json.dumps(payload, indent=2, default=str)
    if args.json == "-":
        print(text)
    else:
        Path(args.json).write_text(text + "\n")
    if args.dump:
        raw = [{"config": f"{o.kind} {o.max_wait_s:g}s", **o.raw} for o in outcomes]
        Path(args.dump).write_text(json.dumps(raw) + "\n")
    if not args.no_write:
        command = "python benchmarks/goodput.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        with RESULTS.open("a") as f:
            f.write(markdown(args, outcomes, command.strip(), baseline))
        print(f"appended to {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
