"""Admission benchmark: what one celery-fleet decision costs, against PING and against fair peers.

One run, one Redis (always DB 12), keys under a fresh `bench-<uuid>` prefix deleted at the end.
Budgets are so large that every request is admitted: this measures the cost of a decision.

1. **Latency** (one process, one client, `perf_counter_ns`, after a warm-up pass) of
   try_acquire, release and acquire+release, and of the lean and Lock-based peers, as multiples
   of a bare redis-py `PING` on the same client. Samples are interleaved: each iteration runs
   every row once, in table order. `--runs` such runs each report their median try_acquire /
   PING beside their floor, a no-op EVALSHA carrying acquire.lua's KEYS+ARGV; the headline is
   the median over runs. A row of acquire.lua via a bare redis-py `Script` completes the
   decomposition. Server-side µs per call: INFO commandstats, in a separate block.
2. **Throughput**: decisions/s (acquire + release, a worker's real cycle) from N spawned
   processes, each with its own clients; all builds and PING (the ceiling) alternate in
   `--rounds` slices, each after a start barrier, and per-process rates are summed.
3. **Builds** of the same job (RPM, TPM with tokens as cost, an in-flight cap; peers in
   `peers.py`): *ours: slot()* (`with fleet.slot(...): pass`, what a task runs) and *ours:
   try_acquire* (+ release); *lean Lua*, the single ~15-line script a strong engineer writes by
   hand (GCRA for both budgets in one hash, a lease zset, all or nothing on Redis TIME; release
   is one ZREM), with none of ours' line, breaker, adaptive cap or lease bookkeeping;
   *lean Lua, 1 round trip*, the same script with its release (the `ZREM`) sent with the next
   acquire in one write of packed RESP on a redis-py connection, both replies read together
   by its parser (and the same over a plain socket, replies read as lines: *raw socket*);
   *limits + INCR*, two `limits` SlidingWindowCounter hits (RPM; TPM with `cost=tokens`) and a
   lock-free in-flight counter; *limits + Lock (strawman)*, the same hits and a counter under
   a redis-py `Lock` polled every 1 ms, the peer this benchmark used to report.

   `--threads 4x4,16x16` adds P processes of T threads each, for `slot()` (one Fleet per
   process, as in a `-P threads` worker) and the lean peers (a client per thread).
   `--baseline REV` adds `slot()` of that commit (`git archive`d, run by processes of its
   own, the same count and threads, alternating with the other kinds): slot() / it.

Targets: try_acquire <= 1.5x PING at the median; `fleet.slot()` >= 0.9x the lean script's
decisions/s at every process count and >= 1.5x limits + INCR's, and >= 0.75x the one-round-
trip lean peer's (issue 26), in the same run. On a VM,
loopback PING swings ~4x with whether Redis's vCPU is idle (it must be woken up), so also read
the µs try_acquire adds to a PING, which does not swing, and each run's floor.

4. **Contention** (`admission.py contention ...`, in `benchmarks/contention.py`): many callers
   looping on `fleet.slot` against one in-flight cap, this tree against the code before the
   ticket line (issue 8); admissions/s, round trips, fairness and admission order.

Usage::

    .venv/bin/python benchmarks/admission.py [--samples 5000] [--runs 5] [--seconds 3]
        [--procs 1,4,16,64] [--threads 4x4,16x16] [--baseline REV]
    .venv/bin/python benchmarks/admission.py contention [--callers 32,64,1000] [--procs 4]
"""

from __future__ import annotations

import argparse
import importlib
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from peers import (
    BUDGETS,
    LIMIT,
    TOKENS,
    Lean,
    LeanOneTrip,
    LeanOneTripRaw,
    LimitsIncr,
    LimitsLock,
)
from results import append_section, on_db

from celery_fleet import Fleet
from celery_fleet.admission.decision import read_acquire
from celery_fleet.store.specs import ACQUIRE, AcquireMode
from celery_fleet.store.sync import mask_url, script_source

DB = 12
HELD = "held"
TARGET_LATENCY_X, TARGET_LEAN_X, TARGET_INCR_X, TARGET_LEAN1_X = 1.5, 0.9, 1.5, 0.75


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

    def slot_cycle(self) -> None:
        with self.fleet.slot(LIMIT, tokens=TOKENS):
            pass


