"""Contention benchmark: many callers on one in-flight cap, this tree vs the code before issue 8.

One limit, `max_in_flight: 20` and no rate window; every caller loops
`with fleet.slot("held", max_wait=120): time.sleep(0.05)` for `--seconds`, so the possible rate
is cap / hold = 400 admissions/s. Callers are threads spread over `--procs` processes (1,000
threads in one process would measure the GIL), started together once every thread has its
connections. Each process runs this tree's `celery_fleet` or the `--baseline`'s (a commit,
`git archive`d into a temp dir, or a directory), put first on that process's `sys.path`;
`celery_fleet.__file__` is printed to prove which. redis-py 8 caps a connection pool at 100,
which > ~90 waiting threads of one process exceed (`MaxConnectionsError`), so each process's
URL carries `max_connections=threads + 16` unless `--pool default`.

Counted in the callers' processes (Admission methods wrapped there): round trips per admission
(`slot.attempts`), BLPOPs per admission (`wait_turn` / the old `wait_for_release`) and how
many were woken rather than timed out, and each admission's Redis-clock times: first ask (its
age in line: `slot.run.since_ms`; the first decision's `at_ms` for the old code), admission
(`slot.decision.at_ms`) and release. Over the admissions in the window from `--warmup` to
`--seconds` after the start (Redis clock):

- admissions/s, and as % of cap / hold; callers admitted at least once; Jain's fairness index
  (sum x)^2 / (n sum x^2) over the admissions of each caller;
- **in ticket order**: of the contended admissions (refused at least once: attempts > 1 or a
  BLPOP), the share that passed no older waiter, i.e. no contended admission with an earlier
  first ask that was already waiting then and was admitted later; **cut-ins**: admissions at
  the first ask while such a waiter existed (% of all); wait p50/p99 (`slot.waited_s`);
- diagnostics: most leases held at once (a check: <= the cap), mean time a slot is held
  (admission to release, Redis clock), slot use (mean leases held / cap), the idle slot time
  per admission and the release -> next admission gaps (FIFO-matched): the hand-off; CPU of
  Redis (INFO cpu), of the callers and of the whole machine with its steal time (a VM's
  neighbours); EVALSHAs Redis ran that the callers did not send (another client: disturbed);
- where a cycle goes: admission -> the caller has the reply -> sleep -> release called ->
  release runs (Redis and caller clocks are the same host's), and woken -> admitted.

By Little's law admissions/s = slot use x cap / held time, so a shortfall is either slots idle
between a release and the next admission, or slots held longer than the 50 ms sleep.

Targets (issue 8), at 1,000 callers: >= 95% of the possible rate, every caller admitted,
Jain >= 0.95, <= 3 round trips per contended admission.

Usage::

    .venv/bin/python benchmarks/contention.py [--callers 32,64,1000] [--procs 4] [--seconds 25]
    .venv/bin/python benchmarks/admission.py contention ...   (the same)
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

# Nothing imports celery_fleet at module level: a worker process first decides which one.
ROOT = Path(__file__).resolve().parents[1]
DB = 12  # the Redis DB of this benchmark (and of admission.py)
LIMIT = "held"
TARGET_RATE, TARGET_JAIN, TARGET_ATTEMPTS = 0.95, 0.95, 3.0
TARGET_CALLERS = 1000


# -- worker process: N caller threads ------------------------------------------------------------


class Rec(NamedTuple):
    """One admission. Redis-clock ms: at, since, released; local clock (time.time) ms: got,
    body_start, body_end, rel_call, woke (0: no BLPOP woke it). Same host, same clock."""

    caller: int
    attempts: int  # admission round trips (slot.attempts)
    blpops: int
    woken: int  # BLPOPs that returned a wake-up rather than timing out
    at: float  # admission (slot.decision.at_ms)
    since: int  # first ask (slot.run.since_ms; the old code: its first decision's at_ms)
    waited: float  # slot.waited_s
    released: float  # the release script's time (NaN: posted, its reply read later)
    got: float  # the winning try_acquire returned (or the wake-up that admitted it)
    body_start: float
    body_end: float
    rel_call: float  # Admission.release called
    woke: float  # the last BLPOP returned a wake-up


def worker(cfg: dict[str, Any]) -> None:
    """One process of callers. Protocol on stdio: prints READY, waits for a line on stdin,
    runs, prints RESULT <json>."""
    if cfg["code"]:
        sys.path.insert(0, cfg["code"])
    import celery_fleet
    from celery_fleet import Fleet
    from celery_fleet.admission.core import Admission

    tl = threading.local()
    counts: Counter[str] = Counter()  # refusal reasons, errors, script calls; this process
    lock = threading.Lock()
    wrap_admission(Admission, tl, counts, lock)

    limits = {LIMIT: {"max_in_flight": cfg["cap"], "lease": 60}}
    fleet = Fleet(redis_url=cfg["url"], namespace=cfg["namespace"], limits=limits)
    fleet.release(fleet.try_acquire(LIMIT))  # load the scripts
    pool = fleet.store.client.connection_pool.max_connections
    records: list[Rec] = []
    start, ready = threading.Event(), threading.Barrier(cfg["threads"] + 1)
    deadline = [math.inf]

    def caller(caller_id: int) -> None:
        fleet.store.client.ping()  # open this thread's connections before the start
        getattr(fleet.store, "blocking_client", fleet.store.client).ping()
        ready.wait()
        start.wait()
        while time.monotonic() < deadline[0]:
            tl.first_at, tl.blpops, tl.woken, tl.woke = None, 0, 0, 0.0
            tl.released = tl.rel_call = math.nan  # a posted release (issue 9) has no reply yet
            try:
                with fleet.slot(LIMIT, max_wait=cfg["max_wait"]) as s:
                    body_start = time.time() * 1000
                    time.sleep(cfg["hold"])
                    body_end = time.time() * 1000
            except Exception as exc:  # counted, reported; the loop goes on
                with lock:
                    counts[f"error {type(exc).__name__}"] += 1
                time.sleep(0.01)
                continue
            run = getattr(s, "run", None)  # the old code has no Run: its first ask's time
            since = run.since_ms if run is not None else int(tl.first_at or 0)
            assert s.decision is not None
            records.append(
                Rec(
                    caller_id,
                    s.attempts,
                    tl.blpops,
                    tl.woken,
                    s.decision.at_ms,
                    since,
                    s.waited_s,
                    tl.released,
                    tl.got,
                    body_start,
                    body_end,
                    tl.rel_call,
                    tl.woke,
                )  # fmt: skip
            )

    threads = [
        threading.Thread(target=caller, args=(cfg["first_id"] + i,), daemon=True)
        for i in range(cfg["threads"])
    ]
    for t in threads:
        t.start()
    ready.wait()
    counts.clear()  # from here on: only the measured run
    ready_info = {"file": celery_fleet.__file__, "pid": os.getpid(), "pool": pool}
    print("READY " + json.dumps(ready_info), flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    deadline[0] = t0 + cfg["seconds"]
    cpu0 = cpu_seconds()
    start.set()
    time.sleep(max(0.0, deadline[0] - time.monotonic()))
    cpu_s, wall_s = cpu_seconds() - cpu0, time.monotonic() - t0
    for t in threads:
        t.join()
    out = {"records": records, "counts": dict(counts), "cpu_s": cpu_s, "wall_s": wall_s}
    print("RESULT " + json.dumps(out), flush=True)


def wrap_admission(cls: Any, tl: threading.local, counts: Counter[str], lock: Any) -> None:
    """Count, per thread, what a slot does: its first decision's time, BLPOPs, wake-ups, when
    the winning ask returned, when release was called and ran; per process, refusal reasons
    and script calls ("sent ..."). Works on the old and the new code."""
    try_acquire, release = cls.try_acquire, cls.release
    wait_name = "wait_turn" if hasattr(cls, "wait_turn") else "wait_for_release"
    wait = getattr(cls, wait_name)

    def counted(ask: Any) -> Any:
        def counted_ask(self: Any, *args: Any, **kwargs: Any) -> Any:
            return counted_decision(ask(self, *args, **kwargs))

        return counted_ask

    def counted_decision(decision: Any) -> Any:
        with lock:
            counts["sent acquire"] += 1
        tl.got = time.time() * 1000
        if getattr(tl, "first_at", 0) is None:
            tl.first_at = decision.at_ms
        if not decision.allowed:
            with lock:
                counts[f"refused {decision.reason}"] += 1
        return decision

    def counted_wait(self: Any, *args: Any, **kwargs: Any) -> Any:
        woken = wait(self, *args, **kwargs)
        tl.blpops += 1
        if woken:
            tl.woken += 1
            tl.woke = tl.got = time.time() * 1000  # got: in case the wake-up admitted it
        return woken

    def counted_release(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not hasattr(cls, "release_command"):  # else counted there (release calls it)
            with lock:
                counts["sent release"] += 1
        tl.rel_call = time.time() * 1000
        result = release(self, *args, **kwargs)
        tl.released = result.at_ms
        return result

    cls.try_acquire, cls.release = counted(try_acquire), counted_release
    if hasattr(cls, "ask"):  # since issue 26 a keyless slot asks through ask(), not try_acquire
        cls.ask = counted(cls.ask)
    setattr(cls, wait_name, counted_wait)
    # Since issue 9 a slot posts its release's command (release_command); since issue 26
    # it packs it with release_of, which release_command calls too: the innermost counts.
    packs = next((n for n in ("release_of", "release_command") if hasattr(cls, n)), None)
    if packs is not None:
        release_command = getattr(cls, packs)

        def counted_release_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            with lock:
                counts["sent release"] += 1
            tl.rel_call = time.time() * 1000
            return release_command(self, *args, **kwargs)

        setattr(cls, packs, counted_release_command)
    if hasattr(cls, "leave"):  # the new code gives its place up when a wait fails
        leave = cls.leave

        def counted_leave(self: Any, *args: Any, **kwargs: Any) -> Any:
            with lock:
                counts["sent leave"] += 1
            return leave(self, *args, **kwargs)

        cls.leave = counted_leave


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            ticks = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


# -- parent: one run of one code at one caller count ---------------------------------------------


@dataclass
class Run:
    code: str  # "tree" or the baseline commit
    callers: int
    t0_ms: float  # Redis clock at the start
    records: list[Rec] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    cpu: list[float] = field(default_factory=list)  # per process, CPU s / wall s
    redis_cpu: float = 0.0  # Redis CPU s / wall s
    foreign_evalsha: float = 0.0  # EVALSHAs per second that our callers did not send
    machine: tuple[float, float] = (0.0, 0.0)  # whole machine: busy, steal (CPU s / wall s)
    load: str = ""


def redis_stats(client: Any) -> tuple[float, int]:
    """(Redis CPU seconds, EVALSHA calls) so far, server-wide."""
    cpu = client.info("cpu")
    calls = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), int(calls)


def run_once(opts: argparse.Namespace, client: Any, code_dir: str, label: str, n: int) -> Run:
    """Start `--procs` worker processes sharing `n` callers, run them, collect their records."""
    namespace = f"bench-cont-{uuid.uuid4().hex[:12]}"
    procs = min(opts.procs, n)
    split = [n // procs + (i < n % procs) for i in range(procs)]
    workers = []
    for i, threads in enumerate(split):
        url = opts.url
        if opts.pool == "auto":  # redis-py 8 caps a pool at 100 connections by default
            url += f"{'&' if '?' in url else '?'}max_connections={threads + 16}"
        cfg = {
            "code": code_dir,
            "url": url,
            "namespace": namespace,
            "threads": threads,
            "first_id": sum(split[:i]),
            "cap": opts.cap,
            "hold": opts.hold,
            "max_wait": opts.max_wait,
            "seconds": opts.seconds,
        }
        cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
        workers.append(
            subprocess.Popen(cmd, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        )
    try:
        ready = []
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if not line.startswith("READY "):
                raise SystemExit(f"contention.py: a {label} worker failed to start: {line!r}")
            ready.append(json.loads(line[6:]))
        print(
            f"  {label}: {n} callers = {' + '.join(map(str, split))} threads; redis-py pool "
            f"max_connections {sorted({r['pool'] for r in ready})}; celery_fleet from "
            f"{sorted({r['file'] for r in ready})}",
            file=sys.stderr,
        )
        cpu0, evalsha0 = redis_stats(client)
        busy0, steal0 = machine_cpu()
        now_s, now_us = client.time()
        run = Run(label, n, now_s * 1000 + now_us / 1000)
        wall0 = time.monotonic()
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        time.sleep(max(0.0, wall0 + opts.seconds - time.monotonic()))
        cpu1, _ = redis_stats(client)
        busy1, steal1 = machine_cpu()
        wall = time.monotonic() - wall0
        run.redis_cpu = (cpu1 - cpu0) / wall
        run.machine = ((busy1 - busy0) / wall, (steal1 - steal0) / wall)
        run.load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        sent = 0
        for w in workers:
            out, _ = w.communicate(timeout=opts.max_wait + 60)
            got = json.loads(out.split("RESULT ", 1)[1])
            run.records += [Rec(*r) for r in got["records"]]
            run.counts.update(got["counts"])
            run.cpu.append(got["cpu_s"] / got["wall_s"])
            sent += sum(v for k, v in got["counts"].items() if k.startswith("sent "))
        _, evalsha1 = redis_stats(client)
        run.foreign_evalsha = max(0, evalsha1 - evalsha0 - sent) / (time.monotonic() - wall0)
        return run
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        for key in client.scan_iter(match=f"*{namespace}*", count=1000):
            client.delete(key)


# -- analysis ------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else math.nan


def release_at(r: Rec) -> float:
    """When the slot was freed: the release script's time, or for a release posted (held
    for the process's next call, or riding in the next ask: no reply to time it by) when
    release was called (same host's clock; it is written within about 1 ms of that)."""
    return r.rel_call if math.isnan(r.released) else r.released


def waited(r: Rec) -> bool:
    """A contended admission: refused at least once (asked again, or blocked for a wake-up)."""
    return r.attempts > 1 or r.blpops > 0


def order_stats(records: list[Rec], lo: float, hi: float) -> tuple[int, int, int]:
    """(contended admissions in [lo, hi), those that passed an older waiter, first-ask
    admissions that passed one). A waiter is a contended admission between its first ask and
    its admission; the sweep runs over all records, counting in the window."""
    by_at = sorted(range(len(records)), key=lambda i: records[i].at)
    waiters = sorted((i for i in by_at if waited(records[i])), key=lambda i: records[i].since)
    heap: list[tuple[int, int]] = []  # (since, index) of waiters that asked by now
    admitted: set[int] = set()
    j = n_contended = passed = cut_ins = 0
    for i in by_at:
        r = records[i]
        while j < len(waiters) and records[waiters[j]].since <= r.at:
            heapq.heappush(heap, (records[waiters[j]].since, waiters[j]))
            j += 1
        while heap and heap[0][1] in admitted:
            heapq.heappop(heap)
        older_waiting = bool(heap) and heap[0][0] < r.since
        if lo <= r.at < hi:
            if waited(r):
                n_contended += 1
                passed += older_waiting
            else:
                cut_ins += older_waiting
        admitted.add(i)
    return n_contended, passed, cut_ins


def occupancy(records: list[Rec], lo: float, hi: float) -> tuple[float, int]:
    """(time-weighted mean number of leases held in [lo, hi), most ever held at once)."""
    freed = [release_at(r) for r in records]
    events = sorted(
        [(t if not math.isnan(t) else math.inf, -1) for t in freed] + [(r.at, 1) for r in records]
    )
    held = most = 0
    area, last, at_hi = 0.0, lo, None
    for t, step in events:  # at equal times a release counts before an admission
        if t >= hi and at_hi is None:
            at_hi = held
        if lo < t < hi:
            area += held * (t - last)
            last = t
        held += step
        most = max(most, held)
    area += (held if at_hi is None else at_hi) * (hi - last)
    return area / (hi - lo), most


def handoff_gaps(records: list[Rec], lo: float, hi: float) -> list[float]:
    """ms from a release to the admission that took its slot (FIFO: the earliest pending
    release before each admission), for admissions in [lo, hi)."""
    releases = sorted(t for r in records if not math.isnan(t := release_at(r)))
    gaps, k = [], 0
    pending: list[float] = []
    for at in sorted(r.at for r in records):
        while k < len(releases) and releases[k] <= at:
            pending.append(releases[k])
            k += 1
        if pending:
            freed = pending.pop(0)
            if lo <= at < hi:
                gaps.append(at - freed)
    return gaps


#: Where a slot's cycle goes: (label, ms of one admission, or None when it does not apply).
CYCLE: list[tuple[str, Callable[[Rec, float], float | None]]] = [
    ("admitted -> caller has the reply", lambda r, hold: r.got - r.at),
    ("reply -> body starts", lambda r, hold: r.body_start - r.got),
    ("sleep overshoot", lambda r, hold: r.body_end - r.body_start - hold),
    ("body ends -> release called", lambda r, hold: r.rel_call - r.body_end),
    ("release called -> release runs", lambda r, hold: r.released - r.rel_call),
    ("woken -> admitted", lambda r, hold: r.at - r.woke if r.woke else None),
]


def analyse(run: Run, opts: argparse.Namespace) -> dict[str, Any]:
    lo, hi = run.t0_ms + opts.warmup * 1000, run.t0_ms + opts.seconds * 1000
    win = [r for r in run.records if lo <= r.at < hi]
    n, secs = len(win), (hi - lo) / 1000
    per_caller = Counter(r.caller for r in win)
    counts = [per_caller.get(c, 0) for c in range(run.callers)]
    contended = [r for r in win if waited(r)]
    n_cont, passed, cut_ins = order_stats(run.records, lo, hi)
    blpops = sum(r.blpops for r in win)
    gaps = handoff_gaps(run.records, lo, hi)
    held = [t - r.at for r in win if not math.isnan(t := release_at(r))]
    occ, most = occupancy(run.records, lo, hi)
    cycle = {}
    for label, part in CYCLE:
        # (NaN parts, a posted release's "release runs", are left out: printed "-" if all)
        xs = [
            x
            for r in win
            if not math.isnan(release_at(r))
            and (x := part(r, opts.hold * 1000)) is not None
            and not math.isnan(x)
        ]
        cycle[label] = (pct(xs, 0.5), pct(xs, 0.99))
    return {
        "rate": n / secs,
        "possible_pct": 100 * (n / secs) / (opts.cap / opts.hold),
        "attempts": sum(r.attempts for r in win) / max(1, n),
        "attempts_contended": sum(r.attempts for r in contended) / max(1, len(contended)),
        "blpops": blpops / max(1, n),
        "woken_pct": 100 * sum(r.woken for r in win) / max(1, blpops),
        "admitted_pct": 100 * sum(1 for c in counts if c) / run.callers,
        "jain": sum(counts) ** 2 / (run.callers * sum(c * c for c in counts) or 1),
        "in_order_pct": 100 * (1 - passed / n_cont) if n_cont else math.nan,
        "cut_in_pct": 100 * cut_ins / max(1, n),
        "contended_pct": 100 * len(contended) / max(1, n),
        "wait_p50": pct([r.waited for r in win], 0.5),
        "wait_p99": pct([r.waited for r in win], 0.99),
        "held_ms": sum(held) / max(1, len(held)),
        "util_pct": 100 * occ / opts.cap,
        "most_held": most,
        "idle_ms": (opts.cap - occ) * (hi - lo) / max(1, n),
        "gap_p50": pct(gaps, 0.5),
        "gap_p99": pct(gaps, 0.99),
        "cycle": cycle,
    }


# -- report --------------------------------------------------------------------------------------


def report(runs: list[Run], opts: argparse.Namespace) -> str:
    stats = {(r.callers, r.code): analyse(r, opts) for r in runs}
    possible = opts.cap / opts.hold
    base = opts.baseline or ""
    lines = [
        f"{opts.cap} in flight, hold {opts.hold * 1000:.0f} ms: possible {possible:.0f} "
        f"admissions/s. Callers loop on `fleet.slot(max_wait={opts.max_wait:g})` for "
        f"{opts.seconds:g} s, in {opts.procs} processes (threads split evenly); measured from "
        f"{opts.warmup:g} s to {opts.seconds:g} s (Redis clock). `tree` = this working tree, "
        f"`{base or '-'}` = the code before issue 8. Redis pool per process: "
        + ("threads + 16 connections." if opts.pool == "auto" else "redis-py's default."),
        "",
        "| callers | code | admissions/s | % of possible | vs baseline | round trips / adm. "
        "| per contended adm. | BLPOPs / adm. | callers admitted | Jain | in ticket order "
        "| cut-ins | wait p50 | wait p99 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        s, b = stats[(r.callers, r.code)], stats.get((r.callers, base))
        vs = f"{s['rate'] / b['rate']:.2f}x" if b and r.code != base and b["rate"] else "-"
        lines.append(
            f"| {r.callers} | {r.code} | {s['rate']:.0f} | {s['possible_pct']:.1f}% | {vs} "
            f"| {s['attempts']:.2f} | {s['attempts_contended']:.2f} | {s['blpops']:.2f} "
            f"| {s['admitted_pct']:.1f}% | {s['jain']:.3f} | {s['in_order_pct']:.1f}% "
            f"| {s['cut_in_pct']:.1f}% | {s['wait_p50'] * 1000:.0f} ms "
            f"| {s['wait_p99'] * 1000:.0f} ms |"
        )
    lines += [
        "",
        "Diagnostics (most held: leases at once, by the Redis times, must be <= the cap; "
        "held: admission to release (a posted release: to release called); "
        "idle: free slot-ms per admission; hand-off: "
        "release to the admission that took the slot, FIFO-matched; CPU: % of one core, "
        "the machine's over all cores, during --seconds; foreign: "
        "EVALSHAs Redis ran that these callers did not send):",
        "",
        "| callers | code | contended | most held | held ms | slot use | idle ms / adm. "
        "| hand-off p50 / p99 "
        "| BLPOPs woken | Redis CPU | callers' CPU (max proc) | machine CPU (steal) "
        "| foreign EVALSHA/s | load | refusals, errors per adm. |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in runs:
        s = stats[(r.callers, r.code)]
        other = ", ".join(
            f"{k} {v / max(1, len(r.records)):.2f}"
            for k, v in sorted(r.counts.items())
            if not k.startswith("sent ")
        )
        lines.append(
            f"| {r.callers} | {r.code} | {s['contended_pct']:.0f}% | {s['most_held']} "
            f"| {s['held_ms']:.1f} "
            f"| {s['util_pct']:.1f}% | {s['idle_ms']:.2f} | {s['gap_p50']:.1f} / "
            f"{s['gap_p99']:.1f} ms | {s['woken_pct']:.0f}% | {100 * r.redis_cpu:.0f}% "
            f"| {100 * sum(r.cpu):.0f}% ({100 * max(r.cpu):.0f}%) "
            f"| {100 * r.machine[0]:.0f}% ({100 * r.machine[1]:.0f}%) | {r.foreign_evalsha:.0f} "
            f"| {r.load} | {other or '-'} |"
        )
    lines += [
        "",
        "Where a cycle goes, ms p50 / p99 (Redis and caller clocks: same host); the first five "
        f"add up to held - {opts.hold * 1000:g} ms:",
        "",
        "| callers | code | " + " | ".join(label for label, _ in CYCLE) + " |",
        "|---:|---|" + "---:|" * len(CYCLE),
    ]
    for r in runs:
        cycle = stats[(r.callers, r.code)]["cycle"]
        cells = " | ".join(
            "-" if math.isnan(p50) else f"{p50:.2f} / {p99:.2f}" for p50, p99 in cycle.values()
        )
        lines.append(f"| {r.callers} | {r.code} | {cells} |")
    lines += ["", targets(runs, stats)]
    return "\n".join(lines) + "\n"


def targets(runs: list[Run], stats: dict[tuple[int, str], dict[str, Any]]) -> str:
    tree = [r for r in runs if r.code == "tree"]
    if not tree:
        return "No run of this tree: targets not evaluated."
    top = max(r.callers for r in tree)
    s = stats[(top, "tree")]
    met = {True: "met", False: "NOT met"}
    checks = [
        (
            f"{s['possible_pct']:.1f}% of the possible rate (>= {TARGET_RATE:.0%})",
            s["possible_pct"] >= 100 * TARGET_RATE,
        ),
        (f"{s['admitted_pct']:.1f}% of callers admitted (every caller)", s["admitted_pct"] >= 100),
        (f"Jain {s['jain']:.3f} (>= {TARGET_JAIN})", s["jain"] >= TARGET_JAIN),
        (
            f"{s['attempts_contended']:.2f} round trips per contended admission "
            f"(<= {TARGET_ATTEMPTS:g})",
            s["attempts_contended"] <= TARGET_ATTEMPTS,
        ),
    ]
    note = "" if top == TARGET_CALLERS else f" (targets are for {TARGET_CALLERS})"
    return (
        f"Targets at {top} callers{note}: "
        + "; ".join(f"{text}: {met[ok]}" for text, ok in checks)
        + "."
    )


# -- main ----------------------------------------------------------------------------------------


def export(rev: str) -> str:
    """`git archive <rev> celery_fleet` into a fresh temp dir; returns the dir."""
    tmp = tempfile.mkdtemp(prefix="fleet-baseline-")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "celery_fleet"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    return tmp


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="contention.py", description=(__doc__ or "").split("\n\n")[0]
    )
    default_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    parser.add_argument("--redis-url", default=default_url, help="%(default)s; always DB 12")
    parser.add_argument("--callers", default="32,64,1000", help="caller counts (%(default)s)")
    parser.add_argument("--procs", type=int, default=4, help="processes per run (%(default)s)")
    parser.add_argument("--seconds", type=float, default=25.0, help="run time (%(default)s)")
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="seconds not measured at the start"
    )
    parser.add_argument("--cap", type=int, default=20, help="max_in_flight (%(default)s)")
    parser.add_argument("--hold", type=float, default=0.05, help="seconds held (%(default)s)")
    parser.add_argument("--max-wait", type=float, default=120.0, help="slot max_wait")
    parser.add_argument(
        "--baseline",
        default="7140f06",
        help="commit to compare with, or a directory holding a celery_fleet package "
        "('' = none): %(default)s",
    )
    parser.add_argument(
        "--pool",
        choices=("auto", "default"),
        default="auto",
        help="auto: max_connections = threads + 16 in each worker's Redis URL; default: "
        "redis-py's own (100 in redis-py 8, too few for > ~90 waiting threads)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(argv)
    opts.callers = [int(c) for c in opts.callers.split(",") if c.strip()]
    if not opts.callers or min(opts.callers) < 1 or opts.procs < 1 or opts.cap < 1:
        parser.error("--callers, --procs and --cap must be positive")
    if not 0 <= opts.warmup < opts.seconds or opts.hold <= 0:
        parser.error("need 0 <= --warmup < --seconds and --hold > 0")
    return opts


def main(argv: list[str] | None = None) -> int:
    import redis
    from results import append_section, on_db

    opts = parse_args(argv)
    opts.url = on_db(opts.redis_url, DB)
    client = redis.Redis.from_url(opts.url, socket_timeout=10)
    client.ping()
    given = bool(opts.baseline) and (Path(opts.baseline) / "celery_fleet").is_dir()
    base_dir = str(Path(opts.baseline).resolve()) if given else ""
    if opts.baseline and not given:
        base_dir = export(opts.baseline)
    runs: list[Run] = []
    try:
        for n in opts.callers:
            codes = [("tree", "")] + ([(opts.baseline, base_dir)] if opts.baseline else [])
            for label, code_dir in codes:
                print(f"contention: {n} callers, {label} ...", file=sys.stderr)
                runs.append(run_once(opts, client, code_dir, label, n))
                time.sleep(1.0)
    finally:
        if base_dir and not given:
            shutil.rmtree(base_dir, ignore_errors=True)
    body = report(runs, opts)
    print(body)
    if not opts.no_write:
        title = f"Contention: {', '.join(map(str, opts.callers))} callers on {opts.cap} in flight"
        append_section(client, body, title)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
