"""The Celery app of test_quality_worker.py: a limit whose quality breaker pauses it.

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
QUALITY = {"window": 2, "min_calls": 20, "reset_timeout": 2, "probes": 5, "on_degraded": "pause"}

app = Celery("fleet_quality_it", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_IT_REDIS", BROKER),
    fleet_namespace=NAMESPACE,
    fleet_limits={"qa": {"rpm": 10**6, "quality": QUALITY}},
    task_default_queue=os.environ.get("FLEET_IT_QUEUE", "fleet-it"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
fleet = Fleet(app)
# start_worker closes it afterwards (what the task records for the test)
_probe = redis.Redis.from_url(os.environ.get("FLEET_IT_REDIS", BROKER))

OK = {"choices": [{"message": {"content": "A fine answer."}, "finish_reason": "stop"}]}


def key(name: str) -> str:
    return f"{NAMESPACE}:probe:{name}"


@fleet_task(app=app, shared=False, bind=True, max_wait=5)
def answer(self: FleetTask, tag: str) -> dict[str, Any]:
    """One judged call of "qa"; every run (a reschedule runs again) is recorded."""
    _probe.rpush(key(tag), os.getpid())
    with fleet.slot("qa") as slot:
        verdict = slot.judge(OK)
    return {"ok": verdict.ok, "runs": _probe.llen(key(tag))}
