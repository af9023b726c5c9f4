"""A fallback whose own quality breaker is open, in a real prefork worker (issue 25).

The test process opens the breakers of "qa" (for ten minutes) and of its fallback "qb"
(for 3 s) as the count script does; a task asking for "qa" then meets
``QualityDegraded`` in the worker instead of being moved to the degraded "qb", is
rescheduled (not failed), and runs against "qb" once that breaker half-opens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_fleet.quality.breaker import REFRESH_S

from .test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODULE = "tests.integration.quality_fallback_app"


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Any]:
    with start_worker(redis_url, redis_url, module=MODULE, pool=("prefork", "2")) as app_module:
        yield app_module


def open_breaker(client: redis.Redis, fleet: Any, limit: str) -> None:
    sec, usec = client.time()
    opened = sec * 1000 + usec / 1000
    key = fleet.admission.quality.key(limit)
    client.hset(key, mapping={"state": "open", "opened_at": f"{opened:.3f}"})


def test_a_task_is_rescheduled_while_its_fallback_is_degraded_too(
    worker: Any, redis_url: str
) -> None:
    assert worker.answer.delay("warm").get(timeout=60)["limit"] == "qa"
    client = redis.Redis.from_url(redis_url)
    try:
        open_breaker(client, worker.fleet, "qa")
        open_breaker(client, worker.fleet, "qb")
        time.sleep(REFRESH_S + 0.2)  # the worker's local copies, read by the warm task, age
        out = worker.answer.delay("both-open").get(timeout=90)
    finally:
        client.close()
    # refused at least once (qb was open: no garbage bought), then run against qb
    assert out["limit"] == "qb" and out["runs"] >= 2, out
    assert worker.fleet.quality("qa").state == "open"
