"""The Celery app of test_tenants.py: tasks whose slots are keyed by a tenant argument.

Configured from the environment like fleet_app.py (broker, namespace, queue).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from celery_fleet import Fleet, FleetTask, fleet_task

BROKER = os.environ.get("FLEET_IT_BROKER", "redis://127.0.0.1:6379/10")
NAMESPACE = os.environ.get("FLEET_IT_NS", "it")

app = Celery("fleet_tenants", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_IT_REDIS", BROKER),
    fleet_namespace=NAMESPACE,
    fleet_limits={
        # every tenant one call at a time, the fleet 20
        "tenants": {"max_in_flight": 20, "keys": {"max_in_flight": 1}},
        "shared": {"max_in_flight": 50, "weights": {}},  # fair share only
        "line": {"max_in_flight": 1, "weights": {}},  # held by the test, callers line up
    },
    task_default_queue=os.environ.get("FLEET_IT_QUEUE", "fleet-it"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
fleet = Fleet(app)
_probe = redis.Redis.from_url(
    os.environ.get("FLEET_IT_PROBE") or os.environ.get("FLEET_IT_REDIS", BROKER)
)


def key(name: str) -> str:
    return f"{NAMESPACE}:probe:{name}"


@fleet_task(app=app, shared=False, bind=True, limit="tenants", key="{tenant}", max_wait=60)
def per_tenant(self: FleetTask, tenant: str, tag: str, hold_s: float) -> str | None:
    """Holds its tenant's slot for hold_s, recording how many of the tenant's (and of all
    tenants') calls run at once; a nested slot of another keyed limit names no key."""
    now = _probe.incr(key(f"{tag}:now:{tenant}"))
    total = _probe.incr(key(f"{tag}:now"))
    _probe.rpush(key(f"{tag}:seen"), f"{tenant} {now} {total}")
    time.sleep(hold_s)
    _probe.decr(key(f"{tag}:now:{tenant}"))
    _probe.decr(key(f"{tag}:now"))
    with self.fleet.slot("shared") as slot:
        return slot.key


def redis_ms() -> int:
    sec, usec = fleet.store.call("TIME")
    return int(sec) * 1000 + int(usec) // 1000


@fleet_task(app=app, shared=False, bind=True, key="{tenant}")
def keyed_in_line(self: FleetTask, tenant: str, tag: str, first_max_wait: float) -> dict[str, Any]:
    """Waits for a slot of 'line' (its key: the tenant), ``first_max_wait`` s on its first
    run (then it reschedules); a rescheduled copy first waits for the test's ``go:<tag>``,
    then as long as it takes. Returns its admission time (Redis clock) and reschedules."""
    past = self.throttling
    _probe.rpush(key(f"started:{tag}"), past.reschedules)
    if past.reschedules:
        _probe.blpop([key(f"go:{tag}")], timeout=60)
    max_wait = 60.0 if past.reschedules else first_max_wait
    with self.fleet.slot("line", max_wait=max_wait) as slot:
        assert slot.decision is not None
        return {
            "admitted_ms": slot.decision.at_ms,
            "reschedules": past.reschedules,
            "places": past.places,
        }
