"""Appending a dated section to ``benchmarks/RESULTS.md``, and the Redis DB a benchmark owns.

Shared by ``admission.py``, ``contention.py``, ``overhead.py``, ``beat.py`` and the
private-run benchmarks (``private_run.py``). It lives apart from them so that no
benchmark imports another to report: ``admission.py contention`` runs ``contention.py``,
and ``contention.py`` writes its section through here, not through ``admission.py``.

Each section names the machine (cores, Redis, Python, redis-py and its reply parser,
``limits``, the commit) and the exact command, so a figure can be compared with the next
run's on the same box.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import limits
import redis

__all__ = ["RESULTS", "append_section", "machine", "on_db"]

RESULTS = Path(__file__).with_name("RESULTS.md")
#: Written first when RESULTS.md is missing or empty.
HEADER = (
    "# Benchmark results\n\nAppended by the scripts in `benchmarks/`, one dated section per "
    "run, each naming its machine, versions and exact command.\n"
)


def machine(client: redis.Redis) -> str:
    """``nproc …, Redis …, Python …, redis-py … (… parser), limits …, commit …``.

    The parser matters: hiredis parses replies in C, which moves client-side figures.
    """
    git = ["git", "describe", "--always", "--dirty"]
    try:
        rev = subprocess.run(git, capture_output=True, text=True, cwd=RESULTS.parent, check=True)
        commit = rev.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    parser = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure-Python"
    return (
        f"nproc {os.cpu_count()} ({platform.machine()}), "
        f"Redis {client.info('server')['redis_version']}, Python {platform.python_version()}, "
        f"redis-py {redis.__version__} ({parser} parser), limits {limits.__version__}, "
        f"commit {commit}"
    )


def append_section(client: redis.Redis, body: str, title: str = "") -> None:
    """Append a dated section (``## <title> (<date>)``, or ``## <date>``) to RESULTS.md:
    machine (read from ``client``'s Redis), exact command, then ``body`` (markdown)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    heading = f"{title} ({stamp})" if title else stamp
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    fresh = not RESULTS.exists() or RESULTS.stat().st_size == 0
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(HEADER if fresh else "")
        fh.write(f"\n## {heading}\n\nMachine: {machine(client)}  \nCommand: `{command}`\n\n")
        fh.write(body)
    print(f"appended to {RESULTS}", file=sys.stderr)


def on_db(url: str, db: int) -> str:
    """``url`` pointed at Redis DB ``db``, whatever DB it named (``redis://``, ``rediss://``
    or ``unix://…?db=N``), so a benchmark's keys stay in a DB of its own."""
    parts = urlsplit(url)
    if parts.scheme == "unix":  # unix:///path?db=N (urlunsplit would drop the empty host)
        query = [q for q in parts.query.split("&") if q and not q.startswith("db=")]
        return f"{url.split('?')[0]}?{'&'.join([*query, f'db={db}'])}"
    return urlunsplit(parts._replace(path=f"/{db}"))
