"""Priority lanes benchmark: an interactive caller behind a saturated batch lane, and the cost.

One run, one Redis (always DB 6), keys under a fresh `bench-lanes-<uuid>` namespace deleted at
the end. Two parts:

1. **Interactive vs batch** (issue 23). A limit of ``--cap`` in flight with lanes
   ``interactive`` (priority 0, reserve ``--reserve``) and ``batch`` (priority 1). Each call
   holds its slot ``--hold-ms`` (a sleep: the model's latency). Batch: ``--batch`` P x T
   threads in spawned processes, each looping on ``with fleet.slot("llm", lane="batch")``,
   more than the batch lane's share (saturated). Interactive: ``--interactive`` threads in
   this process, each asking every ``[0, 2 x hold]`` s and holding likewise; its admission
   wait is the time ``__enter__`` took. Scenarios, each ``--seconds`` long: batch idle;
   batch saturated with the reserve; saturated with lanes but no reserve (priority alone);
   saturated without lanes (one FIFO line: the baseline); both lanes saturated (as many
   interactive processes as batch ones, looping like batch's, beside the timed threads).
   Reported: interactive wait p50/p95/p99, batch admissions/s and, with both saturated,
   batch's share of the slots. Targets: p95 <= hold + 50 ms behind a saturated batch lane;
   batch keeps at least what the reserve leaves it (``floor(cap x (1 - reserve))`` of the
   ``cap`` slots) even behind a saturated interactive lane.
2. **Cost of a limit without lanes, before and after.** A spawned process per code tree
   (this tree, and ``--baseline``, the commit before lanes, exported with ``git archive``)
   times ``try_acquire`` + ``release`` of a limit without lanes (budgets never binding), in
   ``--rounds`` alternating rounds of ``--samples``; medians in µs, after / before. This
   tree also times a limit with lanes (a batch caller: the share is checked) for the cost
   of lanes themselves.

Usage::

    .venv/bin/python benchmarks/lanes.py [--seconds 8] [--cap 8] [--reserve 0.25]
        [--hold-ms 100] [--batch 2x8] [--interactive 2] [--baseline 9ddc65a] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DB = 6
SCENARIOS = ("batch idle", "saturated", "no reserve", "fifo", "both saturated")


def limits(opts: argparse.Namespace, scenario: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"max_in_flight": opts.cap, "lease": 30}
    if scenario != "fifo":
        reserve = 0.0 if scenario == "no reserve" else opts.reserve
        spec["lanes"] = {
            "interactive": {"priority": 0, "reserve": reserve},
            "batch": {"priority": 1},
        }
    return {"llm": spec}


def batch_process(url: str, ns: str, spec: dict[str, Any], threads: int, hold_s: float,
                  lane: str | None, start: Any, stop: Any, out: Any) -> None:  # fmt: skip
    from celery_fleet import Fleet

    fleet = Fleet(limits=spec, redis_url=url, namespace=ns)
    counts = [0] * threads

    def loop(i: int) -> None:
        start.wait()
        while not stop.is_set():
            with fleet.slot("llm", max_wait=120, lane=lane):
                time.sleep(hold_s)
            if not stop.is_set():
                counts[i] += 1

    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((lane, sum(counts)))
    fleet.store.reset()


def scenario_run(opts: argparse.Namespace, scenario: str) -> dict[str, Any]:
    from celery_fleet import Fleet

    ns = f"bench-lanes-{uuid.uuid4().hex[:8]}"
    spec = limits(opts, scenario)
    laned = scenario != "fifo"
    fleet = Fleet(limits=spec, redis_url=opts.url, namespace=ns)
    ctx = mp.get_context("spawn")
    start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    procs_n, threads = opts.batch if scenario != "batch idle" else (0, 0)
    lanes = ["batch" if laned else None] * procs_n
    if scenario == "both saturated":
        lanes += ["interactive"] * procs_n
    procs = [
        ctx.Process(
            target=batch_process,
            args=(opts.url, ns, spec, threads, opts.hold_s, lane, start, stop, out),
        )  # fmt: skip
        for lane in lanes
    ]
    for p in procs:
        p.start()
    time.sleep(1.5 if procs else 0)  # spawned interpreters import celery_fleet
    waits: list[float] = []
    lock = threading.Lock()
    began = time.monotonic()
    end = began + opts.seconds

    def interactive() -> None:
        rng = random.Random()
        while True:
            time.sleep(rng.uniform(0, 2 * opts.hold_s))
            if time.monotonic() >= end:
                return
            t0 = time.perf_counter()
            with fleet.slot("llm", max_wait=120, lane="interactive" if laned else None):
                waited = time.perf_counter() - t0
                time.sleep(opts.hold_s)
            if time.monotonic() - began > opts.warmup:
                with lock:
                    waits.append(waited)

    start.set()
    pool = [threading.Thread(target=interactive) for _ in range(opts.interactive)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    stop.set()
    totals = {"batch": 0, "interactive": 0, None: 0}
    for _ in procs:
        lane, n = out.get(timeout=120)
        totals[lane] += n
    batch_total = totals["batch"] + totals[None]
    for p in procs:
        p.join(30)
    fleet.store.reset()
    client = __import__("redis").Redis.from_url(opts.url)
    keys = list(client.scan_iter(match=f"{{{ns}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    return {
        "scenario": scenario,
        "waits_ms": sorted(w * 1000 for w in waits),
        "batch_per_s": batch_total / opts.seconds,
        "interactive_per_s": totals["interactive"] / opts.seconds,
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, int(q * len(values)))]


# -- cost of a limit without lanes ------------------------------------------------------


def cost_worker(args: dict[str, Any]) -> None:
    """Run in a spawned interpreter whose PYTHONPATH is the code tree measured."""
    from celery_fleet import Fleet

    spec: dict[str, Any] = {"plain": {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}}
    if args["lanes"]:
        spec["laned"] = {
            **spec["plain"],
            "lanes": {"interactive": {"priority": 0, "reserve": 0.25}, "batch": {"priority": 1}},
        }
    fleet = Fleet(limits=spec, redis_url=args["url"], namespace=args["ns"])
    result: dict[str, float] = {}
    for name in spec:
        for _ in range(200):  # warm-up
            fleet.release(fleet.try_acquire(name, 100))
        ns = []
        for _ in range(args["samples"]):
            t0 = time.perf_counter_ns()
            fleet.release(fleet.try_acquire(name, 100))
            ns.append(time.perf_counter_ns() - t0)
        result[name] = statistics.median(ns) / 1000
    fleet.store.reset()
    print(json.dumps(result))


def export(rev: str) -> str:
    tmp = tempfile.mkdtemp(prefix="fleet-lanes-baseline-")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "celery_fleet"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    return tmp


def cost(opts: argparse.Namespace) -> dict[str, list[float]]:
    base = export(opts.baseline)
    rows: dict[str, list[float]] = {"before": [], "after": [], "after, lanes": []}
    try:
        for _ in range(opts.rounds):
            for label, tree in (("after", str(ROOT)), ("before", base)):
                ns = f"bench-lanes-{uuid.uuid4().hex[:8]}"
                args = {"url": opts.url, "ns": ns, "samples": opts.samples,
                        "lanes": label == "after"}  # fmt: skip
                env = {**os.environ, "PYTHONPATH": tree}
                proc = subprocess.run(
                    [sys.executable, __file__, "--cost-worker", json.dumps(args)],
                    env=env, capture_output=True, text=True, check=True, cwd=tree,
                )  # fmt: skip
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                rows[label].append(got["plain"])
                if "laned" in got:
                    rows["after, lanes"].append(got["laned"])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


# -- report -------------------------------------------------------------------------------


def lanes_table(opts: argparse.Namespace, runs: list[dict[str, Any]]) -> list[str]:
    share = max(1, math.floor(opts.cap * (1 - opts.reserve)))
    out = [
        f"Limit: max_in_flight {opts.cap}, lanes interactive (priority 0, reserve "
        f"{opts.reserve}) and batch (priority 1, may hold {share}); hold {opts.hold_ms} ms a "
        f"call; batch {opts.batch[0]} x {opts.batch[1]} threads (saturated), interactive "
        f"{opts.interactive} threads asking every U(0, {2 * opts.hold_ms}) ms; "
        f"{opts.seconds:g} s a scenario ({opts.warmup:g} s warm-up not counted).\n",
        "| scenario | interactive calls | wait p50 ms | p95 ms | p99 ms | batch admissions/s "
        "| batch share of looping admissions |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        w = r["waits_ms"]
        looping = r["batch_per_s"] + r.get("interactive_per_s", 0.0)
        part = r["batch_per_s"] / looping if r.get("interactive_per_s") else math.nan
        out.append(
            f"| {r['scenario']} | {len(w)} | {pct(w, 0.5):.1f} | {pct(w, 0.95):.1f} | "
            f"{pct(w, 0.99):.1f} | {r['batch_per_s']:.1f} | "
            f"{'-' if math.isnan(part) else f'{part:.0%}'} |"
        )
    target = opts.hold_ms + 50
    sat = next(r for r in runs if r["scenario"] == "saturated")
    p95 = pct(sat["waits_ms"], 0.95)
    out.append(
        f"\nTarget p95 <= hold + 50 ms = {target} ms behind a saturated batch lane: "
        f"{p95:.1f} ms ({'met' if p95 <= target else 'NOT met'}). Batch share: "
        f"{share} slots / {opts.hold_ms} ms = {share * 1000 / opts.hold_ms:.0f}/s at most "
        f"while interactive uses the rest.\n"
    )
    both = next((r for r in runs if r["scenario"] == "both saturated"), None)
    if both:
        got = both["batch_per_s"] / (both["batch_per_s"] + both["interactive_per_s"])
        owed = share / opts.cap
        out.append(
            f"Both lanes saturated: batch got {got:.0%} of the looping admissions "
            f"(owed {share}/{opts.cap} = {owed:.0%} of the slots: "
            f"{'met' if got >= owed - 0.05 else 'NOT met'}, within 5 points).\n"
        )
    return out


def cost_table(opts: argparse.Namespace, costs: dict[str, list[float]]) -> list[str]:
    out = [
        f"Cost of try_acquire + release (µs, median of {opts.samples} per round; "
        f"{opts.rounds} alternating rounds; before = {opts.baseline}):\n",
        "| code | limit | median of rounds µs | best round µs | rounds |",
        "|---|---|---:|---:|---|",
    ]
    for label, values in costs.items():
        limit = "with lanes (batch caller)" if label == "after, lanes" else "without lanes"
        code = "before" if label == "before" else "after"
        rounds = ", ".join(f"{v:.1f}" for v in values)
        out.append(
            f"| {code} | {limit} | {statistics.median(values):.1f} | {min(values):.1f} | {rounds} |"
        )
    ratio = statistics.median(costs["after"]) / statistics.median(costs["before"])
    best = min(costs["after"]) / min(costs["before"])
    out.append(
        f"\nA limit without lanes, after / before: {ratio:.3f} (medians of rounds), "
        f"{best:.3f} (best rounds). The rounds swing with the load of the shared box: "
        f"read the ratio, and the best rounds.\n"
    )
    return out


def report(opts: argparse.Namespace, runs: list[dict[str, Any]], costs: dict[str, Any]) -> str:
    out = lanes_table(opts, runs) if runs else []
    out += cost_table(opts, costs) if costs else []
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lanes.py", description=(__doc__ or "").split("\n\n")[0])
    default_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    parser.add_argument("--redis-url", default=default_url, help=f"%(default)s; always DB {DB}")
    parser.add_argument("--seconds", type=float, default=8.0, help="per scenario (%(default)s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="not counted (%(default)s)")
    parser.add_argument("--cap", type=int, default=8, help="max_in_flight (%(default)s)")
    parser.add_argument("--reserve", type=float, default=0.25, help="interactive's reserve")
    parser.add_argument("--hold-ms", type=int, default=100, help="a call's hold (%(default)s)")
    parser.add_argument("--batch", default="2x8", help="batch processes x threads (%(default)s)")
    parser.add_argument("--interactive", type=int, default=2, help="interactive threads")
    parser.add_argument("--samples", type=int, default=2000, help="cost samples per round")
    parser.add_argument("--rounds", type=int, default=3, help="cost rounds (%(default)s)")
    parser.add_argument(
        "--baseline", default="9ddc65a", help="commit before lanes ('' = skip the cost part)"
    )
    parser.add_argument("--parts", default="lanes,cost", help="parts to run (%(default)s)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(argv)
    procs, _, threads = opts.batch.partition("x")
    opts.batch = (int(procs), int(threads))
    opts.hold_s = opts.hold_ms / 1000
    if not 0 <= opts.reserve < 1 or opts.cap < 1 or opts.hold_ms <= 0:
        parser.error("need 0 <= --reserve < 1, --cap >= 1, --hold-ms > 0")
    return opts


def main(argv: list[str] | None = None) -> int:
    import redis
    from results import append_section, on_db

    opts = parse_args(argv)
    opts.url = on_db(opts.redis_url, DB)
    client = redis.Redis.from_url(opts.url, socket_timeout=10)
    client.ping()
    runs = []
    parts = set(opts.parts.split(","))
    for scenario in SCENARIOS if "lanes" in parts else ():
        print(f"lanes: {scenario} ...", file=sys.stderr)
        runs.append(scenario_run(opts, scenario))
    costs = cost(opts) if opts.baseline and "cost" in parts else {}
    body = report(opts, runs, costs)
    print(body)
    if not opts.no_write:
        title = "Priority lanes" + (
            ": interactive behind a saturated batch lane" if runs else ": cost"
        )
        append_section(client, body, title)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cost-worker"]:
        cost_worker(json.loads(sys.argv[2]))
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        sys.exit(main())
