"""@fleet_task(lane=...) in a real prefork worker: behind a saturated batch lane, an
interactive task enters its body at once (its slot from the reserve)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from celery_fleet import ConfigError
from celery_fleet.observability.status import limit_status

from .test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Any]:
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    with start_worker(
        redis_url, broker, pool=("prefork", "6"), module="tests.integration.lanes_app"
    ) as app_module:
        yield app_module


def _poll(check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_interactive_task_runs_behind_a_saturated_batch_lane(worker: Any) -> None:
    probe, tag = worker._probe, "sat"
    entered = worker.key(f"{tag}:in")
    batch = [worker.held.delay(tag, "batch") for _ in range(6)]
    # the batch lane fills its share: 2 of 4 (the rest are refused and rescheduled)
    _poll(lambda: probe.llen(entered) >= 2)
    interactive = worker.held.delay(tag, "interactive")
    _poll(lambda: b"interactive" in probe.lrange(entered, 0, -1))
    status = limit_status(worker.fleet, "llm")
    lanes = {x.lane: x.in_flight for x in status.lanes}
    assert lanes == {"interactive": 1, "batch": 2}, lanes  # batch never past its share
    probe.rpush(worker.key(f"{tag}:go:interactive"), "1")
    assert interactive.get(timeout=60) == "interactive"
    probe.rpush(worker.key(f"{tag}:go:batch"), "1")
    assert [r.get(timeout=120) for r in batch] == ["batch"] * 6


def test_a_rescheduled_task_keeps_its_lane(worker: Any) -> None:
    probe, fleet = worker._probe, worker.fleet
    batch = [fleet.try_acquire("llm", lane="batch") for _ in range(2)]
    interactive = [fleet.try_acquire("llm", lane="interactive") for _ in range(2)]
    assert all(batch) and all(interactive)  # all 4 held: the task is refused, rescheduled
    try:
        result = worker.held.delay("again", "interactive")
        _poll(lambda: probe.get(worker.key(f"rescheduled:{result.id}")))
        for d in interactive:
            fleet.release(d)
        # batch's share is still full (held here, for less than the lease's 60 s): only
        # an interactive slot can admit the copy
        _poll(lambda: probe.llen(worker.key("again:in")), timeout_s=20)
        probe.rpush(worker.key("again:go:interactive"), "1")
        assert result.get(timeout=60) == "interactive"
    finally:
        for d in batch:
            fleet.release(d)


def test_an_unknown_lane_fails_at_publish(worker: Any) -> None:
    with pytest.raises(ConfigError, match="unknown lane 'gold' of limit 'llm'"):
        worker.held.delay("x", "gold")