# Throughput columns, in order: kind -> label.
KINDS = {
    "ping": "PING/s (ceiling)",
    "slot": "ours: slot()",
    "acquire": "ours: try_acquire",
    "lean": "lean Lua",
    "lean1": "lean Lua, 1 round trip",
    "lean1raw": "lean Lua, 1 round trip, raw socket",
    "incr": "limits + INCR",
    "lock": "limits + Lock (strawman)",
}
PEERS = {
    "lean": Lean,
    "lean1": LeanOneTrip,
    "lean1raw": LeanOneTripRaw,
    "incr": LimitsIncr,
    "lock": LimitsLock,
}
Rates = dict[str, list[float]]  # kind -> decisions/s (summed over processes) of each round
#: Kinds run by several threads of a process (``--threads``): ours and the lean peers.
THREADED = ("slot", "lean", "lean1", "lean1raw")
#: The kind of ``--baseline``: ``slot()`` of that commit's celery_fleet, in processes of its
#: own (a process holds one celery_fleet), alternating with the others.
BASE = "base"


def _baseline_cycle(url: str, run_id: str, code: str) -> Callable[[], object]:
    """``slot()`` of the celery_fleet under ``code`` (a ``git archive``), in this process:
    the tree's modules this file imported are dropped first, the archive put first on
    ``sys.path``, and the module's origin checked."""
    for name in [n for n in sys.modules if n == "celery_fleet" or n.startswith("celery_fleet.")]:
        del sys.modules[name]
    sys.path.insert(0, code)
    module = importlib.import_module("celery_fleet")
    if not str(module.__file__).startswith(code):
        raise RuntimeError(f"the baseline imported {module.__file__}, not {code}")
    fleet = module.Fleet(redis_url=url, namespace=f"{run_id}-base", limits={LIMIT: BUDGETS})

    def cycle() -> None:
        with fleet.slot(LIMIT, tokens=TOKENS):
            pass

    return cycle


def make_cycle(kind: str, url: str, run_id: str) -> Callable[[], object]:
    """One worker's cycle of one kind: ours (slot or try_acquire), a peer's, or a bare PING."""
    if kind == "ping":
        return redis.Redis.from_url(url).ping
    if kind in ("slot", "acquire"):
        ours = Ours(url, run_id)
        return ours.slot_cycle if kind == "slot" else ours.cycle
    return PEERS[kind](url, run_id).cycle


# -- latency ------------------------------------------------------------------------------------

ROWS = [
    ("PING", "ping"),
    ("no-op EVALSHA with acquire's KEYS+ARGV (floor)", "noop"),
    ("acquire.lua via bare redis-py Script", "raw"),
    ("**try_acquire**", "acquire"),
    ("**release**", "release"),
    ("**acquire+release**", "cycle"),
    ("try_acquire refused (in-flight cap)", "refused"),
    ("lean Lua acquire (one EVALSHA)", "lean_acquire"),
    ("lean Lua release (ZREM)", "lean_release"),
    ("lean Lua acquire+release", "lean_cycle"),
    ("limits + Lock (strawman) acquire (2 hits + lock/GET/INCR/unlock)", "lock_acquire"),
    ("limits + Lock (strawman) release (lock/DECR/unlock)", "lock_release"),
    ("limits + Lock (strawman) acquire+release", "lock_cycle"),
]
Samples = dict[str, list[int]]  # ROWS key -> ns of each sample


