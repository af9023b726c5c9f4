"""The Celery app of test_lanes_worker.py: one limit with priority lanes, a task whose lane
is a template over its arguments. Configured from the FLEET_IT_* environment
(test_worker.start_worker)."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from celery_fleet import Fleet, fleet_task
from celery_fleet.celery.signals import task_rescheduled

BROKER = os.environ.get("FLEET_IT_BROKER", "redis://127.0.0.1:6379/10")
NAMESPACE = os.environ.get("FLEET_IT_NS", "it")

app = Celery("fleet_lanes_it", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_IT_REDIS", BROKER),
    fleet_namespace=NAMESPACE,
    fleet_limits={
        "llm": {
            "max_in_flight": 4,
            "lanes": {"interactive": {"priority": 0, "reserve": 0.5}, "batch": {"priority": 1}},
        },
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


@task_rescheduled.connect
def _count_reschedule(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is not None and request.id:
        _probe.incr(key(f"rescheduled:{request.id}"))


@fleet_task(app=app, shared=False, limit="llm", lane="{tier}", max_wait=0.2)
def held(tag: str, tier: str) -> str:
    """Enter the body in the slot of lane ``tier``, say so, and hold it until the test
    lets this tier go (a refused call reschedules, freeing its worker process)."""
    _probe.rpush(key(f"{tag}:in"), tier)
    _probe.blpop([key(f"{tag}:go:{tier}")], timeout=60)
    _probe.rpush(key(f"{tag}:go:{tier}"), "1")  # the next holder of this tier goes too
    return tier
