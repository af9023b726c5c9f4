"""The Celery app of test_runtime_worker.py: a limit that the test changes at runtime.

Configured from the environment as fleet_app.py is (start_worker sets FLEET_IT_*).
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from celery_fleet import Fleet

BROKER = os.environ.get("FLEET_IT_BROKER", "redis://127.0.0.1:6379/10")

app = Celery("fleet_runtime_it", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_IT_REDIS", BROKER),
    fleet_namespace=os.environ.get("FLEET_IT_NS", "it"),
    fleet_limits={"rt": {"rpm": 6000, "max_in_flight": 2}},
    task_default_queue=os.environ.get("FLEET_IT_QUEUE", "fleet-it"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
fleet = Fleet(app)
# start_worker closes it afterwards (fleet_app.py's probe; nothing is recorded here)
_probe = redis.Redis.from_url(os.environ.get("FLEET_IT_REDIS", BROKER))


@app.task(shared=False)  # re-imported by every test: never in the shared registry
def applied() -> dict[str, Any]:
    """What this pool process applies of "rt" *before* it asks (what its poller loaded),
    then one ask, so that a process that never asked starts its poller."""
    seen = {
        "pid": os.getpid(),
        "cap": fleet.limits["rt"].max_in_flight,
        "rpm": fleet.limits["rt"].windows[0].declared,
        "version": fleet.admission.runtime.applied("rt").version,
    }
    decision = fleet.try_acquire("rt")
    if decision:
        fleet.release(decision)
    return seen
