"""What OpenTelemetry tracing adds to a slot admitted at once (the hot path), in one run.

One process, one thread, one Redis (DB 15, keys under a fresh prefix deleted at the end);
budgets so large that every slot is admitted at its first ask. The same loop of
``with fleet.slot("llm"): pass`` runs in interleaved slices under four setups:

- ``none``: no tracing watcher, what a process without OpenTelemetry runs (the baseline);
- ``api``: the watcher a Fleet adds when OpenTelemetry is installed, with no SDK set up
  (the global no-op provider), ``fleet_trace_admissions`` unset ("waits");
- ``sdk``: the same with the real SDK's provider (in-memory exporter): still no span,
  since no slot waits;
- ``all``: ``fleet_trace_admissions = "all"`` with the SDK: a span for every admission.

Prints slots/s per setup, the median over slices, and each against ``none``; and, since a
slot's round trip to Redis hides anything this small on a busy machine, the watcher's own
cost per admission (``timeit`` of the call a slot admitted at once makes, in ns) beside the
slot's. Target: ``api`` and ``sdk`` add under 0.1% to a slot (one Python call that returns).

Usage::

    .venv/bin/python benchmarks/tracing_overhead.py [--seconds 1.0] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import timeit
import uuid
from collections.abc import Callable
from typing import Any

import redis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from celery_fleet import Fleet
from celery_fleet.observability import tracing

DB = 15
BUDGETS = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}


def slots_per_s(fleet: Fleet, seconds: float) -> float:
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            with fleet.slot("llm", tokens=100):
                pass
        n += 50
    return n / seconds


def setups(fleet: Fleet) -> dict[str, Callable[[], Any]]:
    """Each setup's watchers, installed by the returned callables."""
    base = [w for w in fleet.admission.watchers if not _is_tracer(w)]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def install(extra: Any) -> Callable[[], Any]:
        def go() -> Any:
            exporter.clear()
            fleet.admission.watchers[:] = [*base, *([extra] if extra else [])]

        return go

    return {
        "none": install(None),
        "api": install(tracing.admission_watcher("waits")),
        "sdk": install(tracing.admission_watcher("waits", provider)),
        "all": install(tracing.admission_watcher("all", provider)),
    }


def _is_tracer(watcher: Any) -> bool:
    return "tracing" in getattr(watcher, "__module__", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="per slice, default 1.0")
    parser.add_argument("--rounds", type=int, default=6, help="slices per setup, default 6")
    args = parser.parse_args()
    url = f"{args.redis_url.rstrip('/')}/{DB}"
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    fleet = Fleet(redis_url=url, namespace=ns, limits={"llm": BUDGETS})
    runs: dict[str, list[float]] = {}
    try:
        kinds = setups(fleet)
        slots_per_s(fleet, 0.3)  # warm up: scripts loaded, connections open
        for r in range(args.rounds):
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            for kind in order:
                kinds[kind]()
                runs.setdefault(kind, []).append(slots_per_s(fleet, args.seconds))
    finally:
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"*{ns}*"))
        if keys:
            client.delete(*keys)
        client.close()
    base = statistics.median(runs["none"])
    slot_ns = 1e9 / base
    print(f"{'setup':<6} {'slots/s (median)':>17} {'min':>9} {'max':>9} {'vs none':>8}", end="")
    print(f" {'watcher ns/admission':>21} {'of a slot':>10}")
    for kind, rates in runs.items():
        med = statistics.median(rates)
        ns_call = watcher_ns(fleet, kinds[kind])
        print(
            f"{kind:<6} {med:>17.0f} {min(rates):>9.0f} {max(rates):>9.0f} {med / base:>8.3f}",
            end="",
        )
        print(f" {ns_call:>21.0f} {ns_call / slot_ns:>9.3%}")


def watcher_ns(fleet: Fleet, install: Callable[[], Any], n: int = 200_000) -> float:
    """The tracing watcher's cost for one admission at once (the ``admitted`` event), ns."""
    install()
    tracers = [w for w in fleet.admission.watchers if _is_tracer(w)]
    if not tracers:
        return 0.0
    (watch,) = tracers
    fields = {"waited_s": 0.0, "attempts": 1}
    best = min(timeit.timeit(lambda: watch("admitted", "llm", fields), number=n) for _ in range(3))
    return best / n * 1e9


if __name__ == "__main__":
    main()
