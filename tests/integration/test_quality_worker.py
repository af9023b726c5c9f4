"""A paused quality breaker in a real prefork worker: its tasks reschedule, then run.

The test process drives the "qa" limit's quality breaker open with garbage verdicts (it
shares the worker's namespace); a task sent then meets ``QualityDegraded`` (a
``Backpressure``) in the worker, is rescheduled instead of failing, and succeeds once the
breaker half-opens and its calls, the probes, are healthy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from .test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODULE = "tests.integration.quality_app"
BAD = {"choices": [{"message": {"content": " "}, "finish_reason": "stop"}]}


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Any]:
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    with start_worker(redis_url, broker, module=MODULE, pool=("prefork", "2")) as app_module:
        yield app_module


def test_a_paused_limit_reschedules_its_tasks_until_healthy_probes_close_it(worker: Any) -> None:
    fleet = worker.fleet
    assert worker.answer.delay("warm").get(timeout=60)["ok"]
    end = time.monotonic() + 3.5  # a window of healthy calls: the baseline
    while time.monotonic() < end:
        with fleet.slot("qa") as slot:
            slot.judge(worker.OK)
    seen: list[str] = []
    fleet.on_quality_change(lambda limit, state, fields: seen.append(state))
    deadline = time.monotonic() + 10
    while "open" not in seen:
        assert time.monotonic() < deadline, "the quality breaker never opened"
        with fleet.slot("qa") as slot:
            slot.judge(BAD)
    result = worker.answer.delay("paused")
    out = result.get(timeout=90)
    assert out["ok"] and out["runs"] >= 2, out  # refused at least once, then ran
    assert fleet.quality("qa").state in ("half_open", "closed")
