"""Idempotency overhead: what a key costs a task at publish and at execution, against a plain task.

One run, one private redis-server (broker and fleet state), in one process:

- **publish**: ``apply_async`` of a plain ``@app.task``, of a ``@fleet_task`` with no key, of
  a keyed ``@fleet_task`` with a new key each time (the ledger's enqueue script, the
  publish and its confirmation), and of a duplicate of an already published key (the
  script, no publish);
- **execution**: ``task.apply()`` (Celery's tracer with a request, as in a worker, no
  broker) of the same three tasks, and of a key that already succeeded (claim answers
  "done": the stored result, no body).

Per operation: round trips (writes on redis-py connections, counted by wrapping
``Connection.send_packed_command`` in this process) and the median latency, over
interleaved rounds; ratios against the plain task of the same run. Appends to
``benchmarks/RESULTS.md``.

Run: ``python benchmarks/idempotency.py [--ops 300] [--rounds 5] [--no-write]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery  # noqa: E402
from private_run import report as _report  # noqa: E402
from private_run import writes as _writes  # noqa: E402  (benchmarks/ is on sys.path)

from celery_fleet import Fleet, fleet_task  # noqa: E402
from celery_fleet.testing.redis_server import RedisServer, find_binary  # noqa: E402


def build(url: str) -> dict[str, Callable[[int], Any]]:
    """The operations, each taking a fresh integer."""
    app = Celery("idem_bench", broker=url, set_as_current=False)
    app.conf.update(task_ignore_result=True, task_default_queue=f"idem-{uuid.uuid4().hex[:6]}",
                    fleet_redis_url=url, fleet_namespace="idem", fleet_limits={})  # fmt: skip
    Fleet(app)
    run = uuid.uuid4().hex[:6]

    @app.task(shared=False)
    def plain(i: int) -> int:
        return i

    @fleet_task(app=app, shared=False)
    def unkeyed(i: int) -> int:
        return i

    @fleet_task(app=app, shared=False, idempotency_key="bench:" + run + ":{i}")
    def keyed(i: int) -> int:
        return i

    @fleet_task(app=app, shared=False, idempotency_key="bench-x:" + run + ":{i}")
    def keyed_x(i: int) -> int:
        return i

    done = 10**9
    keyed_x.apply((done,))  # a key that has succeeded: its duplicates replay
    keyed.apply_async((done,))  # a key that is queued: its duplicates are not published
    return {
        "publish plain": lambda i: plain.apply_async((i,)),
        "publish fleet, no key": lambda i: unkeyed.apply_async((i,)),
        "publish keyed, new key": lambda i: keyed.apply_async((i,)),
        "publish keyed, duplicate": lambda i: keyed.apply_async((done,)),
        "execute plain": lambda i: plain.apply((i,)),
        "execute fleet, no key": lambda i: unkeyed.apply((i,)),
        "execute keyed, new key": lambda i: keyed_x.apply((i,)),
        "execute keyed, done key": lambda i: keyed_x.apply((done,)),
    }


def measure(ops: dict[str, Callable[[int], Any]], n: int, rounds: int) -> dict[str, Any]:
    lat: dict[str, list[float]] = {k: [] for k in ops}
    trips: dict[str, int] = dict.fromkeys(ops, 0)
    seq = 0
    for op in ops.values():  # warm up: connections, scripts
        for _ in range(20):
            seq += 1
            op(seq)
    for r in range(rounds):
        for name in ops if r % 2 == 0 else reversed(list(ops)):
            op = ops[name]
            before = _writes[0]
            for _ in range(n):
                seq += 1
                t = time.perf_counter()
                op(seq)
                lat[name].append(time.perf_counter() - t)
            trips[name] += _writes[0] - before
    return {k: (trips[k] / (n * rounds), statistics.median(lat[k]) * 1e6) for k in ops}


def report(got: dict[str, Any], n: int, rounds: int, parser: str) -> str:
    rows = [
        f"Machine: 1 process, a private redis-server ({parser} parser); {rounds} interleaved "
        f"rounds x {n} operations each; round trips = writes on redis-py connections.",
        "",
        "| operation | round trips | median µs | vs plain |",
        "|---|---:|---:|---:|",
    ]
    for name, (trips, us) in got.items():
        base = got["publish plain" if name.startswith("publish") else "execute plain"][1]
        rows.append(f"| {name} | {trips:.2f} | {us:,.0f} | {us / base:.2f}x |")
    p, e = got["publish keyed, new key"], got["execute keyed, new key"]
    head = (
        f"- A key adds **{p[0] - got['publish plain'][0]:.2f} round trip(s)** to a publish "
        f"({p[1] / got['publish plain'][1]:.2f}x a plain publish's median) and "
        f"**{e[0] - got['execute plain'][0]:.2f}** to an execution "
        f"({e[1] / got['execute plain'][1]:.2f}x a plain execution's median, with no broker "
        "in the way); in all, a duplicate publish costs "
        f"{got['publish keyed, duplicate'][0]:.2f} round trip(s) and publishes nothing, a "
        f"done key's execution {got['execute keyed, done key'][0]:.2f} and runs no body."
    )
    return "\n".join([head, "", *rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=300, help="operations per round and kind")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(argv)
    if opts.ops < 1 or opts.rounds < 1:
        parser.error("--ops and --rounds must be positive")
    with RedisServer(binary=find_binary()) as server:
        got = measure(build(server.url), opts.ops, opts.rounds)
        hiredis = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure-Python"
        body = report(got, opts.ops, opts.rounds, hiredis)
        _report(body, server.url, "Idempotency overhead", write=not opts.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
