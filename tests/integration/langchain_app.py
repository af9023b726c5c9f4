"""A Celery app whose fleet task asks a real ChatOpenAI through ``with_fleet``.

Run in real ``celery worker`` processes by tests/integration/test_langchain_worker.py,
configured from the environment it sets: broker, fleet namespace, queue, the simulator's
URL. Each pool process builds its model on first use (after the fork).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from celery import Celery
from langchain_openai import ChatOpenAI

from celery_fleet import Fleet, fleet_task
from celery_fleet.contrib.langchain import with_fleet

BROKER = os.environ.get("FLEET_LC_BROKER", "redis://127.0.0.1:6379/10")

app = Celery("fleet_lc", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_namespace=os.environ.get("FLEET_LC_NS", "lc"),
    fleet_limits={"openai": {"max_in_flight": 3}},
    task_default_queue=os.environ.get("FLEET_LC_QUEUE", "fleet-lc"),
    worker_prefetch_multiplier=1,
)
fleet = Fleet(app)


@cache
def model() -> Any:
    chat = ChatOpenAI(
        model="sim",
        base_url=os.environ["FLEET_LC_SIM"],
        api_key="x",
        max_retries=0,
        max_tokens=64,
    )
    return with_fleet(chat, fleet, "openai")


@fleet_task(app=app, shared=False)  # re-imported by every test
def ask(question: str) -> int:
    """One model call; returns the tokens the provider reported."""
    reply = model().invoke(question)
    return int(reply.usage_metadata["total_tokens"])
