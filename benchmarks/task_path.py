"""The task path in-process: what a worker's tracer spends on a no-op task of each kind.

No worker, no broker consumer: the tracer a worker builds for a task (``build_tracer``,
non-eager, the request dict a worker passes) is called in a loop, in this process, on a real
app whose fleet is on Redis, so the figures are the task path's CPU alone, without the
consumer loop, the pool or the GIL handoffs of ``overhead_tasks.py``'s real workers. Every
task does one INCR. Kinds, as there: ``plain`` (``@app.task``), ``slot`` (a plain task whose
body opens a slot of ``llm``), ``bare`` (``@fleet_task()``, no limit), ``fleet``
(``@fleet_task(limit="llm", tokens=100)``). Rounds alternate the kinds, their order turning;
CPU µs per task (``time.process_time``), the best round of each kind, and the two
differences that are the task glue: bare - plain, fleet - slot.

For figures that do not move with the box's load, run it under callgrind with
``--callgrind``: each kind's loop is then counted alone (``callgrind_control`` zeroes the
counters before it and dumps them after) and the table gives instructions per task; compare
them between trees (``PYTHONPATH=<tree>``).

Usage::

    .venv/bin/python benchmarks/task_path.py [--n 2000] [--rounds 7] [--redis-url URL]
    valgrind --tool=callgrind .venv/bin/python benchmarks/task_path.py --callgrind --n 300
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.app.trace import build_tracer

from celery_fleet import Fleet, fleet_task

LIMIT, TOKENS = "llm", 100
BUDGETS = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}
KINDS = ("plain", "slot", "bare", "fleet")


def build(url: str, run_id: str) -> tuple[Celery, Fleet, dict[str, Any], redis.Redis]:
    """The app, its fleet, one task per kind (by kind), and the client their bodies INCR on."""
    app = Celery("task_path", broker=url, set_as_current=False)
    app.conf.update(task_ignore_result=True, fleet_redis_url=url, fleet_namespace=run_id,
                    fleet_limits={LIMIT: BUDGETS}, fleet_defer_signing_key="x" * 32)  # fmt: skip
    fleet = Fleet(app)
    client = redis.Redis.from_url(url)
    counter = f"{run_id}:done"

    @app.task(name="path.plain")  # type: ignore[untyped-decorator]
    def plain() -> None:
        client.incr(counter)

    @app.task(name="path.slot")  # type: ignore[untyped-decorator]
    def slot() -> None:
        with fleet.slot(LIMIT, tokens=TOKENS):
            client.incr(counter)

    @fleet_task(app=app, shared=False, name="path.bare")  # type: ignore[untyped-decorator]
    def bare() -> None:
        client.incr(counter)

    @fleet_task(app=app, shared=False, name="path.fleet", limit=LIMIT, tokens=TOKENS)  # type: ignore[untyped-decorator]
    def fleet_noop() -> None:
        client.incr(counter)

    app.finalize()
    tasks = {kind: app.tasks[f"path.{kind}"] for kind in KINDS}
    return app, fleet, tasks, client


def tracer_loop(app: Celery, task: Any) -> Callable[[int], float]:
    """A function running ``n`` traced calls of ``task`` as a worker would: CPU µs per call."""
    trace = build_tracer(task.name, task, app=app, eager=False, propagate=True)

    def loop(n: int) -> float:
        start = time.process_time()
        for _ in range(n):
            task_id = str(uuid.uuid4())
            request = {"id": task_id, "task": task.name, "args": [], "kwargs": {},
                       "delivery_info": {"routing_key": "celery", "exchange": ""},
                       "hostname": "bench@path", "is_eager": False, "retries": 0,
                       "correlation_id": task_id, "ignore_result": True}  # fmt: skip
            if trace(task_id, (), {}, request).info is not None:
                raise RuntimeError(f"{task.name} did not succeed")
        return (time.process_time() - start) / n * 1e6

    return loop


def counted(loops: dict[str, Callable[[int], float]], n: int) -> dict[str, float]:
    """Under callgrind: the instructions per task of each kind, each loop counted alone
    (zeroed before, dumped after, read back from the dump's ``summary:`` line)."""
    pid = str(os.getpid())
    out: dict[str, float] = {}
    for kind, loop in loops.items():
        subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
        loop(n)
        subprocess.run(["callgrind_control", "-d", kind, pid], check=True, capture_output=True)
        newest = max(glob.glob(f"callgrind.out.{pid}.*"), key=os.path.getmtime)
        with open(newest, encoding="utf-8") as fh:
            summary = next(line for line in fh if line.startswith("summary:"))
        out[kind] = int(summary.split()[1]) / n
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    default_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    parser.add_argument("--redis-url", default=default_url, help="default %(default)s; DB 15")
    parser.add_argument("--n", type=int, default=2000, help="calls per kind and round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds, default %(default)s")
    parser.add_argument(
        "--callgrind", action="store_true", help="under valgrind: instructions per task"
    )
    opts = parser.parse_args(argv)
    if opts.n < 1 or opts.rounds < 1:
        parser.error("--n and --rounds must be positive")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from results import on_db

    run_id = f"bench-{uuid.uuid4().hex[:12]}"
    app, _, tasks, client = build(on_db(opts.redis_url, 15), run_id)
    loops = {kind: tracer_loop(app, task) for kind, task in tasks.items()}
    try:
        for loop in loops.values():
            loop(max(20, opts.n // 10))  # warm-up: connections, scripts
        if opts.callgrind:
            best, unit = counted(loops, opts.n), "instructions / task"
            head = f"{opts.n:,} traced calls per kind under callgrind, each kind counted alone"
        else:
            cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for i in range(opts.rounds):
                for kind in KINDS[i % len(KINDS) :] + KINDS[: i % len(KINDS)]:
                    cpu[kind].append(loops[kind](opts.n))
            best, unit = {kind: min(values) for kind, values in cpu.items()}, "CPU µs / task"
            head = f"{opts.rounds} alternating rounds of {opts.n:,} traced calls per kind; best"
    finally:
        for key in client.scan_iter(match=f"*{run_id}*", count=1000):
            client.delete(key)
        app.close()
    print(head)
    print(f"| kind | {unit} | / plain |\n|---|---:|---:|")
    for kind in KINDS:
        print(f"| {kind} | {best[kind]:,.1f} | {best[kind] / best['plain']:.2f}x |")
    print(f"\ntask glue: bare - plain = {best['bare'] - best['plain']:,.1f}, "
          f"fleet - slot = {best['fleet'] - best['slot']:,.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
