"""Redis CPU per decision, this tree's scripts against an earlier commit's, and the client
CPU per decision with and without hiredis (issue 26).

One run, on a redis-server of its own (``--port``; nobody else's commands in its figures),
every ratio within that run, kinds alternating round by round:

(a) **Redis CPU per decision**: one acquire + the release a slot sends (posted, no clock:
    ``release_command(..., clock=False)``, so this tree's lean release where the limit
    allows it, and release.lua for the one lease in 32 whose hold time is sampled), for
    each build: ``before`` (the ``celery_fleet`` of ``--baseline``, taken with ``git
    archive``), ``after`` (this tree) and the lean peer (``peers.Lean``: EVALSHA + ZREM).
    Each build runs in a process of its own with its own package on ``sys.path``,
    pipelining ``--pipeline`` acquires, then their releases, as a C client would (a
    build whose lean release rides in its next acquire, as ``slot()`` sends it since
    issue 26, sends each batch's releases inside the next batch's acquires); the
    parent reads INFO around each slice. Per decision: INFO commandstats ``usec`` of the
    commands the client sent (a script's inner commands are inside its EVALSHA's) and
    INFO cpu (Redis main thread, user + sys: parsing and replies included).
    With ``--callgrind`` the redis-server runs under ``valgrind --tool=callgrind`` and
    each slice also counts the instructions Redis ran (Ir, instrumentation on only during
    the slice): exact and repeatable where the µs of a loaded 2-core box move by 30%.
(b) **Client CPU per decision** (``--hiredis-path DIR``, a ``pip install --target DIR
    hiredis``): this tree's ``with fleet.slot()`` and ``try_acquire`` + ``release`` in one
    process, one thread, ``time.process_time()`` per decision, with redis-py's pure-Python
    reply parser and with hiredis (``DIR`` on ``sys.path``), and the baseline's with the
    pure-Python parser (what the shorter acquire reply saves a client), alternating.

Usage::

    .venv/bin/python benchmarks/redis_cpu.py --baseline d5ef306 [--port 0] [--rounds 6]
        [--decisions 20000] [--pipeline 4] [--hiredis-path /tmp/hiredis] [--callgrind]
        [--no-write]

The pipeline is shallow by default: the leases held at once are the pipeline's depth, and
a limit's lease zset is a listpack up to 128 entries, scanned by every ZADD and ZREM. At
64 deep the riding build held 64-128 leases where the others held 0-64 (+20k instructions
a decision from the scans alone); at 4 every build holds a few, as a process of
``slot()`` callers does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIMIT, TOKENS = "llm", 100
BUDGETS = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}
#: Issue 26's target for (a): Redis µs per decision (commandstats usec), and (b)'s peer.
MAX_US = 14.0


# -- the child: one build's decisions, on request --------------------------------------------


def _child_fleet(url: str, ns: str) -> tuple[Any, Any]:
    from celery_fleet import Fleet
    from celery_fleet.store.sync import SCRIPTS, script_source

    fleet = Fleet(redis_url=url, limits={LIMIT: BUDGETS}, namespace=ns)
    for name in SCRIPTS:  # every script loaded: the raw pipeline below never meets NOSCRIPT
        fleet.store.client.script_load(script_source(name))
    return fleet, fleet.admission


def _child_scripts(url: str, ns: str, depth: int) -> None:
    """Read ``<n>`` lines on stdin; run n decisions of this build, pipelined; answer
    ``done <seconds>``. The build is whatever ``celery_fleet`` is first on ``sys.path``."""
    import redis

    conn: Any = redis.ConnectionPool.from_url(url).get_connection()
    if ns.startswith("lean"):
        from peers import Lean

        lean = Lean(url, ns)
        lean.cycle()
        head = [b"EVALSHA", lean.script.sha.encode(), b"2", *(k.encode() for k in lean.keys)]
        tail = [str(x).encode() for x in (TOKENS, *lean.tail)]

        def acquires(ids: list[bytes]) -> list[bytes]:
            return [_pack(*head, i, *tail) for i in ids]

        def releases(ids: list[bytes], replies: list[Any]) -> list[bytes]:
            return [_pack(b"ZREM", lean.keys[1].encode(), i) for i in ids]
    else:
        fleet, adm = _child_fleet(url, ns)

        def acquires(ids: list[bytes]) -> list[bytes]:
            return [adm.acquire_command(LIMIT, TOKENS, i.decode())[1] for i in ids]

        def releases(ids: list[bytes], replies: list[Any]) -> list[bytes]:
            leases = [adm.decision(LIMIT, TOKENS, r).lease_id for r in replies]
            return [adm.release_command(LIMIT, lease, "neutral", 0, False)[1] for lease in leases]

    tag, n = os.urandom(4).hex().encode(), 0
    print("ready", flush=True)
    # A build whose acquire carries the previous release (issue 26: a slot's lean release
    # rides in the process's next ask of its limit): run it that way, as slot() does.
    if not ns.startswith("lean") and hasattr(adm, "posted_release"):
        _riding_decisions(conn, adm, tag, depth)
        return
    for line in sys.stdin:
        todo, start = int(line), time.perf_counter()
        while todo > 0:
            ids = [b"%s%016x" % (tag, n + i) for i in range(min(depth, todo))]
            n, todo = n + len(ids), todo - len(ids)
            conn.send_packed_command([b"".join(acquires(ids))])
            replies = [conn.read_response() for _ in ids]
            conn.send_packed_command([b"".join(releases(ids, replies))])
            for _ in ids:
                reply = conn.read_response()
                if (reply[0] if isinstance(reply, list) else reply) != 1:
                    raise SystemExit(f"{ns}: a release released nothing: {reply!r}")
        print(f"done {time.perf_counter() - start:.6f}", flush=True)


def _riding_decisions(conn: Any, adm: Any, tag: bytes, depth: int) -> None:
    """:func:`_child_scripts` for a build whose releases ride in its next acquires: each
    acquire of a batch carries one lean release of the batch before (a sampled one goes on
    its own, as slot() sends it); what is left at the end of a request goes on its own."""
    from celery_fleet.store.specs import RELEASE_LEAN

    n = 0
    for line in sys.stdin:
        todo, start = int(line), time.perf_counter()
        riding: list[bytes] = []
        while todo > 0:
            ids = [b"%s%016x" % (tag, n + i) for i in range(min(depth, todo))]
            n, todo = n + len(ids), todo - len(ids)
            riders, riding = riding[: len(ids)], riding[len(ids) :]
            modes = [b"0|" + r for r in riders] + [b"0"] * (len(ids) - len(riders))
            out = [
                adm._pack_acquire(LIMIT, TOKENS, i.decode(), 0, m)[1]
                for i, m in zip(ids, modes, strict=True)
            ]
            conn.send_packed_command([b"".join(out)])
            replies = [conn.read_response() for _ in ids]
            alone = []
            for reply in replies:
                if isinstance(reply, list) and reply[:1] == [b"lost"]:
                    raise SystemExit(f"a riding release released nothing: {reply!r}")
                lease = adm.decision(LIMIT, TOKENS, reply).lease_id
                script, packed = adm.release_command(LIMIT, lease, "neutral", 0, False)
                if script == RELEASE_LEAN.name:
                    riding.append(lease.encode())
                else:
                    alone.append(packed)
            alone += [
                adm.release_command(LIMIT, r.decode(), "neutral", 0, False)[1]
                for r in (riding if todo <= 0 else [])
            ]
            if alone:
                conn.send_packed_command([b"".join(alone)])
                for _ in alone:
                    reply = conn.read_response()
                    if (reply[0] if isinstance(reply, list) else reply) != 1:
                        raise SystemExit(f"a release released nothing: {reply!r}")
        print(f"done {time.perf_counter() - start:.6f}", flush=True)


def _child_client(url: str, ns: str, n: int) -> None:
    """Client CPU per decision of this tree: ``slot`` and ``try_acquire`` + ``release``,
    n each, alternating in 4 slices; prints JSON ``{kind: µs per decision}``."""
    import redis.utils

    fleet, _adm = _child_fleet(url, ns)

    def slot() -> None:
        with fleet.slot(LIMIT, tokens=TOKENS):
            pass

    def raw() -> None:
        fleet.release(fleet.try_acquire(LIMIT, tokens=TOKENS))

    kinds = {"slot()": slot, "try_acquire + release": raw}
    for run in kinds.values():  # warm: connections, scripts, caches
        for _ in range(200):
            run()
    got: dict[str, list[float]] = {k: [] for k in kinds}
    for s in range(4):
        for kind in list(kinds)[:: 1 if s % 2 == 0 else -1]:
            run, start = kinds[kind], time.process_time()
            for _ in range(n // 4):
                run()
            fleet.store.drain()
            got[kind].append((time.process_time() - start) / (n // 4) * 1e6)
    parser = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure-Python"
    print(json.dumps({"parser": parser, **{k: statistics.median(v) for k, v in got.items()}}))


def _pack(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


# -- the parent -------------------------------------------------------------------------------


def export(ref: str, into: Path) -> Path:
    """``celery_fleet`` as it was at ``ref`` (git archive), under ``into``."""
    data = subprocess.run(
        ["git", "archive", "--format=tar", ref, "celery_fleet"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    tar = into / "tree.tar"
    tar.write_bytes(data)
    with tarfile.open(tar) as archive:
        archive.extractall(into, filter="data")
    return into


def spawn(path: Path | None, *args: str, extra: str = "") -> subprocess.Popen[str]:
    """This file as a child, with ``path``'s ``celery_fleet`` (and ``extra``) first."""
    parts = [str(p) for p in (path, extra) if p] + [str(HERE), str(ROOT)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(parts)}
    return subprocess.Popen(
        [sys.executable, __file__, "--child", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(path or ROOT),
    )


def snapshot(client: Any) -> tuple[dict[str, tuple[int, int]], float]:
    info = client.info("cpu", "commandstats")
    cmds = {
        k[len("cmdstat_") :]: (int(v["calls"]), int(v["usec"]))
        for k, v in info.items()
        if k.startswith("cmdstat_")
    }
    cpu = float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
    return cmds, cpu


class Callgrind:
    """A redis-server under ``valgrind --tool=callgrind`` (instrumentation off until asked):
    :meth:`count` runs an action and returns the instructions Redis ran meanwhile. Its cron
    runs once a second (``--hz 1``): under valgrind a slice lasts seconds, and the default
    10 runs a second of housekeeping would add to every build by its running time."""

    def __init__(self, port: int, out: Path) -> None:
        from celery_fleet.testing.redis_server import find_binary, free_port

        self.port, self.out = port or free_port(), out
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out}/cg.out", find_binary(), "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--hz", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}"
        import redis

        deadline = time.monotonic() + 60
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("redis_cpu.py: no redis-server under valgrind") from None
                time.sleep(0.2)

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.proc.pid)], capture_output=True)

    def count(self, action: Any) -> int:
        for old in self.out.glob("cg.out*"):
            old.unlink()
        self._control("-z")
        self._control("-i", "on")
        action()
        self._control("-i", "off")
        self._control("-d")
        total = 0
        for dump in self.out.glob("cg.out*"):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        return total

    def stop(self) -> None:
        self.proc.terminate()  # the valgrind we started, by its pid
        self.proc.wait(timeout=60)


