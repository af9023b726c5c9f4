"""A Celery app with an ``async def`` fleet task, for tests/integration/test_green_pool.py.

Configured from the environment (broker, fleet Redis, namespace, queue) by the test.
"""

from __future__ import annotations

import asyncio
import os

from celery import Celery

from celery_fleet import Fleet, fleet_task

BROKER = os.environ.get("FLEET_IT_BROKER", "redis://127.0.0.1:6379/10")

app = Celery("fleet_green", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_IT_REDIS", BROKER),
    fleet_namespace=os.environ.get("FLEET_IT_NS", "green"),
    fleet_limits={"model": {"max_in_flight": 10}},
    task_default_queue=os.environ.get("FLEET_IT_QUEUE", "fleet-green"),
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
fleet = Fleet(app)


@fleet_task(app=app, shared=False)
async def research(n: int) -> int:
    """An async agent body: holds a slot across an await, as an LLM call would."""
    async with fleet.aslot("model"):
        await asyncio.sleep(0.3)
    return n