def sample_latency(ours: Ours, lean: Lean, lock: LimitsLock, samples: int) -> Samples:
    """Interleaved timings in ns, one list per key of ROWS: each sample runs every step once."""
    fleet = ours.fleet
    client = fleet.store.client
    # The exact KEYS and ARGV try_acquire sends (built by Admission, not copied here).
    keys = ACQUIRE.keys_of(fleet.admission.keys(LIMIT))
    # After the lease id: tokens, since (0 = now), join (ask once), lane, the limit's tail.
    tail = fleet.admission._acquire_tail[LIMIT]
    args: list[Any] = [TOKENS, 0, AcquireMode.ASK, b"0", *tail]
    noop, raw = client.register_script("return 1"), client.register_script(script_source("acquire"))
    got: dict[str, Any] = {}
    steps: dict[str, Callable[[], Any]] = {  # in this order, every sample
        "ping": client.ping,
        "noop": lambda: noop(keys=keys, args=["0" * 32, *args]),
        "raw": lambda: raw(keys=keys, args=[uuid.uuid4().hex, *args]),
        "acquire": lambda: fleet.try_acquire(LIMIT, tokens=TOKENS),
        "release": lambda: fleet.release(got["acquire"]),
        "refused": lambda: fleet.try_acquire(HELD),
        "lean_acquire": lean.acquire,
        "lean_release": lambda: lean.release(got["lean_acquire"]),
        "lock_acquire": lock.acquire,
        "lock_release": lambda: lock.release(got["lock_acquire"]),
    }
    holder = fleet.try_acquire(HELD)
    out: Samples = {key: [] for _, key in ROWS}
    for _ in range(samples):
        for key, step in steps.items():
            start = time.perf_counter_ns()
            got[key] = step()
            out[key].append(time.perf_counter_ns() - start)
        # untimed: the bare script's lease
        fleet.admission.release(LIMIT, read_acquire(got["raw"]).detail.decode())
        if not got["acquire"].allowed or got["refused"].allowed:
            raise RuntimeError("unexpected admission result in the latency loop")
        for prefix in ("", "lean_", "lock_"):
            out[f"{prefix}cycle"].append(out[f"{prefix}acquire"][-1] + out[f"{prefix}release"][-1])
    fleet.release(holder)
    return out


def server_us(ours: Ours, lean: Lean, n: int) -> dict[str, float | None]:
    """Server-side µs per call of each command a decision sends (None if another client ran one)."""
    fleet, client = ours.fleet, ours.fleet.store.client
    held: list[Any] = []
    steps: dict[str, tuple[str, Callable[[], object]]] = {
        "acquire": ("evalsha", lambda: held.append(fleet.try_acquire(LIMIT, tokens=TOKENS))),
        "release": ("evalsha", lambda: fleet.release(held.pop())),
        "lean_acquire": ("evalsha", lambda: held.append(lean.acquire())),
        "lean_release": ("zrem", lambda: lean.release(held.pop())),
    }

    def stats(command: str) -> tuple[int, int]:
        found = client.info("commandstats").get(f"cmdstat_{command}", {})
        return int(found.get("calls", 0)), int(found.get("usec", 0))

    per_call: dict[str, float | None] = {}
    for key, (command, step) in steps.items():
        calls, usec = stats(command)
        for _ in range(n):
            step()
        calls_after, usec_after = stats(command)
        per_call[key] = (usec_after - usec) / n if calls_after - calls == n else None
    return per_call


def pct_us(ns: list[int], q: float) -> float:
    s = sorted(ns)
    return float(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]) / 1000


def run_medians(run: Samples) -> list[float]:
    """One latency run's medians (µs) of PING, the floor (no-op EVALSHA) and try_acquire, then
    try_acquire / PING and floor / PING."""
    ping, floor, acquire = (pct_us(run[key], 0.5) for key in ("ping", "noop", "acquire"))
    return [ping, floor, acquire, acquire / ping, floor / ping]


# -- throughput ---------------------------------------------------------------------------------


def _thread_cycles(kind: str, url: str, run_id: str, threads: int) -> list[Callable[[], object]]:
    """``threads`` cycles of ``kind`` for the threads of one process: ours share one Fleet
    (as the threads of a ``-P threads`` worker do), a peer gets a client per thread."""
    if kind == "slot":
        return [make_cycle(kind, url, run_id)] * threads
    return [make_cycle(kind, url, run_id) for _ in range(threads)]


def _run_slice(cycles: list[Callable[[], object]], slice_s: float) -> float:
    """Decisions/s of ``cycles``, one thread each (the caller's for a single one)."""
    counts = [0] * len(cycles)

    def loop(i: int) -> None:
        cycle, n, end = cycles[i], 0, time.perf_counter() + slice_s
        while time.perf_counter() < end:
            cycle()
            n += 1
        counts[i] = n

    start = time.perf_counter()
    if len(cycles) == 1:
        loop(0)
    else:
        pool = [threading.Thread(target=loop, args=(i,)) for i in range(len(cycles))]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    return sum(counts) / (time.perf_counter() - start)


