"""Keys (tenants) benchmark: what a key costs an admission, and fair share between keys.

1. **Cost** (one process, one client, interleaved samples after a warm-up): the median µs
   of ``try_acquire`` + ``release`` against a limit without keys (``plain``), the same
   limit with a key sub-limit asked by one key (``keyed``) and by a new key every time
   (``one-off``), and with weights only (``weights``); plus the EVALSHA calls per cycle
   (Redis ``INFO commandstats``): an uncontended keyed admission stays one round trip. Run
   it with ``PYTHONPATH`` on the tree before the change too (only ``plain`` runs there):
   the two ``plain`` figures of the same session are the before/after.
   With ``--before TREE`` (a checkout of the code before keys) the two acquire scripts are
   also compared directly: pipelines of 400 asks of a limit without keys, alternating
   the scripts 80 times on the same Redis (server time plus one pipeline's I/O, no
   Python per ask): the plain limit's admission must cost the same.
2. **Keys left**: the one-off keys' Redis state after their TTL (target: none).
3. **Fair share**: threads of three keys with 300, 30 and 3 callers behind one in-flight
   cap of 6, spread over ``--procs`` processes (default 3), each call a chat completion
   against a ProviderSim with the same cap (about 20 ms of latency; a 429 would be
   counted): admitted share per key and Jain's index over normalized shares (target >=
   0.99), with keys (``"weights": {}``) and without (FIFO by age, the baseline).

Usage::

    .venv/bin/python benchmarks/tenants.py [--url redis://127.0.0.1:6379] [--samples 3000]
        [--fair-seconds 9] [--no-write]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from results import append_section, on_db

from celery_fleet import ConfigError, Fleet, Throttled
from celery_fleet.admission.config import parse_limits
from celery_fleet.admission.decision import LimitKeys, acquire_args
from celery_fleet.store.specs import ACQUIRE

DB = 13
LIMIT = "llm"
SETUPS: dict[str, dict[str, Any]] = {
    "plain": {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6},
    "keyed": {
        "rpm": 10**9,
        "tpm": 10**12,
        "max_in_flight": 10**6,
        "keys": {"rpm": 10**8, "max_in_flight": 10**5},
    },
    "weights": {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6, "weights": {"a": 2}},
}


def _fleet(url: str, spec: dict[str, Any], lease: float = 60) -> Fleet | None:
    try:
        return Fleet(
            limits={LIMIT: {**spec, "lease": lease}},
            redis_url=url,
            namespace=f"bench-{uuid.uuid4().hex[:8]}",
        )
    except ConfigError:
        return None  # the tree before keys: only "plain" runs


def _evalsha(client: redis.Redis) -> tuple[int, int]:
    """EVALSHA calls so far and the µs Redis spent in them."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def cost(
    url: str, samples: int, only: list[str] | None = None
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    fleets = {name: _fleet(url, spec) for name, spec in SETUPS.items()}
    fleets["one-off"] = _fleet(url, SETUPS["keyed"], lease=1)
    runs: dict[str, list[int]] = {
        name: [] for name, f in fleets.items() if f is not None and name in (only or fleets)
    }
    keyed = {"keyed": "acme", "weights": "a"}
    client = redis.Redis.from_url(url)
    calls: dict[str, float] = {}
    server: dict[str, float] = {}
    for name in runs:  # warm-up, and the round trips and Redis µs per cycle
        f = fleets[name]
        assert f is not None
        n0, us0 = _evalsha(client)
        for i in range(1000):
            key = f"warm-{i}" if name == "one-off" else keyed.get(name)
            f.release(f.try_acquire(LIMIT, key=key) if key else f.try_acquire(LIMIT))
        n1, us1 = _evalsha(client)
        calls[name] = (n1 - n0) / 1000
        server[name] = (us1 - us0) / 1000
    for i in range(samples):
        for name in runs:
            f = fleets[name]
            assert f is not None
            key = f"tenant-{i}-{uuid.uuid4().hex[:6]}" if name == "one-off" else keyed.get(name)
            t0 = time.perf_counter_ns()
            d = f.try_acquire(LIMIT, key=key) if key else f.try_acquire(LIMIT)
            f.release(d)
            runs[name].append(time.perf_counter_ns() - t0)
    client.close()
    medians = {name: statistics.median(ns) / 1000 for name, ns in runs.items()}
    return medians, calls, server


