"""The Celery app an integration test's workers run, configured from the test's environment.

:func:`env_app` reads ``{prefix}_BROKER`` (broker and results), ``{prefix}_REDIS`` (the
fleet's Redis, default the broker), ``{prefix}_NS`` and ``{prefix}_QUEUE``, which
:func:`tests.integration.workers.celery_workers` sets per run, so concurrent runs never
share keys or queues; the worker settings every such app wants come with it.

Example::

    app = env_app("fleet_sdk", "FLEET_SDK", "sdk", {"claude": {"max_in_flight": 3}})
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

__all__ = ["env_app"]


def env_app(main: str, prefix: str, namespace: str, limits: dict[str, Any], **conf: Any) -> Celery:
    """A Celery app named ``main`` with ``fleet_limits=limits``, its broker, fleet Redis,
    namespace (default ``namespace``) and queue (default ``fleet-{namespace}``) from the
    ``prefix`` environment variables; ``conf`` adds settings."""
    broker = os.environ.get(f"{prefix}_BROKER", "redis://127.0.0.1:6379/10")
    app = Celery(main, broker=broker, backend=broker)
    app.conf.update(
        fleet_redis_url=os.environ.get(f"{prefix}_REDIS", broker),
        fleet_namespace=os.environ.get(f"{prefix}_NS", namespace),
        fleet_limits=limits,
        task_default_queue=os.environ.get(f"{prefix}_QUEUE", f"fleet-{namespace}"),
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        result_expires=600,
        **conf,
    )
    return app
