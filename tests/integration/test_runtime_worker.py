"""``celery fleet set-limit`` from a shell, applied by a real prefork worker's pool processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.integration.runtime_app"


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Any]:
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    with start_worker(redis_url, broker, module=MODULE, pool=("prefork", "2")) as app_module:
        yield app_module


def fleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A runtime_app fleet ...`` as an operator runs it (the worker's env)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", MODULE, "fleet", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def until_every_process_applies(worker: Any, want: dict[str, int], in_a_row: int = 8) -> set[int]:
    """Send tasks until ``in_a_row`` answers in a row show ``want`` (both pool processes);
    returns the pids that answered. A bound, not a speed: the target is one second."""
    deadline = time.monotonic() + 60
    streak: list[dict[str, Any]] = []
    while len(streak) < in_a_row:
        assert time.monotonic() < deadline, f"not applied: {streak or 'no streak'}"
        seen = worker.applied.delay().get(timeout=60)
        if all(seen[k] == v for k, v in want.items()):
            streak.append(seen)
        else:
            streak = []
    return {s["pid"] for s in streak}


def test_set_limit_from_a_shell_reaches_every_pool_process(worker: Any) -> None:
    first = worker.applied.delay().get(timeout=60)
    assert (first["cap"], first["rpm"], first["version"]) == (2, 6000, 0)

    done = fleet_cli("set-limit", "rt", "--max-in-flight", "5", "--rpm", "900", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    version = out["version"]
    assert out["fields"] == {"max_in_flight": 5, "rpm": 900}
    pids = until_every_process_applies(worker, {"cap": 5, "rpm": 900, "version": version})
    assert len(pids) >= 1

    status = fleet_cli("status", "--json", "rt")
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert (row["config_version"], row["cap"]) == (version, 5)
    assert row["config_fields"] == {"max_in_flight": 5, "rpm": 900}
    assert f"version {version} (max_in_flight=5, rpm=900)" in fleet_cli("status", "rt").stdout

    bad = fleet_cli("set-limit", "rt", "--rpm", "0")
    assert bad.returncode == 1 and "['rpm'] must be a positive int, got 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    again = json.loads(fleet_cli("status", "--json", "rt").stdout)[0]
    assert again["config_version"] == version  # nothing changed

    reset = fleet_cli("reset-limit", "rt")
    assert reset.returncode == 0 and "as configured" in reset.stdout, reset.stderr
    after = json.loads(fleet_cli("status", "--json", "rt").stdout)[0]
    assert after["config_version"] > version and after["cap"] == 2
    until_every_process_applies(worker, {"cap": 2, "rpm": 6000, "version": after["config_version"]})
