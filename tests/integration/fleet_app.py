"""The Celery app the integration tests run in real `celery worker` processes.

Configured from environment variables set by the test (broker, namespace, queue) so
that concurrent runs never share keys or queues.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from celery_fleet import Fleet, FleetTask, fleet_task
from celery_fleet.signals import task_rescheduled

BROKER = os.environ.get("FLEET_IT_BROKER", "redis://127.0.0.1:6379/10")
NAMESPACE = os.environ.get("FLEET_IT_NS", "it")

app = Celery("fleet_it", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_IT_REDIS", BROKER),
    fleet_namespace=NAMESPACE,
    fleet_limits={
        "model": {"max_in_flight": 3},
        "slow": {"requests": "5/second", "burst": 0.2},  # 1 request, then one per 200 ms
    },
    task_default_queue=os.environ.get("FLEET_IT_QUEUE", "fleet-it"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
fleet = Fleet(app)
_probe = redis.Redis.from_url(os.environ.get("FLEET_IT_REDIS", BROKER))


def key(name: str) -> str:
    return f"{NAMESPACE}:probe:{name}"


class CountingTask(FleetTask):
    """Counts reschedules (celery-fleet's task_rescheduled signal, below)."""


@task_rescheduled.connect
def _count_reschedule(sender: Any = None, **_: Any) -> None:
    if isinstance(sender, CountingTask):
        _probe.incr(key("reschedules"))


@fleet_task(app=app, shared=False, limit="model", base=CountingTask)
def guarded(hold_s: float) -> int:
    """Records how many bodies run at once, as seen by an atomic counter."""
    now = _probe.incr(key("inside"))
    _probe.rpush(key("observed"), now)
    time.sleep(hold_s)
    _probe.decr(key("inside"))
    return int(now)


@fleet_task(
    app=app, shared=False, limit="slow", max_wait=0, max_retries=0, base=CountingTask, bind=True
)
def throttled_whole(self: FleetTask, n: int) -> dict[str, Any]:
    return {"n": n, "retries": self.request.retries, "id": self.request.id}


@fleet_task(
    app=app,
    shared=False,
    bind=True,
    max_retries=0,
    base=CountingTask,
    autoretry_for=(Exception,),
    retry_backoff=True,
)
def throttled_body(self: FleetTask, n: int) -> dict[str, Any]:
    with self.fleet.slot("slow", max_wait=0):
        _probe.incr(key("body_calls"))
    return {"n": n, "retries": self.request.retries}


@fleet_task(
    app=app, shared=False, limit="model", acks_late=True, reject_on_worker_lost=True, bind=True
)
def dies_once(self: FleetTask, tag: str) -> int:
    """At-least-once, as the example project configures it: the first run SIGKILLs its own
    pool process while holding a slot; the task is delivered again and completes."""
    runs = _probe.incr(key(f"dies_once:{tag}"))
    if runs == 1:
        os.kill(os.getpid(), 9)
    return int(runs)
