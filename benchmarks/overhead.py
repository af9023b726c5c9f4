"""Overhead benchmark: what one celery-fleet decision costs Redis, and what callers keep of it.

One run, one Redis (always DB 15), keys under a fresh `bench-<uuid>` prefix deleted at the end.
Budgets are so large that every request is admitted (rpm 10**9, tpm 10**12, max_in_flight
10**6): this measures the cost of a decision, one try_acquire + one release of limit `llm`
with 100 tokens. Every figure is a per-decision cost or a ratio within this run.

(a) **Redis commands per decision at saturation**: Redis is the one resource every worker of a
    fleet shares. N spawned processes (default 4) loop on try_acquire + release (and on slot())
    in short slices; INFO commandstats and INFO cpu are read around each. Commands = `calls`
    of every command but INFO: the EVALSHAs *and* what the scripts run inside them (the
    table shows which remain). µs = `usec` of the commands clients sent: a script's usec
    includes its inner commands, so summing every row would count those twice. The Redis may
    be shared, so only clean slices count (Redis ran exactly the EVALSHAs our processes sent
    on the wire). Target: <= 10 commands. The µs are reported, not judged: with N Python
    processes and Redis on a 2-core box, Redis is preempted inside commands and commandstats
    counts that wall time; the Redis-cost target (<= 22 µs, so >= 40k decisions/s) is judged
    in (b), under a pipelined client, as the issue asks (redis-benchmark-style load).
(b) **Pipelined ceiling of the same scripts** (`overhead_ceiling.py`): what Redis itself can
    do with them when the client costs next to nothing, the yardstick for (c). K spawned
    processes (each of 1, 2, 4 by default; a build's best count is its ceiling) send the
    captured acquire EVALSHAs P at a time (default 64), then
    the P releases of the leases they returned (real releases), as a C client would; beside
    ours, the lean peer's (`peers.Lean`: EVALSHA + ZREM). Decisions/s and Redis µs per
    decision (commandstats usec of the commands sent) for each, and ours / lean. Targets:
    ours <= 22 µs per decision and >= 40,000 decisions/s.
(c) **Many threads per process**: how much of that ceiling Python callers reach, with the
    GIL and a shared connection pool. P spawned processes x T threads (default 16 x 16), one
    Fleet per process (as in a `-P threads` worker), loop on try_acquire + release and on
    `with fleet.slot(...)` in alternating slices after a start barrier; decisions/s summed,
    as % of (b)'s ceiling for ours (so (c) runs (b) too). Target >= 60%.
(d) **slot() against try_acquire()**: the context manager (lease keeper, line bookkeeping)
    must not cost more than the raw calls. One process, one thread, interleaved slices,
    order alternating; slot / try_acquire+release. Target within 5% (>= 0.95).
(e) **A no-op @fleet_task against a plain no-op task**: what a task pays for admission,
    measured in real `celery worker` processes (`-P threads -c 8`, `-P prefork -c 2`), see
    `overhead_tasks.py`. Target >= 0.9x on both pools.
(f) The redis-py parser in use (hiredis or pure Python) is named in the headlines.
(g) **slot() enter+exit against PING with the client pinned to one core** (issue 26), and the
    layers between them (`slot_layers.py`): client CPU, wall and Redis CPU µs per call, kinds
    alternating. Target: slot() <= 1.5x PING (wall, median of the slices).

Usage::

    .venv/bin/python benchmarks/overhead.py [--quick] [--only a,b,c,d,e,g] [--no-write]
        [--procs 4] [--threads 16x16] [--ceiling-procs 1,2,4] [--pipeline 64] [--private-redis]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import redis.utils
from overhead_ceiling import (
    MET,
    Stats,
    on_db,
    on_wire,
    part_b,
    preemption_note,
    private_redis,
    run_slices,
    script_commands,
)

from celery_fleet import Fleet
from celery_fleet.store.sync import mask_url

DB = 15
LIMIT, TOKENS = "llm", 100
BUDGETS = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}
MAX_CMDS, MIN_PCT, MIN_SLOT, MIN_TASK, MAX_PING_X = 10, 60.0, 0.95, 0.9, 1.5
#: Run lengths: seconds per kind or build (a, b, c, d), slices per kind, tasks per batch and
#: batches per kind (e).
SIZES = {
    "quick": {"a_s": 2, "a_n": 8, "b_s": 2, "b_n": 1, "c_s": 2, "c_n": 1, "d_s": 1, "d_n": 4,
              "e_n": 500, "e_rounds": 1, "g_n": 1000, "g_rounds": 3},
    "full": {"a_s": 6, "a_n": 20, "b_s": 6, "b_n": 3, "c_s": 6, "c_n": 3, "d_s": 5, "d_n": 10,
             "e_n": 3000, "e_rounds": 2, "g_n": 4000, "g_rounds": 7},
}  # fmt: skip
Part = tuple[list[str], list[str]]  # headline lines, table lines


def make_fleet(url: str, ns: str) -> Fleet:
    return Fleet(redis_url=url, namespace=ns, limits={LIMIT: BUDGETS})


def cycles(fleet: Fleet) -> dict[str, Callable[[], None]]:
    """The two ways to make one decision: try_acquire + release, and a slot()."""

    def cycle() -> None:
        decision = fleet.try_acquire(LIMIT, tokens=TOKENS)
        if not decision.allowed:
            raise RuntimeError(f"the benchmark budget refused a request: {decision}")
        fleet.release(decision)

    def slot() -> None:
        with fleet.slot(LIMIT, tokens=TOKENS):
            pass

    return {"cycle": cycle, "slot": slot}


# -- processes x threads running decisions (a, c) -----------------------------------------------

Plan = list[tuple[str, float]]  # (kind, seconds) slices, in order


def _proc(url: str, ns: str, threads: int, plan: Plan, bar: Any, out: Any) -> None:
    """One spawned process: ``threads`` threads sharing one Fleet run every slice of ``plan``,
    each slice started by the cross-process barrier (passed twice: the parent reads INFO
    between). Puts (kind, decisions, seconds, EVALSHAs sent) per slice, or an error message."""
    try:
        fleet = make_fleet(url, ns)
        steps, sent = cycles(fleet), [0]  # EVALSHAs this process sent, counted for (a) only

        def count(data: bytes) -> None:
            sent[0] += data.count(b"\r\nEVALSHA\r\n")

        if threads == 1:
            on_wire(fleet.store.client, count)
        go, counts, until, errors = threading.Barrier(threads + 1), [0] * threads, [0.0], []

        def loop(i: int) -> None:
            try:
                for step in steps.values():
                    for _ in range(30):  # warm up: connections, scripts
                        step()
                go.wait()
                for kind, _ in plan:
                    go.wait()
                    step, n, end = steps[kind], 0, until[0]
                    while time.perf_counter() < end:
                        step()
                        n += 1
                    counts[i] = n
                    go.wait()
            except Exception as exc:
                errors.append(exc)
                go.abort()

        for i in range(threads):
            threading.Thread(target=loop, args=(i,), daemon=True).start()
        go.wait(timeout=300)
        for kind, seconds in plan:
            bar.wait()  # ready: the parent reads INFO now
            bar.wait()  # go
            start, sent[0] = time.perf_counter(), 0
            until[0] = start + seconds
            go.wait()
            go.wait()
            out.put((kind, sum(counts), time.perf_counter() - start, sent[0]))
    except Exception as exc:  # tell the parent rather than leave the barrier hanging
        bar.abort()
        out.put(f"process {os.getpid()}: {(errors or [exc])[0]!r}")


#: kind, decisions/s summed, decisions, INFO delta, EVALSHAs the processes sent
Slice = tuple[str, float, int, Stats, int]


def drive(url: str, ns: str, procs: int, threads: int, plan: Plan) -> list[Slice]:
    """Run ``plan`` in ``procs`` spawned processes x ``threads``; per slice, the summed
    rate, the decisions and the INFO delta around it."""
    return [
        (kind, sum(g[1] / g[2] for g in got), sum(g[1] for g in got), stats, sum(g[3] for g in got))
        for kind, got, stats, _wall in run_slices(
            url, _proc, (url, ns, threads, plan), procs, plan, 600
        )
    ]


# -- (a) Redis cost per decision, (c) many threads, (d) slot against try_acquire ----------------


def part_a(url: str, ns: str, procs: int, seconds: float, rounds: int, kind: str) -> Part:
    """``kind``: "slot" (``with fleet.slot()``, whose release is posted) or "cycle"
    (try_acquire + release, whose caller waits for the release and its clock)."""
    per = seconds / rounds
    slices = drive(url, ns, procs, 1, [(kind, per)] * rounds)
    what = "with fleet.slot()" if kind == "slot" else "try_acquire + release"
    # A slice is clean when Redis ran exactly the EVALSHAs our processes sent.
    clean = [s for s in slices if s[3][0].get("evalsha", (0, 0))[0] == s[4]]
    used = clean or slices
    decisions, cpu, cmds, ours = 0, 0.0, dict[str, list[int]](), 0
    for _, _, n, (d, c), sent in used:
        decisions, cpu, ours = decisions + n, cpu + c, ours + sent
        for name, (calls, usec) in d.items():
            total = cmds.setdefault(name, [0, 0])
            total[0], total[1] = total[0] + calls, total[1] + usec
    inner = script_commands()
    n_cmds = sum(c for c, _ in cmds.values()) / decisions
    us = sum(u for name, (_, u) in cmds.items() if name not in inner) / decisions
    rate = sum(s[1] for s in slices) / len(slices)
    window = (
        f"{len(clean)} of {len(slices)} slices of {per:g} s were clean (Redis ran exactly "
        "the EVALSHAs our processes sent): the figures are from those"
        if clean
        else f"**no slice of {len(slices)} was clean**: other clients ran scripts in every "
        f"window (EVALSHA calls {cmds.get('evalsha', [0])[0]:,} against our {ours:,}), so these "
        "figures overstate the cost; rerun on an idle Redis or with --private-redis"
    )
    head = [
        f"- (a) {what}: **{n_cmds:.1f} Redis commands per decision** (target <= {MAX_CMDS}: "
        f"{MET[n_cmds <= MAX_CMDS]}); {us:.1f} µs of Redis wall time per decision with "
        f"{procs} busy client processes (preempted; the Redis-cost target is judged in (b)). "
        f"Redis main-thread CPU, with I/O and parsing: {cpu * 1e6 / decisions:.1f} µs per decision"
        + ("" if clean else " (**no clean slice: other clients counted too**, see below)")
    ]
    preempted = preemption_note(procs, "; (b) has the same figure under a pipelined client.")
    rows = [
        "",
        f"(a) {procs} processes x {what}, {rate:,.0f} decisions/s; INFO "
        f"commandstats deltas around each slice. {window}: {decisions:,} decisions, Redis main "
        f"thread busy {cpu / (per * len(used)):.0%}.{preempted}",
        "",
        "| command | calls / decision | µs / decision | µs / call | sent by |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (calls, usec) in sorted(cmds.items(), key=lambda kv: -kv[1][0]):
        who = "a script (its µs are in EVALSHA's)" if name in inner else "a client"
        rows.append(
            f"| {name.upper()} | {calls / decisions:.2f} | {usec / decisions:.2f} | "
            f"{usec / calls:.2f} | {who} |"
        )
    rows.append(f"| **total** | **{n_cmds:.2f}** | **{us:.2f}** (client-sent) | | |")
    return head, rows


def part_c(
    url: str, ns: str, shape: tuple[int, int], seconds: float, rounds: int, ceil: dict[str, float]
) -> Part:
    procs, threads = shape
    per = seconds / rounds
    slices = drive(
        url, ns, procs, threads, [(k, per) for _ in range(rounds) for k in ("cycle", "slot")]
    )
    head, rows = [], [
        "",
        f"(c) {procs} processes x {threads} threads, one Fleet per process; mean of {rounds} "
        f"alternating slice(s) of {per:g} s per loop.",
        "",
        "| loop | decisions/s | per-slice range | % of (b) ceiling (ours) |",
        "|---|---:|---:|---:|",
    ]  # fmt: skip
    for kind, label in (("cycle", "try_acquire + release"), ("slot", "with fleet.slot()")):
        got = [s[1] for s in slices if s[0] == kind]
        mean = sum(got) / len(got)
        pct = 100 * mean / ceil["ceiling"]
        rows.append(f"| {label} | {mean:,.0f} | {min(got):,.0f}-{max(got):,.0f} | **{pct:.0f}%** |")
        head.append(
            f"- (c) {procs} x {threads} threads, {label}: **{mean:,.0f} decisions/s = "
            f"{pct:.0f}% of the pipelined ceiling** (target >= {MIN_PCT:g}%: {MET[pct >= MIN_PCT]})"
        )
    return head, rows


def part_d(url: str, ns: str, seconds: float, rounds: int) -> Part:
    steps, per = cycles(make_fleet(url, ns)), seconds / rounds
    rates: dict[str, list[float]] = {"cycle": [], "slot": []}
    for kind in ("cycle", "slot"):
        for _ in range(200):
            steps[kind]()
    for r in range(rounds):
        for kind in ("cycle", "slot") if r % 2 == 0 else ("slot", "cycle"):
            step, n, start = steps[kind], 0, time.perf_counter()
            while time.perf_counter() - start < per:
                step()
                n += 1
            rates[kind].append(n / (time.perf_counter() - start))
    cyc, slot = (sum(rates[k]) / rounds for k in ("cycle", "slot"))
    pairs = [s / c for s, c in zip(rates["slot"], rates["cycle"], strict=True)]
    head = [
        f"- (d) **slot() / try_acquire + release: {slot / cyc:.3f}** (target >= {MIN_SLOT}: "
        f"{MET[slot / cyc >= MIN_SLOT]})"
    ]
    rows = [
        "",
        f"(d) One process, one thread, {rounds} interleaved pairs of {per:g} s slices.",
        "",
        "| loop | decisions/s | ratio | per-pair range |",
        "|---|---:|---:|---:|",
        f"| try_acquire + release | {cyc:,.0f} | 1.000 | |",
        f"| with fleet.slot() | {slot:,.0f} | **{slot / cyc:.3f}** | "
        f"{min(pairs):.3f}-{max(pairs):.3f} |",
    ]
    return head, rows


def part_g(url: str, ns: str, n: int, rounds: int) -> Part:
    """slot() enter+exit against a bare PING with this process pinned to one core (an
    unpinned PING swings 4x on a shared box), layer by layer (slot_layers.py)."""
    from slot_layers import kinds, measure, pinned

    fleet, admin = make_fleet(url, ns), redis.Redis.from_url(url)
    steps = kinds(fleet)
    with pinned():
        for step in steps.values():
            for _ in range(300):
                step()
        got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in steps}
        for r in range(rounds):
            for kind in list(steps) if r % 2 == 0 else list(steps)[::-1]:
                got[kind].append(measure(steps[kind], n, admin))
    fleet.store.drain()  # the last release, before the keys are deleted
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in got.items()}
    ratio = med["slot"][1] / med["ping"][1]
    head = [
        f"- (g) **slot() enter+exit / PING, pinned to one core: {ratio:.2f}x** wall at the "
        f"median of {rounds} slices (target <= {MAX_PING_X}x: {MET[ratio <= MAX_PING_X]}); "
        f"client CPU per decision {med['slot'][0]:.0f} µs (PING {med['ping'][0]:.0f} µs), "
        f"Redis CPU per decision {med['slot'][2]:.1f} µs"
    ]
    rows = [
        "",
        f"(g) One process pinned to one core, {rounds} alternating slices of {n} calls; medians. "
        "conn: the same scripts on a bare redis-py connection (release written with the next "
        "acquire); wire: the store's send + post; slot: `with fleet.slot()`.",
        "",
        "| layer | client CPU µs | wall µs | Redis CPU µs | wall / PING |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {k} | {c:.1f} | {w:.1f} | {rc:.1f} | {w / med['ping'][1]:.2f}x |"
            for k, (c, w, rc) in med.items()
        ),
    ]
    return head, rows


def part_e(url: str, run_id: str, n: int, rounds: int) -> Part:
    os.environ.update({"OVERHEAD_URL": url, "OVERHEAD_RUN": run_id})
    import overhead_tasks  # configured from the environment above

    try:
        rates = overhead_tasks.run_tasks(n, rounds, list(overhead_tasks.POOLS))
    finally:
        overhead_tasks.clean(redis.Redis.from_url(url))
    return overhead_tasks.report(rates, n, MIN_TASK, MET)


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    default_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    parser.add_argument("--redis-url", default=default_url, help="default $REDIS_URL, else "
                        "%(default)s; always DB 15")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="short runs (development)")
    parser.add_argument(
        "--only", default="a,b,c,d,e,g", help="parts, default %(default)s; c runs b"
    )
    parser.add_argument("--procs", type=int, default=4, help="(a) processes, default %(default)s")
    parser.add_argument("--threads", default="16x16", help="(c) PROCSxTHREADS, default %(default)s")
    parser.add_argument("--ceiling-procs", default="1,2,4",
                        help="(b) process counts to try, default %(default)s")  # fmt: skip
    parser.add_argument("--pipeline", type=int, default=64, help="(b) commands per write: 64")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument(
        "--private-redis",
        action="store_true",
        help="start a redis-server of our own on a free port (no other clients), stopped after",
    )
    opts = parser.parse_args(argv)
    opts.only = {p.strip() for p in opts.only.split(",") if p.strip()}
    if not opts.only or not opts.only <= set("abcdeg"):
        parser.error("--only takes a comma-separated subset of a,b,c,d,e,g")
    try:
        procs, threads = (int(x) for x in opts.threads.lower().split("x"))
    except ValueError:
        parser.error("--threads takes PROCSxTHREADS, e.g. 16x16")
    try:
        opts.ceiling_procs = [int(x) for x in opts.ceiling_procs.split(",") if x.strip()]
    except ValueError:
        parser.error("--ceiling-procs takes comma-separated process counts, e.g. 1,2,4")
    if not opts.ceiling_procs or min(opts.ceiling_procs) < 1:
        parser.error("--ceiling-procs must name at least one positive process count")
    if min(procs, threads, opts.procs, opts.pipeline) < 1:
        parser.error("--procs, --threads and --pipeline must be positive")
    opts.shape = (procs, threads)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    server = private_redis() if opts.private_redis else None
    if server is not None:
        opts.redis_url = server.url
    try:
        return run(opts)
    finally:
        if server is not None:
            server.stop()  # by its pid: the one we started


def run(opts: argparse.Namespace) -> int:
    url, run_id = on_db(opts.redis_url, DB), f"bench-{uuid.uuid4().hex[:12]}"
    size = SIZES["quick" if opts.quick else "full"]
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
    try:
        clients = int(client.info("clients")["connected_clients"])
    except redis.RedisError as exc:
        print(f"overhead.py: Redis at {mask_url(url)} does not answer: {exc}", file=sys.stderr)
        return 2
    parser = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure Python (hiredis not installed)"
    where = "a private redis-server" if opts.private_redis else f"Redis at {mask_url(url)}"
    heads = {"f": [f"- (f) redis-py {redis.__version__}, parser: {parser}; {where}, {clients} "
                   "client(s) connected at the start (every INFO figure is a delta)"]}  # fmt: skip
    tables: list[str] = []
    ceil: dict[str, float] = {}
    try:
        for part in sorted(opts.only | ({"b"} if "c" in opts.only else set())):
            print(f"({part}) ...", file=sys.stderr)
            ns = f"{run_id}-{part}"
            if part == "a":
                head, rows = list[str](), list[str]()
                for kind in ("slot", "cycle"):
                    h, r = part_a(url, f"{ns}-{kind}", opts.procs, size["a_s"], size["a_n"], kind)
                    head, rows = head + h, rows + r
            elif part == "b":
                sizes, fleet = (size["b_s"], size["b_n"]), make_fleet(url, ns)
                head, rows, ceil = part_b(url, fleet, LIMIT, TOKENS, ns, sizes, opts)
            elif part == "c":
                head, rows = part_c(url, ns, opts.shape, size["c_s"], size["c_n"], ceil)
            elif part == "d":
                head, rows = part_d(url, ns, size["d_s"], size["d_n"])
            elif part == "g":
                head, rows = part_g(url, ns, size["g_n"], size["g_rounds"])
            else:
                head, rows = part_e(url, run_id, size["e_n"], size["e_rounds"])
            heads[part], tables = head, tables + rows
            for key in client.scan_iter(match=f"*{ns}*", count=1000):
                client.delete(key)
    finally:
        for key in client.scan_iter(match=f"*{run_id}*", count=1000):
            client.delete(key)
    body = "\n".join([*(h for part in sorted(heads) for h in heads[part]), *tables]) + "\n"
    print(body)
    if not opts.no_write:
        from results import append_section  # benchmarks/ is on sys.path when run as a script

        append_section(client, body, title="Overhead benchmark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