SENT = ("evalsha", "zrem")  # what the clients send (inner commands are inside EVALSHA's usec)


def part_a(
    url: str, builds: dict[str, Path | None], opts: argparse.Namespace, grind: Callgrind | None
) -> list[str]:
    import redis

    client = redis.Redis.from_url(url)
    run_id = uuid.uuid4().hex[:8]
    kids = {}
    for label, path in builds.items():
        ns = f"lean-{run_id}" if label == "lean" else f"{label}-{run_id}"
        kids[label] = spawn(path, "scripts", url, ns, str(opts.pipeline))
    for label, kid in kids.items():
        assert kid.stdout is not None
        if kid.stdout.readline().strip() != "ready":
            raise SystemExit(f"redis_cpu.py: the {label} build did not start")
    per: dict[str, dict[str, list[float]]] = {k: {"usec": [], "cpu": [], "ir": []} for k in kids}
    labels = list(kids)
    for r in range(opts.rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            kid = kids[label]
            assert kid.stdin is not None and kid.stdout is not None
            got: list[str] = []

            def one_slice(kid: Any = kid, got: list[str] = got) -> None:
                kid.stdin.write(f"{opts.decisions}\n")
                kid.stdin.flush()
                got.append(kid.stdout.readline())

            before = snapshot(client)
            if grind is None:
                one_slice()
            else:
                per[label]["ir"].append(grind.count(one_slice) / opts.decisions)
            after = snapshot(client)
            answer = got[0]
            if not answer.startswith("done"):
                raise SystemExit(f"redis_cpu.py: the {label} build failed")
            usec = sum(after[0].get(c, (0, 0))[1] - before[0].get(c, (0, 0))[1] for c in SENT)
            per[label]["usec"].append(usec / opts.decisions)
            per[label]["cpu"].append((after[1] - before[1]) * 1e6 / opts.decisions)
    for kid in kids.values():
        assert kid.stdin is not None
        kid.stdin.close()
        kid.wait(timeout=30)
    for key in client.scan_iter(match=f"*{run_id}*", count=1000):
        client.delete(key)
    client.close()
    med = {k: {m: statistics.median(v or [0]) for m, v in d.items()} for k, d in per.items()}
    rows = [
        "| build | Redis µs / decision (commandstats) | range | Redis CPU µs / decision "
        "(INFO cpu) | range | / before (µs) | / lean (µs) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in med.items():
        u, c = per[label]["usec"], per[label]["cpu"]
        rows.append(
            f"| {label} | **{m['usec']:.2f}** | {min(u):.2f}-{max(u):.2f} | {m['cpu']:.2f} | "
            f"{min(c):.2f}-{max(c):.2f} | {m['usec'] / med['before']['usec']:.2f} | "
            f"{m['usec'] / med['lean']['usec']:.2f} |"
        )
    after = med["after"]["usec"]
    head = (
        f"(a) Redis per decision (acquire + a slot's posted release, {opts.decisions:,} "
        f"decisions per slice, {opts.pipeline}-deep pipelines, median of {opts.rounds} "
        f"slices per build, order alternating): after **{after:.2f} µs** (target <= "
        f"{MAX_US:g}: {'met' if after <= MAX_US else '**NOT met**'}), before "
        f"{med['before']['usec']:.2f} (after / before {after / med['before']['usec']:.2f}), "
        f"lean peer {med['lean']['usec']:.2f} (after / lean {after / med['lean']['usec']:.2f})."
    )
    if grind is not None:
        rows += [
            "",
            "| build | Redis instructions / decision (callgrind Ir) | / before | / lean |",
            "|---|---:|---:|---:|",
        ]
        for label, m in med.items():
            rows.append(
                f"| {label} | **{m['ir']:,.0f}** | {m['ir'] / med['before']['ir']:.3f} | "
                f"{m['ir'] / med['lean']['ir']:.3f} |"
            )
        head += (
            f" Under callgrind (exact instruction counts; its µs are valgrind's): after / "
            f"before **{med['after']['ir'] / med['before']['ir']:.3f}**, after / lean "
            f"**{med['after']['ir'] / med['lean']['ir']:.3f}**."
        )
    return [head, "", *rows]


def part_b(url: str, opts: argparse.Namespace, before: Path) -> list[str]:
    if not opts.hiredis_path:
        return ["(b) skipped: no --hiredis-path (a `pip install --target DIR hiredis`)."]
    # (label, tree, hiredis dir): this tree with each parser, and the baseline's (pure-Python)
    runs = {
        "pure-Python": (None, ""),
        "hiredis": (None, opts.hiredis_path),
        "before, pure-Python": (before, ""),
    }
    got: dict[str, list[dict[str, Any]]] = {label: [] for label in runs}
    for r in range(opts.rounds):
        for label in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            path, extra = runs[label]
            ns = f"client-{uuid.uuid4().hex[:8]}"
            kid = spawn(path, "client", url, ns, str(opts.client_decisions), extra=extra)
            out, _ = kid.communicate(timeout=600)
            result = json.loads(out.strip().splitlines()[-1])
            if result["parser"] != label.split(", ")[-1]:
                raise SystemExit(f"redis_cpu.py: {label}: got the {result['parser']} parser")
            got[label].append(result)
    kinds = [k for k in got["hiredis"][0] if k != "parser"]
    rows = [
        "| parser | " + " | ".join(f"{k} µs / decision" for k in kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]
    med = {p: {k: statistics.median(x[k] for x in v) for k in kinds} for p, v in got.items()}
    for parser, m in med.items():
        rows.append(f"| {parser} | " + " | ".join(f"{m[k]:.1f}" for k in kinds) + " |")
    rows.append(
        "| hiredis / pure-Python | "
        + " | ".join(f"**{med['hiredis'][k] / med['pure-Python'][k]:.2f}**" for k in kinds)
        + " |"
    )
    rows.append(
        "| pure-Python, this tree / before | "
        + " | ".join(
            f"**{med['pure-Python'][k] / med['before, pure-Python'][k]:.2f}**" for k in kinds
        )
        + " |"
    )
    head = (
        f"(b) Client CPU per decision (time.process_time, one process, one thread, "
        f"{opts.client_decisions:,} decisions per kind and process, median of "
        f"{opts.rounds} processes per parser, parsers alternating)."
    )
    return [head, "", *rows]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        kind, url, ns, n = args[1:5]
        if kind == "scripts":
            _child_scripts(url, ns, int(n))
        else:
            _child_client(url, ns, int(n))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD~1", help="git ref of 'before' (%(default)s)")
    parser.add_argument("--port", type=int, default=0, help="private redis-server port (0: free)")
    parser.add_argument("--rounds", type=int, default=6, help="slices per build (%(default)s)")
    parser.add_argument("--decisions", type=int, default=20_000, help="per slice (%(default)s)")
    parser.add_argument("--pipeline", type=int, default=4, help="commands per write")
    parser.add_argument("--client-decisions", type=int, default=8_000, help="(b), per kind")
    parser.add_argument("--hiredis-path", default="", help="a dir holding hiredis, for (b)")
    parser.add_argument("--only", default="a,b", help="parts to run (%(default)s)")
    parser.add_argument(
        "--callgrind", action="store_true", help="(a) under valgrind: instructions per decision"
    )
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(args)
    sys.path[:0] = [str(HERE), str(ROOT)]
    from results import append_section

    from celery_fleet.testing.redis_server import RedisServer, find_binary

    server = RedisServer(binary=find_binary(), port=opts.port)
    with tempfile.TemporaryDirectory() as tmp, server as srv:
        import redis

        builds = {"before": export(opts.baseline, Path(tmp)), "after": ROOT, "lean": ROOT}
        lines = [f"Baseline (before): `{opts.baseline}`; a private redis-server.", ""]
        if "a" in opts.only and opts.callgrind:
            grind = Callgrind(0, Path(tmp))
            try:
                lines += part_a(grind.url, builds, opts, grind) + [""]
            finally:
                grind.stop()
        elif "a" in opts.only:
            lines += part_a(srv.url, builds, opts, None) + [""]
        if "b" in opts.only:
            lines += part_b(srv.url, opts, builds["before"] or ROOT)
        print("\n".join(lines))
        if not opts.no_write:
            client = redis.Redis.from_url(srv.url)
            append_section(client, "\n".join(lines), "Redis CPU per decision (issue 26)")
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
