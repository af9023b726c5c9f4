"""The Celery app of test_quality_fallback_worker.py: "qa" falls back to "qb" while its
quality breaker is open, and "qb" has a quality breaker of its own.

Configured from the environment as fleet_app.py is (start_worker sets FLEET_IT_*).
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from celery_fleet import Fleet, FleetTask, fleet_task

BROKER = os.environ.get("FLEET_IT_BROKER", "redis://127.0.0.1:6379/10")
NAMESPACE = os.environ.get("FLEET_IT_NS", "it")

app = Celery("fleet_quality_fallback_it", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_IT_REDIS", BROKER),
    fleet_namespace=NAMESPACE,
    fleet_limits={
        "qa": {"rpm": 10**6, "quality": {"on_degraded": "fallback:qb", "reset_timeout": 600}},
        "qb": {"rpm": 10**6, "quality": {"on_degraded": "flag", "reset_timeout": 3}},
    },
    task_default_queue=os.environ.get("FLEET_IT_QUEUE", "fleet-it"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
fleet = Fleet(app)
# start_worker closes it afterwards (what the task records for the test)
_probe = redis.Redis.from_url(os.environ.get("FLEET_IT_REDIS", BROKER))


def key(name: str) -> str:
    return f"{NAMESPACE}:probe:{name}"


@fleet_task(app=app, shared=False, bind=True, max_wait=5)
def answer(self: FleetTask, tag: str) -> dict[str, Any]:
    """One call asked of "qa"; every run (a reschedule runs again) is recorded."""
    _probe.rpush(key(tag), os.getpid())
    with fleet.slot("qa") as slot:
        limit = slot.limit
    return {"limit": limit, "runs": _probe.llen(key(tag))}
