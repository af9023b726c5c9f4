"""Admission benchmark: what one celery-fleet decision costs, against PING and against `limits`.

One run, one Redis (always DB 12), keys under a fresh `bench-<uuid>` prefix deleted at the end.
Budgets are so large that every request is admitted: this measures the cost of a decision.

1. **Latency** (one process, one client, `perf_counter_ns`, after a warm-up pass) of
   try_acquire, release and acquire+release, as multiples of a bare redis-py `PING` on the same
   client. Samples are interleaved: each iteration runs every row once, in table order. Two rows
   decompose the cost: a no-op EVALSHA carrying acquire.lua's KEYS+ARGV, and acquire.lua via a
   bare redis-py `Script`. Server-side µs per EVALSHA: INFO commandstats, in a separate block.
2. **Throughput**: decisions/s (try_acquire + release, a worker's real cycle) from N spawned
   processes, each with its own clients; ours, the peer's and PING (the ceiling) alternate in
   `--rounds` slices, each after a start barrier, and per-process rates are summed.
3. **Peer**, the same cycle from off-the-shelf parts: two `limits` SlidingWindowCounter hits on
   `RedisStorage` (RPM; TPM with `cost=tokens`) and an in-flight counter under a redis-py `Lock`
   (lock, GET, compare, INCR, unlock; release: lock, DECR, unlock) polling every 1 ms (redis-py's
   default 100 ms would make the peer look worse than a tuned deployment).

Targets: try_acquire <= 1.5x PING at the median; ours >= 1.8x the peer's decisions/s. On a VM,
loopback PING swings ~4x with whether Redis's vCPU is idle (it must be woken up), so also read
the µs try_acquire adds to a PING, which does not swing.

4. **Contention** (`admission.py contention ...`, in `benchmarks/contention.py`): many callers
   looping on `fleet.slot` against one in-flight cap, this tree against the code before the
   ticket line (issue 8); admissions/s, round trips, fairness and admission order.

Usage::

    .venv/bin/python benchmarks/admission.py [--samples 5000] [--seconds 3] [--procs 1,4,16]
    .venv/bin/python benchmarks/admission.py contention [--callers 32,64,1000] [--procs 4]
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing as mp
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import limits
import redis
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from celery_fleet import Fleet
from celery_fleet.store import mask_url, script_source

DB = 12
LIMIT, HELD, TOKENS = "llm", "held", 100
BUDGETS = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}
TARGET_LATENCY_X, TARGET_THROUGHPUT_X = 1.5, 1.8
RESULTS = Path(__file__).with_name("RESULTS.md")


class Ours:
    """celery-fleet: one EVALSHA to acquire, one to release."""

    def __init__(self, url: str, run_id: str) -> None:
        held = {"max_in_flight": 1, "lease": 3600}  # for the "refused" row
        self.fleet = Fleet(redis_url=url, namespace=run_id, limits={LIMIT: BUDGETS, HELD: held})

    def cycle(self) -> None:
        decision = self.fleet.try_acquire(LIMIT, tokens=TOKENS)
        if not decision.allowed:
            raise RuntimeError(f"the benchmark budget refused a request: {decision}")
        self.fleet.release(decision)


class Peer:
    """How it is built today: `limits` for RPM + TPM, a Lock-guarded counter for in-flight."""

    def __init__(self, url: str, run_id: str) -> None:
        storage = RedisStorage(url, key_prefix=f"{run_id}-limits")
        self.window = SlidingWindowCounterRateLimiter(storage)
        self.rpm = limits.RateLimitItemPerMinute(BUDGETS["rpm"])
        self.tpm = limits.RateLimitItemPerMinute(BUDGETS["tpm"])
        self.client = cast(redis.Redis, storage.get_connection())  # one client, as ours
        self.count_key = f"{run_id}-peer:in_flight"
        self.lock = self.client.lock(f"{run_id}-peer:lock", timeout=5, sleep=0.001)

    def acquire(self) -> bool:
        if not self.window.hit(self.rpm, LIMIT):
            return False
        if not self.window.hit(self.tpm, LIMIT, "tokens", cost=TOKENS):
            return False  # the RPM hit stays spent: the two hits are not atomic
        with self.lock:
            if int(self.client.get(self.count_key) or 0) >= BUDGETS["max_in_flight"]:
                return False
            self.client.incr(self.count_key)
        return True

    def release(self) -> None:
        with self.lock:
            self.client.decr(self.count_key)

    def cycle(self) -> None:
        if not self.acquire():
            raise RuntimeError("the benchmark budget refused a peer request")
        self.release()


KINDS = ("ping", "ours", "peer")
Rates = dict[str, list[float]]  # kind -> decisions/s (summed over processes) of each round


def make_cycle(kind: str, url: str, run_id: str) -> Callable[[], object]:
    """One worker's cycle: ours, the peer's, or a bare PING (the ceiling)."""
    if kind == "ping":
        return redis.Redis.from_url(url).ping
    return (Ours if kind == "ours" else Peer)(url, run_id).cycle


# -- latency ------------------------------------------------------------------------------------

ROWS = [
    ("PING", "ping"),
    ("no-op EVALSHA with acquire's KEYS+ARGV", "noop"),
    ("acquire.lua via bare redis-py Script", "raw"),
    ("**try_acquire**", "acquire"),
    ("**release**", "release"),
    ("**acquire+release**", "cycle"),
    ("try_acquire refused (in-flight cap)", "refused"),
    ("peer acquire (2 hits + lock/GET/INCR/unlock)", "peer_acquire"),
    ("peer release (lock/DECR/unlock)", "peer_release"),
    ("peer acquire+release", "peer_cycle"),
]


def sample_latency(ours: Ours, peer: Peer, samples: int) -> dict[str, list[int]]:
    """Interleaved timings in ns, one list per key of ROWS: each sample runs every step once."""
    fleet = ours.fleet
    client = fleet.store.client
    # The exact KEYS and ARGV try_acquire sends (built by Admission, not copied here).
    keys = fleet.admission._acquire_keys[LIMIT]
    # After the lease id: tokens, since (0 = now), join (no), lane, then the per-limit tail.
    args: list[Any] = [TOKENS, 0, b"0", b"0", *fleet.admission._acquire_tail[LIMIT]]
    noop, raw = client.register_script("return 1"), client.register_script(script_source("acquire"))
    got: dict[str, Any] = {}
    steps: dict[str, Callable[[], Any]] = {  # in this order, every sample
        "ping": client.ping,
        "noop": lambda: noop(keys=keys, args=["0" * 32, *args]),
        "raw": lambda: raw(keys=keys, args=[uuid.uuid4().hex, *args]),
        "acquire": lambda: fleet.try_acquire(LIMIT, tokens=TOKENS),
        "release": lambda: fleet.release(got["acquire"]),
        "refused": lambda: fleet.try_acquire(HELD),
        "peer_acquire": peer.acquire,
        "peer_release": peer.release,
    }
    holder = fleet.try_acquire(HELD)
    out: dict[str, list[int]] = {key: [] for _, key in ROWS}
    for _ in range(samples):
        for key, step in steps.items():
            start = time.perf_counter_ns()
            got[key] = step()
            out[key].append(time.perf_counter_ns() - start)
        fleet.admission.release(LIMIT, got["raw"][2].decode())  # untimed: the bare script's lease
        if not got["acquire"].allowed or got["refused"].allowed or not got["peer_acquire"]:
            raise RuntimeError("unexpected admission result in the latency loop")
        out["cycle"].append(out["acquire"][-1] + out["release"][-1])
        out["peer_cycle"].append(out["peer_acquire"][-1] + out["peer_release"][-1])
    fleet.release(holder)
    return out


def server_us(ours: Ours, n: int) -> dict[str, float | None]:
    """Server-side µs per acquire and per release EVALSHA (None if another client ran one)."""
    fleet, decisions = ours.fleet, []

    def evalsha_stats() -> tuple[int, int]:
        found = fleet.store.client.info("commandstats").get("cmdstat_evalsha", {})
        return int(found.get("calls", 0)), int(found.get("usec", 0))

    per_call: dict[str, float | None] = {}
    for key in ("acquire", "release"):
        calls, usec = evalsha_stats()
        for _ in range(n):
            if key == "acquire":
                decisions.append(fleet.try_acquire(LIMIT, tokens=TOKENS))
            else:
                fleet.release(decisions.pop())
        calls_after, usec_after = evalsha_stats()
        per_call[key] = (usec_after - usec) / n if calls_after - calls == n else None
    return per_call


def pct_us(ns: list[int], q: float) -> float:
    s = sorted(ns)
    return float(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]) / 1000


# -- throughput ---------------------------------------------------------------------------------


def _worker(url: str, run_id: str, slice_s: float, rounds: int, barrier: Any, out: Any) -> None:
    try:
        cycles = {kind: make_cycle(kind, url, run_id) for kind in KINDS}
        for cycle in cycles.values():
            for _ in range(200):  # warm up: connect, load scripts
                cycle()
        for round_no in range(rounds):
            for kind, cycle in cycles.items():
                barrier.wait()
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < slice_s:
                    cycle()
                    n += 1
                out.put((round_no, kind, n / (time.perf_counter() - start)))
    except Exception as exc:  # tell the parent rather than leave the barrier hanging
        barrier.abort()
        out.put(f"worker {os.getpid()}: {exc!r}")


def throughput(url: str, run_id: str, procs: int, seconds: float, rounds: int) -> Rates:
    """Per kind, the rate summed over `procs` spawned processes, for each round.

    Kinds alternate in slices of seconds/rounds (each after a barrier), so a machine whose
    speed drifts over seconds (a VM's vCPU idling, a neighbour's load) slows all kinds alike.
    """
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs + 1), ctx.Queue()
    args = (url, run_id, seconds / rounds, rounds, barrier, out)
    workers = [ctx.Process(target=_worker, args=args) for _ in range(procs)]
    for w in workers:
        w.start()
    rates: Rates = {kind: [0.0] * rounds for kind in KINDS}
    try:
        for _ in range(rounds * len(KINDS)):
            barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass  # a worker failed: its message is in the queue
    for _ in range(procs * rounds * len(KINDS)):
        got = out.get(timeout=120)
        if isinstance(got, str):
            for w in workers:
                w.terminate()
            raise SystemExit(f"admission.py: {got}")
        round_no, kind, rate = got
        rates[kind][round_no] += rate
    for w in workers:
        w.join()
    return rates


# -- report -------------------------------------------------------------------------------------


def report(lat: dict[str, list[int]], srv: dict[str, float | None], rates: dict[int, Rates]) -> str:
    """The markdown printed and appended: headline ratios first, then both tables."""
    ping = {q: pct_us(lat["ping"], q) for q in (0.5, 0.99)}
    acquire = {q: pct_us(lat["acquire"], q) for q in (0.5, 0.99)}
    latency_x = acquire[0.5] / ping[0.5]
    mean = {n: {kind: sum(r[kind]) / len(r[kind]) for kind in KINDS} for n, r in rates.items()}
    ratios = {n: m["ours"] / m["peer"] for n, m in mean.items()}
    met = {True: "met", False: "NOT met"}
    by_procs = ", ".join(f"{ratio:.2f}x at {n} proc" for n, ratio in ratios.items())
    lines = [
        f"- **try_acquire / PING: {latency_x:.2f}x at the median**, "
        f"{acquire[0.99] / ping[0.99]:.2f}x at p99; it adds {acquire[0.5] - ping[0.5]:.0f} µs "
        f"to a PING (target <= {TARGET_LATENCY_X}x at the median: "
        f"{met[latency_x <= TARGET_LATENCY_X]})",
        f"- **decisions/s, ours / peer: {by_procs}** (target >= {TARGET_THROUGHPUT_X}x: "
        f"{met[all(r >= TARGET_THROUGHPUT_X for r in ratios.values())]})",
        "",
        f"Latency, {len(lat['ping'])} interleaved samples per row, µs:",
        "",
        "| operation | median | p99 | median / PING | p99 / PING | server µs/call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, key in ROWS:
        med, p99, server = pct_us(lat[key], 0.5), pct_us(lat[key], 0.99), srv.get(key)
        lines.append(
            f"| {label} | {med:.1f} | {p99:.1f} | {med / ping[0.5]:.2f}x | "
            f"{p99 / ping[0.99]:.2f}x | {'-' if server is None else f'{server:.1f}'} |"
        )
    rounds = len(next(iter(rates.values()))["ours"]) if rates else 0
    lines += [
        "",
        f"Throughput, decisions/s (acquire + release) summed over processes, mean of {rounds} "
        "alternating slices:",
        "",
        "| processes | ours | peer | **ours / peer** | per-slice range | PING/s (ceiling) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, m in mean.items():
        per_slice = [o / p for o, p in zip(rates[n]["ours"], rates[n]["peer"], strict=True)]
        lines.append(
            f"| {n} | {m['ours']:,.0f} | {m['peer']:,.0f} | **{ratios[n]:.2f}x** | "
            f"{min(per_slice):.2f}-{max(per_slice):.2f}x | {m['ping']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def header() -> str:
    what = (__doc__ or "").split("\nUsage::")[0].split("\n\n", 1)[1]
    return (
        "# Admission benchmark results\n\nAppended by `benchmarks/admission.py`, one dated "
        "section per run, each naming its machine, versions and exact command.\n\n"
        f"{what}\nDefault run: `cd /work/main && .venv/bin/python benchmarks/admission.py`\n"
    )


def machine(client: redis.Redis) -> str:
    git = ["git", "describe", "--always", "--dirty"]
    try:
        rev = subprocess.run(git, capture_output=True, text=True, cwd=RESULTS.parent, check=True)
        commit = rev.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return (
        f"nproc {os.cpu_count()} ({platform.machine()}), "
        f"Redis {client.info('server')['redis_version']}, Python {platform.python_version()}, "
        f"redis-py {redis.__version__}, limits {limits.__version__}, commit {commit}"
    )


def append_section(client: redis.Redis, body: str, title: str = "") -> None:
    """Append a dated section (``## <title> (<date>)``, or ``## <date>``) to RESULTS.md:
    machine, exact command, then ``body`` (markdown)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    heading = f"{title} ({stamp})" if title else stamp
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    fresh = not RESULTS.exists() or RESULTS.stat().st_size == 0
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(header() if fresh else "")
        fh.write(f"\n## {heading}\n\nMachine: {machine(client)}  \nCommand: `{command}`\n\n")
        fh.write(body)
    print(f"appended to {RESULTS}", file=sys.stderr)


# -- main ---------------------------------------------------------------------------------------


def on_db12(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":  # unix:///path?db=N (urlunsplit would drop the empty host)
        query = [q for q in parts.query.split("&") if q and not q.startswith("db=")]
        return f"{url.split('?')[0]}?{'&'.join([*query, f'db={DB}'])}"
    return urlunsplit(parts._replace(path=f"/{DB}"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    default_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    parser.add_argument(
        "--redis-url", default=default_url, help="default $REDIS_URL, else %(default)s; DB 12"
    )
    parser.add_argument("--samples", type=int, default=5000, help="latency samples per row")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="run time per kind and process count"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="--seconds is split in this many alternating slices"
    )
    parser.add_argument("--procs", default="1,4,16", help="process counts (default %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(argv)
    opts.procs = [int(p) for p in opts.procs.split(",") if p.strip().isdigit() and int(p) > 0]
    if opts.samples < 1 or opts.seconds <= 0 or opts.rounds < 1 or not opts.procs:
        parser.error("--samples, --seconds, --rounds and --procs must be positive")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["contention"]:  # section 4 lives in its own file
        from contention import main as contention_main

        return contention_main(argv[1:])
    opts = parse_args(argv)
    url, run_id = on_db12(opts.redis_url), f"bench-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"admission.py: Redis at {mask_url(url)} does not answer: {exc}", file=sys.stderr)
        return 2
    try:
        ours, peer = Ours(url, run_id), Peer(url, run_id)
        sample_latency(ours, peer, min(500, opts.samples))  # warm-up, discarded
        print(f"latency: {opts.samples} interleaved samples ...", file=sys.stderr)
        lat = sample_latency(ours, peer, opts.samples)
        srv = server_us(ours, min(1000, opts.samples))
        rates: dict[int, Rates] = {}
        for n in opts.procs:
            print(f"throughput: {n} process(es), {opts.seconds} s per kind", file=sys.stderr)
            rates[n] = throughput(url, run_id, n, opts.seconds, opts.rounds)
        table = report(lat, srv, rates)
    finally:
        for key in client.scan_iter(match=f"*{run_id}*", count=1000):
            client.delete(key)
    print(table)
    if not opts.no_write:
        append_section(client, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
