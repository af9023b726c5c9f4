"""Rescheduled tasks wait in Redis and the elected pump publishes them: four real workers,
and the worker that runs the pump is SIGKILLed while tasks wait.

Each task is refused on its first run and rescheduled ~3 s later. It must then run
exactly once, and no later than its due time + one pump period (1 s) + one pump lease
(3 s here) + slack for this 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_fleet.celery.pump import PUMP_ELECTION
from tests.integration.test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TASKS = 40
LEASE_S = 3.0
PERIOD_S = 1.0
SLACK_S = 2.0


@pytest.fixture(scope="module")
def workers(redis_url: str) -> Iterator[Any]:
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    with start_worker(
        redis_url,
        broker,
        workers=4,
        pool=("threads", "2"),
        extra_env={"FLEET_IT_PUMP_LEASE": str(LEASE_S)},
    ) as app_module:
        yield app_module


def leader_pid(app_module: Any) -> int | None:
    """The pid of the worker whose pump holds the election's lease (its owner id is
    ``host:pid:uuid``)."""
    fleet = app_module.fleet
    key = f"{{{fleet.namespace}:leader:{PUMP_ELECTION}}}:lease"
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        owner = client.hget(key, "owner")  # the lease: a hash of owner and token
    finally:
        client.close()
    if not owner:
        return None
    return int(owner.decode().split(":")[1])


def wait_for(check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s")


def test_each_deferred_task_runs_once_in_time_across_a_pump_leader_kill(workers: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    pids = {p.pid for p in workers.worker_procs}
    first = wait_for(lambda: leader_pid(workers), 30.0)
    assert first in pids

    results = [workers.deferred_once.delay(tag, i) for i in range(TASKS)]
    # All refused once and waiting in Redis (not as ETA messages in a worker's memory).
    wait_for(lambda: workers.fleet.deferred.pending() >= TASKS, 30.0)
    os.kill(first, signal.SIGKILL)

    records = [r.get(timeout=60) for r in results]
    ran = [json.loads(x) for x in workers._probe.lrange(workers.key(f"ran:{tag}"), 0, -1)]
    assert Counter(r["i"] for r in ran) == Counter(range(TASKS))  # each exactly once
    late = max(r["late_s"] for r in records)
    assert late <= PERIOD_S + LEASE_S + SLACK_S, late
    assert all(r["pid"] != first for r in ran)  # the killed worker ran none of them
    # The broker's backups (due 2 x (period + lease) after each copy) find their copies
    # published and are dropped: still exactly one run each.
    time.sleep(2 * (PERIOD_S + LEASE_S) + 4.0)
    ran = [json.loads(x) for x in workers._probe.lrange(workers.key(f"ran:{tag}"), 0, -1)]
    assert Counter(r["i"] for r in ran) == Counter(range(TASKS))
    second = wait_for(lambda: leader_pid(workers), 10.0)
    assert second in pids - {first}
    assert workers.fleet.deferred.pending() == 0
    print(json.dumps({"tasks": TASKS, "latest_s": round(late, 2), "killed": first}))
