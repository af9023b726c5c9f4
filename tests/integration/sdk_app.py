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

from celery_fleet import Fleet, FleetTask, fleet_task
from celery_fleet.celery.signals import task_rescheduled
from tests.integration.apps import env_app

# what the simulated provider allows (test_sdk_worker.py starts it with the same)
app = env_app(
    "fleet_sdk", "FLEET_SDK", "sdk", {"claude": {"rpm": 600, "tpm": 200_000, "max_in_flight": 3}}
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
