"""The Celery app of test_sdk_worker.py: fleet tasks calling a model through ``fleet.wrap``.

Configured from environment variables set by the test (broker, namespace, queue, the
simulator's URL). Each worker process makes its own client on first use, after the fork.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import anthropic
import redis
from celery import Celery

from celery_fleet import Fleet, FleetTask, fleet_task
from celery_fleet.celery.signals import task_rescheduled

BROKER = os.environ.get("FLEET_SDK_BROKER", "redis://127.0.0.1:6379/10")

app = Celery("fleet_sdk", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_SDK_REDIS", BROKER),
    fleet_namespace=os.environ.get("FLEET_SDK_NS", "sdk"),
    # what the simulated provider allows (test_sdk_worker.py starts it with the same)
    fleet_limits={"claude": {"rpm": 600, "tpm": 200_000, "max_in_flight": 3}},
    task_default_queue=os.environ.get("FLEET_SDK_QUEUE", "fleet-sdk"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
fleet = Fleet(app)
_probe = redis.Redis.from_url(app.conf.fleet_redis_url)
RESCHEDULES = f"{app.conf.fleet_namespace}:probe:reschedules"


@task_rescheduled.connect
def _count_reschedule(sender: Any = None, **_: Any) -> None:
    _probe.incr(RESCHEDULES)


@cache
def client() -> Any:
    """The process's wrapped client (made after the fork, once), the SDK's default retries
    left on: wrap() turns them off for model calls."""
    raw = anthropic.Anthropic(base_url=os.environ["FLEET_SDK_SIM"], api_key="x")
    return fleet.wrap(raw, limit="claude")


@fleet_task(app=app, shared=False, bind=True)
def summarise(self: FleetTask, topic: str, steps: int = 2) -> dict[str, Any]:
    """An agent of ``steps`` model calls, each through the wrapped client."""
    used = 0
    for step in range(steps):
        message = client().messages.create(
            model="sim",
            max_tokens=120,
            messages=[{"role": "user", "content": f"step {step} of {topic}"}],
        )
        used += message.usage.input_tokens + message.usage.output_tokens
    return {"used": used, "retries": self.request.retries}
