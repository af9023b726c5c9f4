"""Client instructions per ``fleet.slot()`` enter+exit and per redis-py ``PING``, by callgrind.

Wall and CPU time on a loaded 2-core box vary more than the differences worth measuring;
instructions do not. Each kind runs in a child process under ``valgrind --tool=callgrind``
(the client only: Redis is a separate process) twice, with ``--n`` calls and with none,
after the same warm-up (scripts loaded, threads started); the difference over ``--n`` is
the instructions one call costs the client (its threads included: the flusher, the lease
keeper, the counters' flusher). Those threads' work grows with wall time, which valgrind
stretches about 50-fold, so the all-threads figure varies by several percent from run to
run; the main thread's (the caller's path: ``--separate-threads=yes``) is the stable one.
``PYTHONHASHSEED`` is fixed so both runs start alike::

    .venv/bin/python benchmarks/slot_instructions.py [--url redis://127.0.0.1:6379/14]
        [--n 2000] [--baseline d516350] [--no-write]

Prints instructions per call for ``slot`` and ``ping`` (main thread, all threads) and
slot / ping, for this checkout and, with ``--baseline REV``, for ``git archive REV`` of the
package in the same run (slot after / before); appends a section to RESULTS.md unless
``--no-write``.
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def archive(rev: str) -> str:
    """A directory holding ``git archive rev`` of the package (the baseline tree)."""
    tree = tempfile.mkdtemp(prefix="slot-insn-")
    git = subprocess.run(
        ["git", "archive", rev, "celery_fleet"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", tree], input=git.stdout, check=True)
    return tree


def instructions(kind: str, n: int, url: str, tree: str = ROOT) -> tuple[int, int]:
    """Instructions callgrind counted for a child making ``n`` calls of ``kind`` with the
    package of ``tree``: in its main thread (the caller's path), and in all its threads."""
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=tree)
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
    ap.add_argument("--baseline", default="", help="a git revision to compare with")
    ap.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--child", choices=("slot", "ping"))
    opts = ap.parse_args(argv)
    if opts.child:
        return child(opts.child, opts.n, opts.url)
    trees = {"this tree": ROOT}
    if opts.baseline:
        trees[opts.baseline] = archive(opts.baseline)
    per: dict[tuple[str, str], tuple[float, float]] = {}
    rows = ["| tree | kind | main thread / call | all threads / call |", "|---|---|---:|---:|"]
    for kind in opts.kinds.split(","):
        for name, tree in trees.items():  # the trees alternate within a kind
            (main_n, all_n), (main_0, all_0) = (
                instructions(kind, opts.n, opts.url, tree),
                instructions(kind, 0, opts.url, tree),
            )
            got = per[name, kind] = ((main_n - main_0) / opts.n, (all_n - all_0) / opts.n)
            print(f"{name:10} {kind:5} main thread {got[0]:10,.0f}, all threads {got[1]:10,.0f}")
            rows.append(f"| {name} | {kind} | {got[0]:,.0f} | {got[1]:,.0f} |")
    lines = []
    for name in trees:
        if (name, "slot") in per and (name, "ping") in per:
            s, p = per[name, "slot"], per[name, "ping"]
            lines.append(
                f"{name}: slot / ping {s[0] / p[0]:.2f}x main thread, "
                f"{s[1] / p[1]:.2f}x all threads"
            )
    if opts.baseline and ("this tree", "slot") in per and (opts.baseline, "slot") in per:
        a, b = per["this tree", "slot"], per[opts.baseline, "slot"]
        lines.append(
            f"slot, this tree / {opts.baseline}: {a[0] / b[0]:.3f} main thread, "
            f"{a[1] / b[1]:.3f} all threads"
        )
    print("\n".join(lines))
    if not opts.no_write:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import redis
        from results import append_section

        client = redis.Redis.from_url(opts.url)
        body = (
            f"Client instructions per call (callgrind, {opts.n} calls minus none, after the "
            "same warm-up; the main thread is the caller's path and repeats to 0.1%; all "
            "threads adds the flusher, keeper and counters, whose work grows with valgrind's "
            "stretched wall time).\n\n"
            + "\n".join(rows)
            + "\n\n"
            + "\n".join(f"- {line}" for line in lines)
            + "\n"
        )
        append_section(client, body, "Client instructions per slot() (issue 26)")
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
