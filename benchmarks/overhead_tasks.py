"""Part (e) of ``benchmarks/overhead.py``: a no-op ``@fleet_task`` against a plain no-op task.

This module is both the Celery app the benchmark's workers run
(``celery -A overhead_tasks worker``, with ``benchmarks/`` on ``PYTHONPATH``) and the driver
that starts them (:func:`run_tasks`). The app is configured from environment variables the
driver sets, so every run has its own namespace, queues, control exchange and kombu
bookkeeping keys (all containing the run's ``bench-<uuid>``), on the benchmark's DB.

Both tasks do the same work: time.time() and one INCR of the batch's counter (the first and
the last completion record their time). The fleet task also holds a slot of ``llm`` around
its body (one try_acquire + one release). tasks/s = (completions - 1) / (last - first).
Each batch is published in full to a fresh queue *before* the worker is told to consume it
(``add_consumer``), so publishing speed never limits the rate measured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

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


# -- the driver (runs in the benchmark's process, never in a worker) -----------------------

POOLS = {"threads": ["-P", "threads", "-c", "8"], "prefork": ["-P", "prefork", "-c", "2"]}
KINDS = {"plain": noop, "fleet": fleet_noop}


def _batch(client: redis.Redis, node: str, kind: str, n: int, timeout_s: float) -> float:
    """Publish ``n`` tasks of ``kind`` to a fresh queue, let the worker consume it, wait for
    every completion; tasks/s between the first and the last."""
    tag = f"{RUN}-{kind}-{uuid.uuid4().hex[:8]}"
    task = KINDS[kind]
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            task.apply_async((tag, n), queue=tag, producer=producer)
    if not app.control.add_consumer(tag, destination=[node], reply=True, timeout=10):
        raise RuntimeError(f"worker {node} did not answer add_consumer({tag!r})")
    deadline = time.monotonic() + timeout_s
    while int(client.get(f"{tag}:done") or 0) < n:
        if time.monotonic() > deadline:
            done = int(client.get(f"{tag}:done") or 0)
            raise RuntimeError(f"{kind}: {done} of {n} tasks done after {timeout_s} s")
        time.sleep(0.05)
    app.control.cancel_consumer(tag, destination=[node], reply=True, timeout=10)
    at = {int(k): float(v) for k, v in client.hgetall(f"{tag}:at").items()}
    return (n - 1) / (at[n] - at[1])


def _start_worker(pool: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    node = f"{RUN}-{pool}@bench"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
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


def run_tasks(n: int, rounds: int, pools: list[str]) -> dict[str, dict[str, list[float]]]:
    """tasks/s per pool and kind, one value per round (kinds alternate within a round)."""
    client = redis.Redis.from_url(URL)
    log = Path(os.environ.get("OVERHEAD_LOG", f"/tmp/{RUN}-worker.log"))
    out: dict[str, dict[str, list[float]]] = {}
    for pool in pools:
        proc, node = _start_worker(pool, log)
        try:
            _wait_ready(proc, node, log)
            print(f"(e) {pool} worker pid {proc.pid}: {rounds} x {n} tasks/kind", file=sys.stderr)
            for kind in KINDS:  # warm-up: connections, scripts, prefork children
                _batch(client, node, kind, max(50, n // 10), 120)
            out[pool] = {kind: [] for kind in KINDS}
            for _ in range(rounds):
                for kind in KINDS:
                    out[pool][kind].append(_batch(client, node, kind, n, 300))
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


def report(
    rates: dict[str, dict[str, list[float]]], n: int, target: float, met: dict[bool, str]
) -> tuple[list[str], list[str]]:
    """The headline and the table of (e): fleet / plain tasks/s per pool against ``target``."""
    rows = [
        "| pool | plain tasks/s | fleet tasks/s | **fleet / plain** | per round |",
        "|---|---:|---:|---:|---:|",
    ]
    summary, ok = [], True
    for pool, r in rates.items():
        plain, fl = (sum(r[k]) / len(r[k]) for k in ("plain", "fleet"))
        per = ", ".join(f"{f / p:.2f}" for f, p in zip(r["fleet"], r["plain"], strict=True))
        ok = ok and fl / plain >= target
        summary.append(f"**{fl / plain:.2f}x on {pool}**")
        rows.append(
            f"| {pool} ({' '.join(POOLS[pool][2:])}) | {plain:,.0f} | {fl:,.0f} | "
            f"**{fl / plain:.2f}x** | {per} |"
        )
    head = [
        f"- (e) no-op @fleet_task / plain task, tasks/s: {', '.join(summary)} "
        f"(target >= {target}x on both: {met[ok]})"
    ]
    rounds = len(next(iter(rates.values()))["plain"])
    intro = (
        f"(e) `celery worker`, {rounds} alternating batch(es) of {n:,} tasks per kind, each "
        "published in full to a fresh queue before the worker consumes it (after a warm-up "
        "batch of each); tasks/s from the first to the last completion."
    )
    return head, ["", intro, "", *rows]
