"""The fleet's Redis stops for 10 s mid-burst under a real prefork worker: nothing fails.

The fleet's state lives in a redis-server of this test's own (on a free port), the broker
and results in the shared one, so only the fleet's Redis goes away. It comes back empty.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_fleet.resilience.fallback import HANDOVER_S, RETRY_S
from celery_fleet.testing.redis_server import RedisServer
from tests.integration.test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TASKS = 40
HOLD_S = 0.4
OUTAGE_S = 10.0
PUMP_LEASE_S = 3.0  # the broker's backup of a deferred copy comes 2 x (1 + 3) s after it


@pytest.fixture(scope="module")
def fleet_redis() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def worker(fleet_redis: RedisServer, redis_url: str) -> Iterator[Any]:
    shared = redis_url.rsplit("/", 1)[0]
    with start_worker(
        fleet_redis.url,
        f"{shared}/10",
        probe_url=f"{shared}/10",
        extra_env={"FLEET_IT_PUMP_LEASE": str(PUMP_LEASE_S)},
    ) as app_module:
        yield app_module


def most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_a_ten_second_outage_mid_burst_fails_no_task(worker: Any, fleet_redis: RedisServer) -> None:
    tag = uuid.uuid4().hex[:8]
    # Warm up: every pool process admits once, so the fleet records 4 live processes.
    warm = [worker.through_outage.delay(f"warm-{tag}", 0.2) for _ in range(8)]
    for r in warm:
        r.get(timeout=60)
    time.sleep(3.0)  # a counters flush (2 s) renews each process's record

    results = [worker.through_outage.delay(tag, HOLD_S) for _ in range(TASKS)]
    time.sleep(1.0)
    fleet_redis.stop()
    down_at = time.time()
    time.sleep(OUTAGE_S)
    fleet_redis.start()  # empty: every lease and bucket is gone
    up_at = time.time()

    records = [r.get(timeout=120) for r in results]  # raises if any task failed
    assert all(r.successful() for r in results)
    assert len(records) == TASKS
    time.sleep(2.0)
    later = [worker.through_outage.delay(f"later-{tag}", 0.1) for _ in range(8)]
    records += [r.get(timeout=60) for r in later]

    local = [r for r in records if r["local"]]
    assert local, "no task ran during the outage"
    assert all(r["start"] >= down_at - 0.5 for r in local)
    assert all(r["start"] <= up_at + RETRY_S + HANDOVER_S + 1.0 for r in local)
    # model: max_in_flight 3 shared by 4 processes: each process at most its local cap
    # (the slots it held through Redis plus its share of the free ones, or 1 of 3 when it
    # had no fleet-wide count), and the fleet at most 3 when every process had a count
    for pid in {r["pid"] for r in local}:
        mine = [(r["start"], r["end"]) for r in local if r["pid"] == pid]
        assert most_at_once(mine) <= max(r["cap"] for r in local if r["pid"] == pid), pid
    assert {r["share"] for r in local} == {4}
    if all(r["allotted"] for r in local):
        during = [(r["start"], r["end"]) for r in records if r["end"] > down_at - 0.5]
        during = [(s, e) for s, e in during if s < up_at]
        assert most_at_once(during) <= 3
    # Recovery is automatic: tasks started well after the hand-over hold Redis slots.
    after = [r for r in records if r["start"] > up_at + RETRY_S + HANDOVER_S + 1.0]
    assert len(after) >= 8 and all(not r["local"] for r in after)
    print(
        json.dumps(
            {
                "tasks": TASKS,
                "local": len(local),
                "after_restart": len(after),
                "allotted": all(r["allotted"] for r in local),
                "local_caps": sorted({r["cap"] for r in local}),
            },
        )
    )


def test_deferred_copies_lost_with_redis_run_once_from_the_broker_s_backup(
    worker: Any, fleet_redis: RedisServer
) -> None:
    """Each task is refused once and its copy deferred in the fleet's Redis, which then
    restarts empty: the copies are gone, and the broker's backups run each task once."""
    tag = uuid.uuid4().hex[:8]
    results = [worker.deferred_once.delay(tag, i) for i in range(12)]
    deadline = time.monotonic() + 30
    while worker.fleet.deferred.pending() < 12 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker.fleet.deferred.pending() == 12
    fleet_redis.stop()
    fleet_redis.start()  # empty: the 12 deferred copies are lost
    records = [r.get(timeout=90) for r in results]
    ran = [json.loads(x) for x in worker._probe.lrange(worker.key(f"ran:{tag}"), 0, -1)]
    assert sorted(r["i"] for r in ran) == list(range(12))  # each exactly once
    grace = 2 * (1.0 + PUMP_LEASE_S)
    assert all(r["late_s"] <= grace + 5.0 for r in records), records
