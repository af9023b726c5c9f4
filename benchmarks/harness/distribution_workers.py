"""The distribution benchmark's workers (``benchmarks/distribution.py``): how they are
started, when they are ready, and what is cleaned up after a run.

- :func:`workers`: ``celery worker`` processes on ``benchmarks.harness.distribution_app``,
  each in a process group of its own (a SIGKILL takes its pool too), stopped by pid;
- :func:`wait_ready`: every worker answers, and with affinity the homes are spread and
  stable (the first worker up is home of every queue until the others announce
  themselves); returns the homes;
- :func:`drop_queues`: a run's queues deleted on a broker other than the Redis DB 13;
- :func:`fleet_stolen`: the fleet's own count of stolen tasks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks.harness.distribution import Workload, settled
from benchmarks.harness.distribution_app import FEATURE, QUEUE
from benchmarks.harness.herd import stop_processes
from celery_fleet import Fleet

__all__ = [
    "RECORDS",
    "ROUTED",
    "Setup",
    "drop_queues",
    "fleet_stolen",
    "routed_queue",
    "visibility_s",
    "wait_ready",
    "worker_names",
    "workers",
]

ROOT = Path(__file__).resolve().parents[2]
#: The Redis list the tasks append their records to.
RECORDS = "dist:records"

#: Plain Celery with hand-written routing (a queue per worker, customers hashed onto them):
#: what users write today without issue 24. Not run unless asked (``--modes``).
ROUTED = "routed"


@dataclass(frozen=True)
class Setup:
    """How the workers run (besides the workload)."""

    url: str
    workers: int = 3
    pool: str = "threads"
    concurrency: int = 2
    queues: int = 32
    threshold: int = 4
    timeout_s: float = 120.0
    logs: str | None = None
    broker: str | None = None  # None: the Redis DB 13 (flushed); else its queues deleted


def visibility_s(load: Workload) -> float:
    """The broker's visibility timeout: short, so a killed worker's messages come back
    within the run, yet well past the longest task (a running task's message is unacked
    all along, and would be delivered a second time past it)."""
    longest = max(load.cost_s(c) for c in range(load.customers)) + load.warmup_s
    return max(5.0, 4 * longest)


def worker_names(setup: Setup) -> list[str]:
    host = os.uname().nodename
    return [f"dist{i}@{host}" for i in range(setup.workers)]


def routed_queue(customer: str, workers: int) -> str:
    """The hand-routed queue of ``customer`` (mode ``routed``): a stable hash onto workers."""
    return f"{QUEUE}.{zlib.crc32(customer.encode()) % workers}"


def queues_of(mode: str, name: str) -> str:
    """A worker's ``-Q``: the default queue, and in ``routed`` its own queue too."""
    if mode != ROUTED:
        return QUEUE
    return f"{QUEUE},{QUEUE}.{name.split('@')[0].removeprefix('dist')}"


@contextlib.contextmanager
def workers(setup: Setup, load: Workload, mode: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """The workers of one run, each in its own process group (a SIGKILL takes its pool too);
    stopped by pid afterwards, whatever happened."""
    env = {
        **os.environ,
        "DIST_ROLE": "worker",
        "DIST_MODE": "shared" if mode == ROUTED else mode,
        "DIST_URL": setup.url,
        "DIST_RECORDS": RECORDS,
        "DIST_WARMUP_S": str(load.warmup_s),
        "DIST_QUEUES": str(setup.queues),
        "DIST_THRESHOLD": str(setup.threshold),
        "DIST_VISIBILITY_S": str(visibility_s(load)),
        "DIST_BROKER": setup.broker or "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in worker_names(setup):
            log = Path(setup.logs, f"{mode}-{name.split('@')[0]}.log") if setup.logs else None
            out = log.open("ab") if log else subprocess.DEVNULL
            command = [
                *(sys.executable, "-m", "celery", "-A", "benchmarks.harness.distribution_app"),
                *("worker", "-P", setup.pool, "-c", str(setup.concurrency), "-n", name),
                *("-Q", queues_of(mode, name), "-O", "fair", "--without-gossip"),
                "--without-mingle",
                *("--without-heartbeat", "-l", "INFO" if log else "WARNING"),
            ]
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            if log:
                out.close()  # type: ignore[union-attr]
        yield procs
    finally:
        stop_processes(*procs, grace_s=15.0)


def wait_ready(
    app: object,
    setup: Setup,
    mode: str,
    procs: list[subprocess.Popen[bytes]],
    deadline_s: float = 60.0,
) -> dict[str, str] | None:
    """Every worker answers a ping; with affinity, every affinity queue has one consumer
    (its home), and the homes returned (queue: worker; None without affinity).
    A worker that exits meanwhile fails the run at once (``--logs`` keeps its output)."""
    control = app.control  # type: ignore[attr-defined]
    deadline = time.monotonic() + deadline_s
    missing = set(worker_names(setup))
    while missing:
        exited = [p.args[-1] for p in procs if p.poll() is not None]
        if exited:
            raise RuntimeError(f"{len(exited)} celery worker(s) exited at start (see --logs)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"celery workers did not start: {sorted(missing)}")
        for reply in control.ping(destination=sorted(missing), timeout=0.5) or []:
            missing -= set(reply)
    if mode in ("shared", ROUTED):
        return None
    # A worker that starts first is home of every queue until the others announce
    # themselves: publish only once the homes are spread and stay put for a second.
    before: dict[str, set[str]] = {}
    while time.monotonic() < deadline:
        replies = control.inspect(timeout=1.0).active_queues() or {}
        now = {w: {q["name"] for q in qs} - {QUEUE} for w, qs in replies.items()}
        if settled(now, worker_names(setup), setup.queues) and now == before:
            return {q: w for w, qs in now.items() for q in qs}
        before = now
        time.sleep(1.0)
    print(f"  ({mode}: the affinity queues' homes had not settled after {deadline_s:g} s)")
    return None


def drop_queues(app: Any, setup: Setup) -> None:
    """On a broker other than the Redis DB 13 (which is flushed), delete the queues a run
    uses, so the next starts empty and nothing is left on a shared RabbitMQ."""
    if setup.broker is None:
        return
    names = [QUEUE, *(f"{QUEUE}.{i}" for i in range(setup.workers))]
    fleet = Fleet.registered(app) if FEATURE else None
    if fleet is not None:
        names += [fleet.distribution.queue_name(q) for q in range(setup.queues)]
    with app.connection_for_write() as conn:
        channel = conn.channel()
        try:
            for name in names:
                channel.queue_delete(name)  # RabbitMQ: a queue that is not there is fine
        finally:
            channel.close()


def fleet_stolen(client: redis.Redis) -> int | None:
    """The tasks the fleet itself counted as stolen (its ``{dist:affinity}:stats`` hash),
    None when this celery_fleet keeps no such count."""
    try:
        from celery_fleet.distribution.status import read_stats
    except ImportError:
        return None

    class Commands:
        def call(self, command: str, *args: object) -> object:
            return client.execute_command(command, *args)

    counts = read_stats(Commands(), "dist")
    return sum(n for k, n in counts.items() if k.startswith("stolen|"))