def _worker(
    url: str,
    run_id: str,
    slice_s: float,
    rounds: int,
    barrier: Any,
    out: Any,
    threads: int = 1,
    kinds: tuple[str, ...] = tuple(KINDS),
    code: str = "",
) -> None:
    """Run the slices of ``kinds``, in order, round after round, each after the barrier;
    with ``code`` (a baseline's archive) this process runs only the BASE kind's slices and
    waits at the barrier through the others'."""
    try:
        if code:
            cycles = {BASE: [_baseline_cycle(url, run_id, code)] * threads}
        else:
            cycles = {
                kind: _thread_cycles(kind, url, run_id, threads) for kind in kinds if kind != BASE
            }
        for group in cycles.values():  # warm up: connect, load scripts (the Lock peer is slow)
            for cycle in dict.fromkeys(group):
                warm_until = time.perf_counter() + 0.5
                for _ in range(200):
                    cycle()
                    if time.perf_counter() > warm_until:
                        break
        for round_no in range(rounds):
            for kind in kinds:
                barrier.wait()
                if kind in cycles:
                    out.put((round_no, kind, _run_slice(cycles[kind], slice_s)))
    except Exception as exc:  # tell the parent rather than leave the barrier hanging
        barrier.abort()
        out.put(f"worker {os.getpid()}: {exc!r}")


