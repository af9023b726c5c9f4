"""Metrics overhead: what counting (counters.py) and the fleet signals cost a slot.

One process, one thread, a private redis-server: ``with fleet.slot(...)`` in a loop with
no slot watchers, with those a Fleet of a Celery app installs (counting for metrics,
flushed to Redis every 2 s in the background; the Celery signals, no receiver), and with a
``slot_admitted`` receiver connected too, in interleaved slices, order alternating;
decisions/s and the ratios (target: the installed watchers cost <= 5%). Round trips per
slot are counted as in ``benchmarks/idempotency.py`` (writes on redis-py connections).
Appends to ``benchmarks/RESULTS.md``.

Run: ``python benchmarks/metrics_overhead.py [--rounds 10] [--slice 0.5] [--no-write]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402
from private_run import report as _report  # noqa: E402
from private_run import writes as _writes  # noqa: E402  (benchmarks/ is on sys.path)

from celery_fleet import Fleet  # noqa: E402
from celery_fleet.celery.signals import slot_admitted  # noqa: E402
from celery_fleet.testing.redis_server import RedisServer, find_binary  # noqa: E402

LIMITS = {"llm": {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--slice", type=float, default=0.5, help="seconds per slice")
    parser.add_argument("--no-write", action="store_true")
    opts = parser.parse_args(argv)
    if opts.rounds < 1 or opts.slice <= 0:
        parser.error("--rounds and --slice must be positive")
    with RedisServer(binary=find_binary()) as server:
        app = Celery("metrics_bench", broker=server.url, set_as_current=False)
        app.conf.update(fleet_redis_url=server.url, fleet_namespace="mb", fleet_limits=LIMITS)
        fleet = Fleet(app)
        watchers = list(fleet.admission.watchers)
        heard = [0]

        def receiver(**_: Any) -> None:
            heard[0] += 1

        kinds = ("no watchers", "watchers (default)", "watchers + a receiver")
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        trips: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(300):
            with fleet.slot("llm", tokens=100):
                pass
        for r in range(opts.rounds):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                fleet.admission.watchers[:] = [] if kind == "no watchers" else watchers
                if kind == "watchers + a receiver":
                    slot_admitted.connect(receiver, weak=False)
                n, w0, start = 0, _writes[0], time.perf_counter()
                while time.perf_counter() - start < opts.slice:
                    with fleet.slot("llm", tokens=100):
                        pass
                    n += 1
                rates[kind].append(n / (time.perf_counter() - start))
                trips[kind].append((_writes[0] - w0) / n)
                slot_admitted.disconnect(receiver)
        fleet.admission.watchers[:] = watchers
        fleet.counters.flush()
        base = statistics.median(rates["no watchers"])
        default = statistics.median(rates["watchers (default)"]) / base
        listened = statistics.median(rates["watchers + a receiver"]) / base
        body = (
            f"- Slot watchers as installed (metrics counting, fleet signals with no receiver): "
            f"**{default:.3f}x** the decisions/s of none (target >= 0.95: "
            f"{'met' if default >= 0.95 else '**NOT met**'}); with a slot_admitted receiver "
            f"connected (a user's own metrics): {listened:.3f}x. Round trips per slot: "
            + ", ".join(f"{k} {statistics.mean(v):.3f}" for k, v in trips.items())
            + f" (counts flushed every 2 s by a background thread); {heard[0]:,} signals "
            "heard.\n\n"
            f"Machine: 1 process, 1 thread, a private redis-server; {opts.rounds} interleaved "
            f"rounds of {opts.slice:g} s slices, order alternating; medians.\n\n"
            "| loop | decisions/s (median) | per-slice range | vs none |\n|---|---:|---:|---:|\n"
            + "".join(
                f"| {k} | {statistics.median(v):,.0f} | {min(v):,.0f}-{max(v):,.0f} | "
                f"{statistics.median(v) / base:.3f}x |\n"
                for k, v in rates.items()
            )
        )
        _report(body, server.url, "Metrics overhead", write=not opts.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
