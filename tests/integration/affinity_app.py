"""The Celery app of test_affinity.py: tasks with an affinity key, on affinity queues.

Configured from the environment (broker, namespace, queue, distribution mode), so each
test runs its own workers, queues and keys. The broker redelivers the unacknowledged
tasks of a SIGKILLed worker within a few seconds (short visibility timeout, frequent
restore sweeps); tasks are acknowledged late, so a killed task runs again elsewhere.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from celery_fleet import Fleet, FleetTask, Throttled, fleet_task

BROKER = os.environ.get("FLEET_AFF_BROKER", "redis://127.0.0.1:6379/12")
NAMESPACE = os.environ.get("FLEET_AFF_NS", "aff")

app = Celery("fleet_affinity", broker=BROKER, backend=os.environ.get("FLEET_AFF_BACKEND", BROKER))
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_AFF_REDIS", BROKER),
    fleet_namespace=NAMESPACE,
    fleet_distribution=os.environ.get("FLEET_AFF_MODE", "dedicated"),
    fleet_affinity_queues=int(os.environ.get("FLEET_AFF_QUEUES", "8")),
    fleet_steal_threshold=int(os.environ.get("FLEET_AFF_THRESHOLD", "2")),
    fleet_affinity_lease=float(os.environ.get("FLEET_AFF_LEASE", "1.5")),
    fleet_max_countdown=4.0,
    fleet_limits={"one": {"max_in_flight": 1}},
    task_default_queue=os.environ.get("FLEET_AFF_QUEUE", "fleet-aff"),
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={
        "visibility_timeout": 5,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
    if BROKER.startswith("redis")
    else {},
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
fleet = Fleet(app)
_probe = redis.Redis.from_url(os.environ.get("FLEET_AFF_REDIS", BROKER))


def key(name: str) -> str:
    return f"{NAMESPACE}:probe:{name}"


@fleet_task(app=app, shared=False, bind=True, affinity="customer:{customer}")
def handle(self: FleetTask, customer: str, n: int, work_s: float = 0.0) -> dict[str, Any]:
    """Records where it ran (worker, queue) and takes ``work_s``."""
    queue = (self.request.delivery_info or {}).get("routing_key")
    _probe.rpush(key("ran"), f"{customer} {n} {self.request.hostname} {queue}")
    time.sleep(work_s)
    return {"worker": self.request.hostname, "queue": queue, "n": n}


@fleet_task(app=app, shared=False, bind=True, affinity=lambda customer, n: f"c:{customer}")
def by_callable(self: FleetTask, customer: str, n: int) -> str | None:
    """Its affinity key comes from a callable."""
    return (self.request.delivery_info or {}).get("routing_key")  # type: ignore[no-any-return]


@fleet_task(app=app, shared=False, bind=True, affinity="customer:{customer}")
def throttled_once(self: FleetTask, customer: str, tag: str) -> list[str]:
    """Refused once (backpressure: rescheduled, not failed), then runs; records the
    affinity queue of each run."""
    queue = (self.request.delivery_info or {}).get("routing_key")
    _probe.rpush(key(f"queues:{tag}"), str(queue))
    if _probe.incr(key(f"runs:{tag}")) == 1:
        raise Throttled("llm", 50, "test")
    return [q.decode() for q in _probe.lrange(key(f"queues:{tag}"), 0, -1)]


@fleet_task(app=app, shared=False, bind=True, limit="one", affinity="customer:{customer}")
def limited(self: FleetTask, customer: str, n: int, work_s: float = 0.05) -> dict[str, Any]:
    """Holds the fleet-wide slot of limit "one" (max_in_flight 1) while it runs: records
    how many run at once (``most``), where it ran, and from which queue."""
    queue = (self.request.delivery_info or {}).get("routing_key")
    now = _probe.incr(key("limited:now"))
    try:
        _probe.rpush(key("limited:most"), str(now))
        time.sleep(work_s)
    finally:
        _probe.decr(key("limited:now"))
    return {"worker": self.request.hostname, "queue": queue, "n": n}