def throughput(
    url: str,
    run_id: str,
    procs: int,
    seconds: float,
    rounds: int,
    threads: int = 1,
    base_dir: str = "",
) -> Rates:
    """Per kind, the rate summed over `procs` spawned processes, for each round (with
    ``threads`` > 1: the kinds of THREADED, each run by that many threads per process; with
    ``base_dir``, the BASE kind too, in `procs` processes of its own).

    Kinds alternate in slices of seconds/rounds (each after a barrier), so a machine whose
    speed drifts over seconds (a VM's vCPU idling, a neighbour's load) slows all kinds alike.
    """
    ctx = mp.get_context("spawn")
    own = [k for k in (KINDS if threads == 1 else THREADED) if k != BASE]  # main() adds BASE
    kinds = tuple(own) + ((BASE,) if base_dir else ())
    groups = ("", base_dir) if base_dir else ("",)
    barrier, out = ctx.Barrier(procs * len(groups) + 1), ctx.Queue()
    workers = [
        ctx.Process(
            target=_worker,
            args=(url, run_id, seconds / rounds, rounds, barrier, out, threads, kinds, code),
        )
        for code in groups
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    rates: Rates = {kind: [0.0] * rounds for kind in kinds}
    try:
        for _ in range(rounds * len(kinds)):
            barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass  # a worker failed: its message is in the queue
    for _ in range(procs * rounds * len(kinds)):
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

MET = {True: "met", False: "NOT met"}
#: throughput ratio columns
RATIOS = [
    ("slot", "lean1"),
    ("slot", "lean1raw"),
    ("slot", "lean"),
    ("slot", "incr"),
    ("acquire", "lean"),
]


def mean_rates(rates: dict[str, Rates]) -> dict[str, dict[str, float]]:
    return {n: {kind: sum(v) / len(v) for kind, v in r.items()} for n, r in rates.items()}


def pooled(runs: list[Samples], key: str) -> list[int]:
    return [ns for run in runs for ns in run[key]]


def headline(runs: list[Samples], rates: dict[str, Rates]) -> list[str]:
    """The targets, met or not: latency from the runs' medians, throughput from the means."""
    per = [run_medians(run) for run in runs]
    latency_x, floor_x = (statistics.median(m[i] for m in per) for i in (3, 4))
    adds_us = statistics.median(m[2] - m[0] for m in per)
    p99_x = pct_us(pooled(runs, "acquire"), 0.99) / pct_us(pooled(runs, "ping"), 0.99)
    mean = mean_rates(rates)
    single = {n: m for n, m in mean.items() if "x" not in n}
    lean = {n: m["slot"] / m["lean"] for n, m in single.items()}
    incr = {n: m["slot"] / m["incr"] for n, m in single.items()}
    lean1 = {n: m["slot"] / m["lean1"] for n, m in mean.items()}
    base = {n: m["slot"] / m[BASE] for n, m in mean.items() if BASE in m}

    def by_procs(ratios: dict[str, float]) -> str:
        return ", ".join(
            f"{ratio:.2f}x at {n}" + ("" if "x" in n else " proc") for n, ratio in ratios.items()
        )

    return [
        f"- **try_acquire / PING: {latency_x:.2f}x at the median** (median of {len(runs)} runs; "
        f"floor, a no-op EVALSHA: {floor_x:.2f}x), {p99_x:.2f}x at p99; it adds {adds_us:.0f} µs "
        f"to a PING (target <= {TARGET_LATENCY_X}x at the median: "
        f"{MET[latency_x <= TARGET_LATENCY_X]})",
        f"- **decisions/s, slot() / lean Lua with its release sent with the next acquire (one "
        f"round trip): {by_procs(lean1)}** (target >= {TARGET_LEAN1_X}x: "
        f"{MET[all(r >= TARGET_LEAN1_X for r in lean1.values())]})",
        f"- **decisions/s, slot() / lean Lua: {by_procs(lean)}** (target >= {TARGET_LEAN_X}x at "
        f"every process count: {MET[all(r >= TARGET_LEAN_X for r in lean.values())]})",
        f"- **decisions/s, slot() / limits + INCR: {by_procs(incr)}** (target >= {TARGET_INCR_X}x "
        f"at every process count: {MET[all(r >= TARGET_INCR_X for r in incr.values())]})",
    ] + (
        [f"- **decisions/s, slot() / {KINDS[BASE]}: {by_procs(base)}** (no target)"] if base else []
    )


def latency_tables(runs: list[Samples], srv: dict[str, float | None]) -> list[str]:
    """Every row over all runs pooled, then each run's median try_acquire beside its floor."""
    ping = {q: pct_us(pooled(runs, "ping"), q) for q in (0.5, 0.99)}
    lines = [
        f"Latency, {len(runs)} runs x {len(runs[0]['ping'])} interleaved samples per row, "
        "pooled, µs:",
        "",
        "| operation | median | p99 | median / PING | p99 / PING | server µs/call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, key in ROWS:
        ns, server = pooled(runs, key), srv.get(key)
        med, p99 = pct_us(ns, 0.5), pct_us(ns, 0.99)
        lines.append(
            f"| {label} | {med:.1f} | {p99:.1f} | {med / ping[0.5]:.2f}x | "
            f"{p99 / ping[0.99]:.2f}x | {'-' if server is None else f'{server:.1f}'} |"
        )
    lines += [
        "",
        "Latency per run, medians in µs; the floor is the no-op EVALSHA:",
        "",
        "| run | PING | floor | try_acquire | **try_acquire / PING** | floor / PING |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    per = [run_medians(run) for run in runs]
    medians = [statistics.median(column) for column in zip(*per, strict=True)]
    rows = [(str(i), m) for i, m in enumerate(per, 1)] + [(f"median of {len(runs)}", medians)]
    for name, (p, floor, acquire, x, floor_x) in rows:
        lines.append(
            f"| {name} | {p:.1f} | {floor:.1f} | {acquire:.1f} | **{x:.2f}x** | {floor_x:.2f}x |"
        )
    return lines


def throughput_table(rates: dict[str, Rates]) -> list[str]:
    rounds = len(next(iter(rates.values()))["slot"])
    names = [f"{KINDS[a].split(': ')[-1]} / {KINDS[b]}" for a, b in RATIOS]
    kinds = [k for k in KINDS if any(k in r for r in rates.values())]
    lines = [
        f"Throughput, decisions/s (acquire + release) summed over processes, mean of {rounds} "
        "alternating slices; ratios of the means (range over the slices). PxT: P processes of "
        "T threads (ours: one Fleet per process; a peer: a client per thread), only slot() and "
        "the lean peers:",
        "",
        f"| processes | {' | '.join(KINDS[k] for k in kinds)} | "
        f"{' | '.join(f'**{n}**' for n in names)} |",
        "|---:" * (1 + len(kinds) + len(RATIOS)) + "|",
    ]
    for n, m in mean_rates(rates).items():
        cells = [f"{m[kind]:,.0f}" if kind in m else "" for kind in kinds]
        for a, b in RATIOS:
            if a not in m or b not in m:
                cells.append("")
                continue
            per_slice = [x / y for x, y in zip(rates[n][a], rates[n][b], strict=True)]
            cells.append(f"**{m[a] / m[b]:.2f}x** ({min(per_slice):.2f}-{max(per_slice):.2f})")
        lines.append(f"| {n} | {' | '.join(cells)} |")
    return lines


def report(runs: list[Samples], srv: dict[str, float | None], rates: dict[str, Rates]) -> str:
    """The markdown printed and appended: headline targets first, then the tables."""
    parts = [headline(runs, rates), latency_tables(runs, srv), throughput_table(rates)]
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    default_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    parser.add_argument(
        "--redis-url", default=default_url, help="default $REDIS_URL, else %(default)s; DB 12"
    )
    parser.add_argument(
        "--samples", type=int, default=5000, help="latency samples per row in each run"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="run time per kind and process count"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="--seconds is split in this many alternating slices"
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="latency runs, each samples every row (default 5)"
    )
    parser.add_argument("--procs", default="1,4,16,64", help="process counts (default %(default)s)")
    parser.add_argument(
        "--threads",
        default="4x4",
        help="PxT shapes for slot() and the lean peers, comma-separated (default %(default)s; "
        "'' for none)",
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="a commit whose slot() runs beside (git archive, processes of its own): slot() / it",
    )
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(argv)
    opts.procs = [int(p) for p in opts.procs.split(",") if p.strip().isdigit() and int(p) > 0]
    try:
        opts.threads = [
            tuple(int(x) for x in shape.lower().split("x"))
            for shape in opts.threads.split(",")
            if shape.strip()
        ]
    except ValueError:
        parser.error("--threads takes PxT shapes, e.g. 4x4,16x16")
    if any(len(s) != 2 or min(s) < 1 for s in opts.threads):
        parser.error("--threads takes PxT shapes of positive numbers, e.g. 4x4,16x16")
    if min(opts.samples, opts.runs, opts.rounds) < 1 or opts.seconds <= 0 or not opts.procs:
        parser.error("--samples, --runs, --seconds, --rounds and --procs must be positive")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["contention"]:  # section 4 lives in its own file
        from contention import main as contention_main

        return contention_main(argv[1:])
    opts = parse_args(argv)
    url, run_id = on_db(opts.redis_url, DB), f"bench-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"admission.py: Redis at {mask_url(url)} does not answer: {exc}", file=sys.stderr)
        return 2
    base_dir = ""
    try:
        ours, lean, lock = Ours(url, run_id), Lean(url, run_id), LimitsLock(url, run_id)
        sample_latency(ours, lean, lock, min(500, opts.samples))  # warm-up, discarded
        runs = []
        for run_no in range(1, opts.runs + 1):
            print(f"latency run {run_no}/{opts.runs}: {opts.samples} samples", file=sys.stderr)
            runs.append(sample_latency(ours, lean, lock, opts.samples))
        srv = server_us(ours, lean, min(1000, opts.samples))
        rates: dict[str, Rates] = {}
        if opts.baseline:
            from contention import export  # git archive <rev> celery_fleet into a temp dir

            base_dir = export(opts.baseline)
            KINDS[BASE] = f"slot() at {opts.baseline}"
            RATIOS.append(("slot", BASE))
        for n in opts.procs:
            print(f"throughput: {n} process(es), {opts.seconds} s per kind", file=sys.stderr)
            rates[str(n)] = throughput(url, run_id, n, opts.seconds, opts.rounds, 1, base_dir)
        for procs, threads in opts.threads:
            print(f"throughput: {procs}x{threads} threads, {opts.seconds} s", file=sys.stderr)
            rates[f"{procs}x{threads}"] = throughput(
                url, run_id, procs, opts.seconds, opts.rounds, threads, base_dir
            )
        table = report(runs, srv, rates)
    finally:
        if base_dir:
            shutil.rmtree(base_dir, ignore_errors=True)
        for key in client.scan_iter(match=f"*{run_id}*", count=1000):
            client.delete(key)
    print(table)
    if not opts.no_write:
        append_section(client, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