def _acquire_source(tree: str) -> str:
    code = (
        "import sys; from celery_fleet.store.sync import script_source; "
        "sys.stdout.write(script_source('acquire'))"
    )
    env = {**os.environ, "PYTHONPATH": tree}
    return subprocess.check_output([sys.executable, "-c", code], env=env).decode()


def ab_acquire(url: str, before: str, rounds: int = 80, n: int = 400) -> list[str]:
    """Median and best µs per pipelined ask of a limit without keys: before vs this tree."""
    client = redis.Redis.from_url(url)
    here = str(Path(__file__).resolve().parents[1])
    shas = {"before": client.script_load(_acquire_source(before))}
    shas["after"] = client.script_load(_acquire_source(here))
    cfg = parse_limits({LIMIT: SETUPS["plain"]})[LIMIT]
    lk = LimitKeys.build(f"bench-ab-{uuid.uuid4().hex[:6]}", LIMIT)
    keys, tail = ACQUIRE.keys_of(lk), acquire_args(cfg)
    per: dict[str, list[float]] = {name: [] for name in shas}
    for r in range(rounds):
        order = list(shas.items()) if r % 2 else list(shas.items())[::-1]
        for name, sha in order:
            pipe = client.pipeline(transaction=False)
            for i in range(n):
                pipe.evalsha(sha, len(keys), *keys, f"ask{i}", 10, 0, 0, 0, *tail)
            t0 = time.perf_counter()
            pipe.execute()
            per[name].append((time.perf_counter() - t0) / n * 1e6)
            client.delete(lk.leases, lk.ctl)
    client.close()
    # paired: each round's after / before (the two ran back to back), robust to load drift
    ratios = [a / b for a, b in zip(per["after"], per["before"], strict=True)]
    return [
        *(
            f"acquire.lua {name:<6} (no keys, pipelined): median {statistics.median(v):.2f} "
            f"µs/ask, best {min(v):.2f}"
            for name, v in per.items()
        ),
        f"acquire.lua after/before, paired by round: median {statistics.median(ratios):.3f}",
    ]


def keys_left(url: str, n: int) -> tuple[int, float]:
    """``n`` one-off keys against a 1 s key window and 1 s leases: keys left after 10 s."""
    spec = {"rate": "1000000/second", "keys": {"rate": "10/second", "max_in_flight": 5}}
    f = _fleet(url, spec, lease=1)
    if f is None:
        return -1, 0.0
    for i in range(n):
        f.release(f.try_acquire(LIMIT, key=f"one-off-{i}"))
    client = redis.Redis.from_url(url)
    pattern = f"{{{f.namespace}:{LIMIT}}}:k:*"
    start = time.monotonic()
    left = len(list(client.scan_iter(match=pattern, count=10_000)))
    while left and time.monotonic() - start < 10:
        time.sleep(0.25)
        left = len(list(client.scan_iter(match=pattern, count=10_000)))
    client.close()
    return left, time.monotonic() - start


CALLERS = {"big": 300, "mid": 30, "small": 3}


def _fair_process(
    url: str, namespace: str, spec: dict[str, Any], callers: dict[str, int], keyed: bool,
    seconds: float, sim_url: str, barrier: Any, out: Any,
) -> None:  # fmt: skip
    """One process of the fair-share run: its threads of each key, counted in the window."""
    import httpx

    f = Fleet(limits={LIMIT: spec}, redis_url=url, namespace=namespace)
    stop, counting = threading.Event(), threading.Event()
    admitted: Counter[str] = Counter()
    lock = threading.Lock()
    client = httpx.Client(base_url=sim_url, limits=httpx.Limits(max_connections=16), timeout=30)
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

    def worker(key: str) -> None:
        while not stop.is_set():
            try:
                with f.slot(LIMIT, key=key, max_wait=30) if keyed else f.slot(LIMIT, max_wait=30):
                    status = client.post("/chat/completions", json=body).status_code
                    if counting.is_set():
                        with lock:
                            admitted[key if status == 200 else f"http {status}"] += 1
            except Throttled:
                continue

    threads = [
        threading.Thread(target=worker, args=(k,), daemon=True)
        for k, n in callers.items()
        for _ in range(n)
    ]
    barrier.wait()
    for t in threads:
        t.start()
    time.sleep(seconds / 3)
    counting.set()
    time.sleep(seconds * 2 / 3)
    counting.clear()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    client.close()
    out.put(dict(admitted))


