"""Client instructions per ``fleet.slot()`` enter+exit and per redis-py ``PING``, by callgrind.

Wall and CPU time on a loaded 2-core box vary more than the differences worth measuring;
instructions do not. Each kind runs in a child process under ``valgrind --tool=callgrind``
(the client only: Redis is a separate process) twice, with ``--n`` calls and with none,
after the same warm-up (scripts loaded, threads started); the difference over ``--n`` is
the instructions one call costs the client (its threads included: the flusher, the lease
keeper, the counters' flusher). Those threads' work grows with wall time, which valgrind
stretches about 50-fold, so the all-threads figure varies by several percent from run to
run; the main thread's (the caller's path: ``--separate-threads=yes``) is the stable one.
``PYTHONHASHSEED`` is fixed so both runs start alike. Run it once per tree::

    PYTHONPATH=<checkout> .venv/bin/python benchmarks/slot_instructions.py \\
        [--url redis://127.0.0.1:6379/14] [--n 2000]

Prints instructions per call for ``slot`` and ``ping`` (main thread, all threads) and
slot / ping.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import uuid

BUDGETS = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}
WARM = 300


def child(kind: str, n: int, url: str) -> int:
    """Warm up, then make ``n`` calls of ``kind``; cleans its keys up."""
    import redis

    from celery_fleet import Fleet

    ns = f"insn-{uuid.uuid4().hex[:8]}"
    fleet = Fleet(redis_url=url, namespace=ns, limits={"llm": BUDGETS})
    client = fleet.store.client

    def slot() -> None:
        with fleet.slot("llm", tokens=100):
            pass

    # Natively a loop's next slot asks within about 0.1 ms of the last release, well within
    # FLUSH_S (1 ms): the release rides in that ask. Valgrind stretches the loop ~50-fold,
    # and the flusher would write each release on its own first (another path): give it
    # as much more time.
    fleet.store.combiner.flush_s = 1.0
    fn = slot if kind == "slot" else client.ping
    for _ in range(WARM):  # both kinds warm up alike: scripts loaded, threads started
        slot()
        client.ping()
    for _ in range(n):
        fn()
    fleet.store.drain()
    admin = redis.Redis.from_url(url)
    keys = list(admin.scan_iter(match=f"{{{ns}*", count=1000))
    if keys:
        admin.delete(*keys)
    fleet.close()
    return 0


def instructions(kind: str, n: int, url: str) -> tuple[int, int]:
    """Instructions callgrind counted for a child making ``n`` calls of ``kind``: in its
    main thread (the caller's path), and in all its threads."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            f"--callgrind-out-file={tmp}/cg.out",
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            kind,
            "--n",
            str(n),
            "--url",
            url,
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{kind} n={n} failed:\n{done.stderr[-3000:]}")
        per_thread = {}
        for out in glob.glob(f"{tmp}/cg.out-*"):
            with open(out) as f:
                found = re.search(r"^totals:\s*(\d+)", f.read(), re.M)
            if found is not None:
                per_thread[int(out.rsplit("-", 1)[1])] = int(found.group(1))
    if 1 not in per_thread:
        raise SystemExit(f"no instruction count in callgrind's output:\n{done.stderr[-3000:]}")
    return per_thread[1], sum(per_thread.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--kinds", default="slot,ping", help="comma-separated: slot, ping")
    ap.add_argument("--child", choices=("slot", "ping"))
    opts = ap.parse_args(argv)
    if opts.child:
        return child(opts.child, opts.n, opts.url)
    per: dict[str, tuple[float, float]] = {}
    for kind in opts.kinds.split(","):
        (main_n, all_n), (main_0, all_0) = (
            instructions(kind, opts.n, opts.url),
            instructions(kind, 0, opts.url),
        )
        per[kind] = ((main_n - main_0) / opts.n, (all_n - all_0) / opts.n)
        print(
            f"{kind:5} main thread {per[kind][0]:10,.0f} instructions/call, all threads "
            f"{per[kind][1]:10,.0f}  (main: n={opts.n} {main_n:,}, 0 {main_0:,})"
        )
    if "slot" in per and "ping" in per:
        s, p = per["slot"], per["ping"]
        print(f"slot / ping: main thread {s[0] / p[0]:.2f}x, all threads {s[1] / p[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
