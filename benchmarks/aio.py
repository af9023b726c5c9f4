"""1,000 coroutines in one process against 1,000 threads: decisions/s, p99 admission
latency, Redis connections held, memory and timer lateness, in the same run.

Each side runs in a fresh subprocess (so memory is its own): 1,000 agents, each taking a
slot of one limit (``max_in_flight`` 50, no rate) ``--rounds`` times, holding it for
``--hold-ms``. The baseline is the thread side (``fleet.slot`` in 1,000 threads); the
ratio column is coroutines / threads.

Lateness: while the agents run, a heartbeat sleeps 5 ms at a time and records how late
each wake-up is. On the coroutine side it is a coroutine (``asyncio.sleep``): its p99 is
the event loop's lateness, the figure ``tests/test_aslot.py`` bounds only loosely (a
stalled loop fails there; how late a busy one runs is measured here). On the thread side
it is a thread (``time.sleep``), the same timer among 1,000 threads.

Usage::

    python benchmarks/aio.py [--agents 1000] [--rounds 5] [--hold-ms 2] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery_fleet import Fleet  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/12")
LIMITS = {"llm": {"max_in_flight": 50}}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def connections(client: redis.Redis) -> int:
    return int(client.info("clients")["connected_clients"])


#: The heartbeat's period (s): how late each of its sleeps wakes is the lateness figure.
BEAT_S = 0.005


def p99(values: list[float]) -> float:
    """The 99th percentile, nearest rank (``values`` sorted)."""
    return values[max(0, -(-len(values) * 99 // 100) - 1)]


def run_side(side: str, agents: int, rounds: int, hold_s: float) -> dict[str, float]:
    fleet = Fleet(redis_url=REDIS, limits=LIMITS, namespace=f"aio-{uuid.uuid4().hex[:8]}",
                  max_wait=600)  # fmt: skip
    probe = redis.Redis.from_url(REDIS)
    base_conn, base_rss = connections(probe), rss_mb()
    latencies: list[float] = []
    lateness: list[float] = []  # per heartbeat: how late its 5 ms sleep woke (s)
    peak = {"conn": 0, "rss": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak["conn"] = max(peak["conn"], connections(probe) - base_conn)
            peak["rss"] = max(peak["rss"], rss_mb() - base_rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if side == "threads":

        def agent() -> None:
            for _ in range(rounds):
                asked = time.perf_counter()
                with fleet.slot("llm"):
                    latencies.append(time.perf_counter() - asked)
                    time.sleep(hold_s)

        def heartbeat() -> None:
            while not finished.is_set():
                before = time.perf_counter()
                time.sleep(BEAT_S)
                lateness.append(time.perf_counter() - before - BEAT_S)

        finished = threading.Event()
        beating = threading.Thread(target=heartbeat, daemon=True)
        beating.start()
        threads = [threading.Thread(target=agent) for _ in range(agents)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        finished.set()
        beating.join()
    else:

        async def agent_async() -> None:
            for _ in range(rounds):
                asked = time.perf_counter()
                async with fleet.aslot("llm"):
                    latencies.append(time.perf_counter() - asked)
                    await asyncio.sleep(hold_s)

        async def heartbeat_async(finished: asyncio.Event) -> None:
            while not finished.is_set():
                before = time.perf_counter()
                await asyncio.sleep(BEAT_S)
                lateness.append(time.perf_counter() - before - BEAT_S)

        async def main() -> None:
            finished = asyncio.Event()
            beating = asyncio.create_task(heartbeat_async(finished))
            await asyncio.gather(*(agent_async() for _ in range(agents)))
            finished.set()
            await beating

        asyncio.run(main())
    took = time.perf_counter() - start
    done.set()
    sampler.join()
    latencies.sort()
    lateness.sort()
    return {
        "decisions_per_s": len(latencies) / took,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "late_p99_ms": p99(lateness) * 1000,
        "late_max_ms": lateness[-1] * 1000,
        "connections": peak["conn"],
        "rss_mb": peak["rss"],
        "seconds": took,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hold-ms", type=float, default=2.0)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--side", choices=["threads", "coroutines"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: one side, its figures as JSON
        print(json.dumps(run_side(args.side, args.agents, args.rounds, args.hold_ms / 1000)))
        return
    results = {}
    for side in ("threads", "coroutines"):
        out = subprocess.run(
            [sys.executable, __file__, "--side", side, "--agents", str(args.agents),
             "--rounds", str(args.rounds), "--hold-ms", str(args.hold_ms)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [
        ("decisions/s", "decisions_per_s", "{:.0f}"),
        ("p50 admission latency, ms", "p50_ms", "{:.1f}"),
        ("p99 admission latency, ms", "p99_ms", "{:.1f}"),
        ("5 ms heartbeat lateness p99, ms", "late_p99_ms", "{:.1f}"),
        ("5 ms heartbeat lateness worst, ms", "late_max_ms", "{:.1f}"),
        ("Redis connections added (peak)", "connections", "{:.0f}"),
        ("memory added (peak RSS), MB", "rss_mb", "{:.1f}"),
        ("wall time, s", "seconds", "{:.2f}"),
    ]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## asyncio vs threads: {args.agents} agents x {args.rounds} slots, cap 50, "
        f"hold {args.hold_ms:g} ms ({stamp})",
        "",
        "`python benchmarks/aio.py` (`make bench-aio`); each side in its own process; "
        "ratio = coroutines / threads.",
        "",
        "| measure | threads (baseline) | coroutines | ratio |",
        "|---|---|---|---|",
    ]
    for label, key, fmt in rows:
        t, c = results["threads"][key], results["coroutines"][key]
        ratio = f"{c / t:.2f}x" if t else "-"
        lines.append(f"| {label} | {fmt.format(t)} | {fmt.format(c)} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