def fair(url: str, keyed: bool, seconds: float, procs: int = 3) -> Counter[str]:
    """Threads of 300, 30 and 3 callers of three keys, spread over ``procs`` processes."""
    spec: dict[str, Any] = {"max_in_flight": 6, "lease": 30}
    if keyed:
        spec["weights"] = {}
    if _fleet(url, spec) is None:
        return Counter()
    from celery_fleet.testing import ProviderSim

    sim = ProviderSim(rpm=None, tpm=None, max_in_flight=6, latency=0.02, latency_sigma=0.1)
    sim.start()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    shares = [
        {k: n // procs + (1 if i < n % procs else 0) for k, n in CALLERS.items()}
        for i in range(procs)
    ]
    workers = [
        ctx.Process(
            target=_fair_process,
            args=(url, namespace, spec, part, keyed, seconds, sim.base_url, barrier, out),
        )
        for part in shares
    ]
    for w in workers:
        w.start()
    admitted: Counter[str] = Counter()
    for _ in workers:
        admitted.update(out.get(timeout=seconds + 120))
    for w in workers:
        w.join(timeout=60)
    sim.stop()
    return admitted


def jain(shares: list[float]) -> float:
    return sum(shares) ** 2 / (len(shares) * sum(x * x for x in shares)) if any(shares) else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--one-off", type=int, default=10_000)
    parser.add_argument("--fair-seconds", type=float, default=9.0)
    parser.add_argument("--procs", type=int, default=3, help="processes of the fair-share run")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--cost-only", action="store_true", help="only the cost table")
    parser.add_argument("--only", help="comma-separated setups of the cost table (default all)")
    parser.add_argument("--before", help="a checkout of the code before keys (A/B of acquire)")
    args = parser.parse_args()
    url = on_db(args.url, DB)
    only = args.only.split(",") if args.only else None
    medians, calls, server = cost(url, args.samples, only)
    lines = ["```text", "setup      µs/cycle (median)  EVALSHA/cycle  Redis µs/cycle  vs plain"]
    for name, us in medians.items():
        lines.append(
            f"{name:<10} {us:>17.1f}  {calls[name]:>13.2f}  {server[name]:>14.1f}  "
            f"{us / medians['plain']:>8.3f}"
        )
    if args.before:
        lines += ab_acquire(url, args.before)
    if args.cost_only:
        print("\n".join(lines))
        return 0
    left, waited = keys_left(url, args.one_off)
    if left >= 0:
        lines.append(f"{args.one_off} one-off keys: {left} Redis keys left {waited:.1f} s later")
    for keyed in (False, True):
        admitted = fair(url, keyed, args.fair_seconds, args.procs)
        if not admitted:
            continue
        total = sum(admitted[k] for k in CALLERS)
        refused = sum(n for k, n in admitted.items() if k not in CALLERS)
        shares = [admitted[k] / total for k in CALLERS]
        answered = {k: admitted[k] for k in CALLERS}
        lines.append(
            f"{'keys' if keyed else 'FIFO'}: answered {answered}"
            f", shares {[round(s, 3) for s in shares]}, Jain {jain([3 * s for s in shares]):.4f}"
            f", ProviderSim errors {refused}"
        )
    lines.append("```")
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_write:
        client = redis.Redis.from_url(url)
        append_section(client, body, "Keys (tenants): cost and fair share (issue 23)")
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
