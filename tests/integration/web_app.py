"""The Celery app of the fleet page's browser test (test_web_browser.py), run by a real
`celery worker` and by `celery fleet web`.

Configured from environment variables set by the test (Redis, namespace, queue), so that
concurrent runs never share keys or queues.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from celery_fleet import Fleet, fleet_task

REDIS = os.environ.get("FLEET_WEB_REDIS", "redis://127.0.0.1:6379/10")
NAMESPACE = os.environ.get("FLEET_WEB_NS", "web")

app = Celery("fleet_web", broker=REDIS, backend=REDIS)
app.conf.update(
    fleet_redis_url=REDIS,
    fleet_namespace=NAMESPACE,
    fleet_limits={
        "model": {"rpm": 600, "max_in_flight": 3, "breaker": True},
        # a name with every punctuation a limit may have: shown as text, matched by selectors
        "embed/v3@eu+b.2": {"requests": "120/minute", "max_in_flight": 8, "adaptive": True},
    },
    task_default_queue=os.environ.get("FLEET_WEB_QUEUE", "fleet-web"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,  # the test watches the page, not results
)
fleet = Fleet(app)
_probe = redis.Redis.from_url(REDIS)


def key(name: str) -> str:
    return f"{NAMESPACE}:probe:{name}"


@fleet_task(app=app, shared=False, limit="model", max_wait=60)
def hold() -> int:
    """Holds a slot of "model" until the test pushes to ``release`` (two minutes at most)."""
    _probe.incr(key("held"))
    deadline = time.monotonic() + 120
    # Short blocks: a long one outlives the client's socket timeout.
    while time.monotonic() < deadline and not _probe.blpop([key("release")], timeout=2):
        pass
    return int(_probe.decr(key("held")))
