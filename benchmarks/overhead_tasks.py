"""Part (e) of ``benchmarks/overhead.py``: a no-op ``@fleet_task`` against a plain no-op task.

This module is both the Celery app the benchmark's workers run
(``celery -A overhead_tasks worker``, with ``benchmarks/`` on ``PYTHONPATH``) and the driver
that starts them (:func:`run_tasks`). The app is configured from environment variables the
driver sets, so every run has its own namespace, queues, control exchange and kombu
bookkeeping keys (all containing the run's ``bench-<uuid>``), on the benchmark's DB.

Every task does the same work: time.time() and one INCR of the batch's counter (the first
and the last completion record their time). Four kinds: ``plain`` (``@app.task``), ``fleet``
(``@fleet_task(limit="llm", tokens=100)``: a slot of ``llm`` around its body, one
try_acquire + one release), and two that split its cost: ``bare`` (``@fleet_task()`` with no
limit: the task glue alone) and ``slot`` (``@app.task`` whose body opens the same slot
itself: admission alone). tasks/s = (completions - 1) / (last - first). Each batch is published in
full to a fresh queue *before* the worker is told to consume it (``add_consumer``), so
publishing speed never limits the rate measured.

On a box shared with other work, tasks/s moves with the neighbours' load; the worker's CPU
time per task (its process and its pool's children, from ``/proc``, Linux only) moves far
less, so it is reported beside it: plain CPU / fleet CPU is the rate ratio a worker bound
by its own CPU would see.

Standalone (the same part (e) as ``overhead.py --only e``, more rounds, a chosen Redis)::

    .venv/bin/python benchmarks/overhead_tasks.py [--n 3000] [--rounds 3] [--pools threads,prefork]
        [--redis-url redis://127.0.0.1:6379] [--write]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import redis
from celery import Celery

from celery_fleet import Fleet, fleet_task

URL = os.environ.get("OVERHEAD_URL", "redis://127.0.0.1:6379/15")
RUN = os.environ.get("OVERHEAD_RUN", "bench-unset")
LIMIT, TOKENS = "llm", 100
BUDGETS = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}

app = Celery("overhead_tasks", broker=URL)
app.conf.update(
    task_ignore_result=True,
    task_default_queue=f"{RUN}-idle",
    control_exchange=f"{RUN}-ctl",
    event_exchange=f"{RUN}-ev",
    # every kombu key (queues, bindings, unacked, binding deadlines) under the run's prefix
    broker_transport_options={"global_keyprefix": f"{RUN}:"},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    fleet_redis_url=URL,
    fleet_namespace=f"{RUN}-e",
    fleet_limits={LIMIT: BUDGETS},
)
fleet = Fleet(app)
_client: tuple[int, redis.Redis] | None = None


def _done(tag: str, total: int) -> None:
    """Count one completion of batch ``tag``; the first and the ``total``-th record a time."""
    global _client
    if _client is None or _client[0] != os.getpid():  # one client per (prefork) process
        _client = (os.getpid(), redis.Redis.from_url(URL))
    now = time.time()
    n = _client[1].incr(f"{tag}:done")
    if n == 1 or n == total:
        _client[1].hset(f"{tag}:at", str(n), repr(now))


@app.task(name="overhead.noop")  # type: ignore[untyped-decorator]
def noop(tag: str, total: int) -> None:
    _done(tag, total)


@fleet_task(app=app, shared=False, name="overhead.fleet_noop", limit=LIMIT, tokens=TOKENS)  # type: ignore[untyped-decorator]
def fleet_noop(tag: str, total: int) -> None:
    _done(tag, total)


@app.task(name="overhead.slot_noop")  # type: ignore[untyped-decorator]
def slot_noop(tag: str, total: int) -> None:
    with fleet.slot(LIMIT, tokens=TOKENS):
        _done(tag, total)


@fleet_task(app=app, shared=False, name="overhead.bare_noop")  # type: ignore[untyped-decorator]
def bare_noop(tag: str, total: int) -> None:
    _done(tag, total)


# -- the driver (runs in the benchmark's process, never in a worker) -----------------------

POOLS = {"threads": ["-P", "threads", "-c", "8"], "prefork": ["-P", "prefork", "-c", "2"]}
KINDS = {"plain": noop, "fleet": fleet_noop, "bare": bare_noop, "slot": slot_noop}
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


class Batch(NamedTuple):
    """One batch's tasks/s and the worker's CPU µs per task (None where /proc is missing)."""

    rate: float
    cpu_us: float | None


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` and its children (a prefork pool)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    total = 0.0
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        # after the command: state, ppid, ..., utime (14th field of the line), stime (15th)
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) * _TICK_S
    return total


def _batch(
    client: redis.Redis, worker: int, node: str, kind: str, n: int, timeout_s: float
) -> Batch:
    """Publish ``n`` tasks of ``kind`` to a fresh queue, let the worker consume it, wait for
    every completion; tasks/s between the first and the last, and the worker's CPU per task
    from ``add_consumer`` to the last completion."""
    tag = f"{RUN}-{kind}-{uuid.uuid4().hex[:8]}"
    task = KINDS[kind]
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            task.apply_async((tag, n), queue=tag, producer=producer)
    cpu_before = _cpu_s(worker)
    if not app.control.add_consumer(tag, destination=[node], reply=True, timeout=10):
        raise RuntimeError(f"worker {node} did not answer add_consumer({tag!r})")
    deadline = time.monotonic() + timeout_s
    while int(client.get(f"{tag}:done") or 0) < n:
        if time.monotonic() > deadline:
            done = int(client.get(f"{tag}:done") or 0)
            raise RuntimeError(f"{kind}: {done} of {n} tasks done after {timeout_s} s")
        time.sleep(0.05)
    cpu_after = _cpu_s(worker)
    app.control.cancel_consumer(tag, destination=[node], reply=True, timeout=10)
    at = {int(k): float(v) for k, v in client.hgetall(f"{tag}:at").items()}
    cpu_us = None
    if cpu_before is not None and cpu_after is not None:
        cpu_us = (cpu_after - cpu_before) / n * 1e6
    return Batch((n - 1) / (at[n] - at[1]), cpu_us)


def _start_worker(pool: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    node = f"{RUN}-{pool}@bench"
    # this directory first (the app module), then whatever tree the driver runs on
    path = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    cmd = [sys.executable, "-m", "celery", "-A", "overhead_tasks", "worker", *POOLS[pool]]
    cmd += ["-n", node, "--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log.open("ab") as fh:
        proc = subprocess.Popen([*cmd, "-l", "WARNING"], env=env, stdout=fh, stderr=fh)
    return proc, node


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown by SIGTERM to this pid; SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], node: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while not app.control.ping(destination=[node], timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker {node} did not start; see {log}")


Rates = dict[str, dict[str, list[Batch]]]


def run_tasks(n: int, rounds: int, pools: list[str]) -> Rates:
    """A :class:`Batch` per pool, kind and round (kinds alternate within a round, their
    order turning each round)."""
    client = redis.Redis.from_url(URL)
    log = Path(os.environ.get("OVERHEAD_LOG", f"/tmp/{RUN}-worker.log"))
    out: Rates = {}
    for pool in pools:
        proc, node = _start_worker(pool, log)
        try:
            _wait_ready(proc, node, log)
            print(f"(e) {pool} worker pid {proc.pid}: {rounds} x {n} tasks/kind", file=sys.stderr)
            for kind in KINDS:  # warm-up: connections, scripts, prefork children
                _batch(client, proc.pid, node, kind, max(50, n // 10), 120)
            out[pool] = {kind: [] for kind in KINDS}
            order = list(KINDS)
            for i in range(rounds):
                for kind in order[i % len(order) :] + order[: i % len(order)]:
                    out[pool][kind].append(_batch(client, proc.pid, node, kind, n, 300))
        finally:
            _stop(proc)
    client.close()
    log.unlink(missing_ok=True)  # kept when a worker failed (an exception skips this)
    return out


def clean(client: redis.Redis) -> int:
    """Delete the keys of this run's Celery side (queues, bindings, counters); how many."""
    keys = list(client.scan_iter(match=f"*{RUN}*", count=1000))
    if keys:
        client.delete(*keys)
    app.close()
    return len(keys)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(
    rates: Rates, n: int, target: float, met: dict[bool, str]
) -> tuple[list[str], list[str]]:
    """The headline and the tables of (e): fleet / plain tasks/s per pool against ``target``,
    and the worker's CPU per task of each kind."""
    rows = [
        "| pool | plain tasks/s | **fleet / plain** | per round | slot / plain | bare / plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    cpu_rows = [
        "| pool | plain | slot | bare | fleet | **plain / fleet** | plain / slot | plain / bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary, ok = [], True
    for pool, r in rates.items():
        rate = {k: _mean([b.rate for b in r[k]]) for k in KINDS}
        per = ", ".join(
            f"{f.rate / p.rate:.2f}" for f, p in zip(r["fleet"], r["plain"], strict=True)
        )
        ratio = rate["fleet"] / rate["plain"]
        ok = ok and ratio >= target
        shape = " ".join(POOLS[pool][2:])
        rows.append(
            f"| {pool} ({shape}) | {rate['plain']:,.0f} | **{ratio:.2f}x** | {per} | "
            f"{rate['slot'] / rate['plain']:.2f}x | {rate['bare'] / rate['plain']:.2f}x |"
        )
        cpu = {k: [b.cpu_us for b in r[k] if b.cpu_us is not None] for k in KINDS}
        if not all(cpu.values()):
            summary.append(f"**{ratio:.2f}x on {pool}**")
            continue
        us = {k: _mean(v) for k, v in cpu.items()}
        cpu_rows.append(
            f"| {pool} ({shape}) | {us['plain']:,.0f} | {us['slot']:,.0f} | {us['bare']:,.0f} | "
            f"{us['fleet']:,.0f} | **{us['plain'] / us['fleet']:.2f}x** | "
            f"{us['plain'] / us['slot']:.2f}x | {us['plain'] / us['bare']:.2f}x |"
        )
        summary.append(f"**{ratio:.2f}x on {pool}** (CPU {us['plain'] / us['fleet']:.2f}x)")
    head = [
        f"- (e) no-op @fleet_task / plain task, tasks/s: {', '.join(summary)} "
        f"(target >= {target}x on both: {met[ok]})"
    ]
    rounds = len(next(iter(rates.values()))["plain"])
    intro = (
        f"(e) `celery worker`, {rounds} alternating batch(es) of {n:,} tasks per kind, each "
        "published in full to a fresh queue before the worker consumes it (after a warm-up "
        "batch of each); tasks/s from the first to the last completion. `slot`: a plain task "
        "whose body opens the fleet task's slot itself (admission alone); `bare`: a "
        "`@fleet_task` with no limit (the task glue alone)."
    )
    cpu_intro = (
        "The worker's CPU µs per task (process + pool children, user + system, from "
        "`add_consumer` to the last completion): plain / fleet is what a CPU-bound worker's "
        "rate ratio would be, steadier than tasks/s on a shared box."
    )
    tables = ["", intro, "", *rows]
    if len(cpu_rows) > 2:
        tables += ["", cpu_intro, "", *cpu_rows]
    return head, tables


def main(argv: list[str] | None = None) -> int:
    """Run part (e) alone: print its table (``--write`` appends it to RESULTS.md)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    default_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    parser.add_argument("--redis-url", default=default_url, help="default %(default)s; DB 15")
    parser.add_argument("--n", type=int, default=3000, help="tasks per batch, %(default)s")
    parser.add_argument("--rounds", type=int, default=3, help="batches per kind, %(default)s")
    parser.add_argument("--pools", default="threads,prefork", help="default %(default)s")
    parser.add_argument("--write", action="store_true", help="append to RESULTS.md")
    opts = parser.parse_args(argv)
    pools = [p.strip() for p in opts.pools.split(",") if p.strip()]
    if not pools or not set(pools) <= set(POOLS) or opts.n < 2 or opts.rounds < 1:
        parser.error(f"--pools takes a subset of {sorted(POOLS)}; --n >= 2, --rounds >= 1")
    sys.path.insert(0, str(Path(__file__).parent))
    from results import append_section, on_db

    url, run_id = on_db(opts.redis_url, 15), f"bench-{uuid.uuid4().hex[:12]}"
    os.environ.update({"OVERHEAD_URL": url, "OVERHEAD_RUN": run_id})
    import overhead_tasks  # this module again, configured from the environment above

    client = redis.Redis.from_url(url)
    try:
        rates = overhead_tasks.run_tasks(opts.n, opts.rounds, pools)
    finally:
        overhead_tasks.clean(client)
    head, tables = overhead_tasks.report(rates, opts.n, 0.9, {True: "met", False: "**NOT met**"})
    body = "\n".join([*head, *tables]) + "\n"
    print(body)
    if opts.write:
        append_section(client, body, title="Task overhead benchmark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
