"""Where one `fleet.slot()` enter + exit spends its time, layer by layer, on a lone thread.

One process pinned to one core (``os.sched_setaffinity``), admitted every time (huge
budgets), kinds alternating in ``--rounds`` slices of ``--n`` calls each:

- ``ping``: a bare redis-py ``PING`` on the fleet's client (the floor of a round trip);
- ``conn``: the same scripts on a bare redis-py connection, each release written with the
  next acquire and both replies read by redis-py's parser: the scripts' and the parser's
  share, with no combiner;
- ``wire``: the store's packed acquire (``store.send``) and its release posted
  (``store.post``): the round trip as the combiner makes it, no admission logic;
- ``slot``: ``with fleet.slot("llm", tokens=100): pass``, what a task runs.

Per kind: client CPU µs per call (``time.process_time``), wall µs per call
(``perf_counter_ns``) and Redis CPU µs per call (``INFO cpu`` used_cpu_sys+user deltas),
medians over rounds, then slot / ping and the µs each layer adds. ``--profile`` prints the
top of a cProfile of the slot loop. Run it from a checkout (``PYTHONPATH=<checkout>``) to
compare trees::

    PYTHONPATH=. .venv/bin/python benchmarks/slot_layers.py [--url redis://127.0.0.1:6379/6]
        [--n 5000] [--rounds 5] [--cpu 1] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from celery_fleet import Fleet

BUDGETS = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}


def kinds(fleet: Fleet) -> dict[str, Callable[[], Any]]:
    client = fleet.store.client
    admission, store = fleet.admission, fleet.store

    def wire() -> None:
        lease = admission.new_ticket("llm")
        (reply,) = store.send(admission.acquire_command("llm", 100, lease))
        granted = admission.decision("llm", 100, reply).lease_id or ""  # any reply shape
        release = admission.release_command("llm", granted, "ok")
        if not store.post(release, lambda _r: None):  # its script not seen on this wire yet
            store.send(release)

    def slot() -> None:
        with fleet.slot("llm", tokens=100):
            pass

    for _ in range(2):  # the scripts loaded (a fresh server has none)
        slot()
    fleet.store.drain()
    from celery_fleet.store.sync import SCRIPTS, script_source

    for name in SCRIPTS:  # the conn kind sends the lean release alone (a slot never does)
        client.script_load(script_source(name))
    conn = client.connection_pool.get_connection()
    owed: list[bytes] = []

    def conn_kind() -> None:
        lease = admission.new_ticket("llm")
        _name, ask = admission.acquire_command("llm", 100, lease)
        conn.send_packed_command([b"".join(owed) + ask])
        replies = [conn.read_response() for _ in range(len(owed) + 1)]
        granted = admission.decision("llm", 100, replies[-1]).lease_id or ""
        owed[:] = [admission.release_command("llm", granted, "ok")[1]]

    return {"ping": client.ping, "conn": conn_kind, "wire": wire, "slot": slot}


@contextmanager
def pinned(cpu: int = 1) -> Iterator[None]:
    """This process on one core for the block (where the OS allows it), then as before."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu if cpu in before else min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def redis_cpu_us(admin: redis.Redis) -> float:
    info = admin.info("cpu")
    return (float(info["used_cpu_sys"]) + float(info["used_cpu_user"])) * 1e6


def measure(fn: Callable[[], Any], n: int, admin: redis.Redis) -> tuple[float, float, float]:
    """Client CPU, wall and Redis CPU µs per call of ``fn`` over ``n`` calls."""
    r0 = redis_cpu_us(admin)
    c0, w0 = time.process_time(), time.perf_counter_ns()
    for _ in range(n):
        fn()
    c1, w1 = time.process_time(), time.perf_counter_ns()
    r1 = redis_cpu_us(admin)
    return (c1 - c0) * 1e6 / n, (w1 - w0) / 1e3 / n, (r1 - r0) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="redis://127.0.0.1:6379/6")
    ap.add_argument("--n", type=int, default=5000, help="calls per slice")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=1, help="core to pin the client to (-1: none)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--private-port",
        type=int,
        default=0,
        help="start a private redis-server on this port (pinned to the other core) and use it",
    )
    opts = ap.parse_args(argv)
    server = None
    if opts.private_port:
        from celery_fleet.testing.redis_server import RedisServer

        server = RedisServer(port=opts.private_port).start()
        opts.url = server.url + "/0"
        if hasattr(os, "sched_setaffinity") and server.proc is not None and opts.cpu >= 0:
            os.sched_setaffinity(server.proc.pid, {1 - opts.cpu if opts.cpu < 2 else 0})
    try:
        return run(opts)
    finally:
        if server is not None:
            server.stop()


def run(opts: argparse.Namespace) -> int:
    if opts.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {opts.cpu})
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    fleet = Fleet(redis_url=opts.url, namespace=ns, limits={"llm": BUDGETS})
    admin = redis.Redis.from_url(opts.url)
    runs = kinds(fleet)
    for fn in runs.values():  # warm-up: scripts loaded, threads started
        for _ in range(300):
            fn()
    got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(opts.rounds):
        for kind in order if r % 2 == 0 else order[::-1]:
            got[kind].append(measure(runs[kind], opts.n, admin))
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in got.items()}
    print(f"{'kind':6} {'client CPU us':>14} {'wall us':>9} {'Redis CPU us':>13}")
    for kind, (cpu, wall, rcpu) in med.items():
        print(f"{kind:6} {cpu:14.1f} {wall:9.1f} {rcpu:13.1f}")
    ping, conn, wire, slot = med["ping"], med["conn"], med["wire"], med["slot"]
    print(f"slot / ping: wall {slot[1] / ping[1]:.2f}x, client CPU {slot[0] / ping[0]:.2f}x")
    print(f"conn adds to ping: {conn[0] - ping[0]:.1f} us CPU, {conn[1] - ping[1]:.1f} us wall")
    print(f"wire adds to conn: {wire[0] - conn[0]:.1f} us CPU, {wire[1] - conn[1]:.1f} us wall")
    print(f"slot adds to wire: {slot[0] - wire[0]:.1f} us CPU, {slot[1] - wire[1]:.1f} us wall")
    if opts.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(opts.n):
            runs["slot"]()
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    fleet.store.drain()
    keys = list(admin.scan_iter(match=f"{{{ns}*", count=1000))
    if keys:
        admin.delete(*keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
