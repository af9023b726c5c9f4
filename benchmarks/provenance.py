"""Where a benchmark ran, for its RESULTS.md section: machine, versions and commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["machine", "out"]


def out(*cmd: str) -> str:
    """A command's stdout in the repository ('?' when it cannot run)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "?"


def machine(redis_version: str) -> str:
    """``nproc …, Python …, Redis …, celery …, commit …`` (+ uncommitted changes)."""
    import celery

    dirty = " + uncommitted changes" if out("git", "status", "--porcelain", "-uno") else ""
    return (
        f"nproc {os.cpu_count()} ({platform.machine()}), Python {platform.python_version()}, "
        f"Redis {redis_version}, celery {celery.__version__}, "
        f"commit {out('git', 'rev-parse', '--short', 'HEAD')}{dirty}"
    )
