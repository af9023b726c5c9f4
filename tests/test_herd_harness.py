"""``Herd.run`` when start-up fails: every worker process it started is stopped, by pid.

No real herd: the worker command is swapped for a sleeping Python (so a leak is a process
still running after ``run`` raised), and the failures are a Redis that wants a password,
workers that never answer, and a worker that cannot be spawned.
"""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.harness import herd
from benchmarks.harness.herd import Herd, Scenario
from celery_fleet.testing.redis_server import RedisServer

SCENARIO = Scenario(agents=2, steps=1, workers=3, concurrency=1, timeout_s=5)
TEST_DB = 13


class Spawned(list[subprocess.Popen[bytes]]):
    """The stand-in worker processes ``Herd`` started; ``fail_at`` makes that spawn raise."""

    fail_at: int | None = None

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        if len(self) == self.fail_at:
            raise OSError(11, "Resource temporarily unavailable")
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.append(proc)
        return proc

    def running(self) -> list[int]:
        """Pids of the stand-ins that have not exited."""
        return [p.pid for p in self if p.poll() is None]


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spawned]:
    """Herd's ``subprocess`` with Popen swapped for :meth:`Spawned.popen` (herd.py only)."""
    procs = Spawned()
    fake = types.SimpleNamespace(**vars(subprocess))
    fake.Popen = procs.popen
    monkeypatch.setattr(herd, "subprocess", fake)
    yield procs
    for proc in procs:  # a leak fails the test; do not leave it running as well
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # kombu retries the refused connection for about 6 s
def test_a_redis_that_refuses_the_event_receiver_leaves_no_worker_running(
    spawned: Spawned,
) -> None:
    """`make demo` against a password-protected Redis: the receiver gets NOAUTH."""
    with RedisServer(password="secret") as server:
        without_password = f"redis://127.0.0.1:{server.port}"
        with (
            Herd(SCENARIO, without_password, TEST_DB) as h,
            pytest.raises(Exception, match="(?i)auth"),
        ):
            h.run("plain")
    assert spawned.running() == []


def test_workers_that_never_answer_are_stopped(
    spawned: Spawned, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[herd.BreakerEvents] = []

    class Recorded(herd.BreakerEvents):
        def __init__(self, app: Any) -> None:
            super().__init__(app)
            events.append(self)

    def never_ready(self: Herd, app: Any, names: list[str], timeout_s: float = 60.0) -> None:
        raise RuntimeError(f"celery workers did not start: {sorted(names)}")

    monkeypatch.setattr(herd, "BreakerEvents", Recorded)
    monkeypatch.setattr(Herd, "_wait_ready", never_ready)
    with Herd(SCENARIO, redis_url, TEST_DB) as h, pytest.raises(RuntimeError, match="did not"):
        h.run("plain")
    assert len(spawned) == SCENARIO.workers and spawned.running() == []
    assert [e._thread.is_alive() for e in events] == [False]


def test_a_worker_that_cannot_be_spawned_stops_the_ones_before_it(
    spawned: Spawned, redis_url: str
) -> None:
    spawned.fail_at = 2
    with Herd(SCENARIO, redis_url, TEST_DB) as h, pytest.raises(OSError, match="unavailable"):
        h.run("plain")
    assert len(spawned) == 2 and spawned.running() == []
