"""The Celery app of the distribution benchmark (``benchmarks/distribution.py``): one task,
``work(customer_id, cost_s)``, that loads its customer once per worker process (a warm-up,
:class:`~benchmarks.harness.distribution.WarmCache`) and then sleeps its cost.

Configured from the environment (the benchmark sets it for its workers, and builds the same
app in its own process with :func:`make_app` to publish):

- ``DIST_URL``: the records' and the fleet's Redis (the benchmark's DB 13), and the broker
  unless ``DIST_BROKER`` names another (e.g. RabbitMQ);
- ``DIST_MODE``: ``shared`` | ``dedicated`` | ``steal`` (``app.conf.fleet_distribution``);
- ``DIST_QUEUES``, ``DIST_THRESHOLD``: ``fleet_affinity_queues``, ``fleet_steal_threshold``;
- ``DIST_WARMUP_S``: the warm-up a process pays the first time it sees a customer;
- ``DIST_RECORDS``: the Redis list each run appends to, one JSON record at the task's start
  (``ev`` "start") and one at its end (``ev`` "done": worker, warm, start, end).

When this celery_fleet has no ``fleet_distribution`` setting yet (issue 24 not merged), the
task is a plain ``app.task`` and only ``shared`` runs.

Run: ``DIST_ROLE=worker DIST_URL=redis://127.0.0.1:6379/13 celery -A
benchmarks.harness.distribution_app worker -P threads -c 2 -Q dist``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import redis
from celery import Celery

from benchmarks.harness.distribution import WarmCache
from celery_fleet import settings as fleet_settings

__all__ = ["FEATURE", "QUEUE", "make_app"]

#: The default queue every worker consumes (``-Q``); affinity queues come on top.
QUEUE = "dist"
#: True when this celery_fleet knows ``fleet_distribution`` (issue 24).
FEATURE = "fleet_distribution" in fleet_settings.SETTINGS

_cache = WarmCache()


@functools.lru_cache(maxsize=4)
def _client(url: str, pid: int) -> redis.Redis:
    return redis.Redis.from_url(url)


def make_app(
    mode: str,
    url: str,
    *,
    records: str = "dist:records",
    warmup_s: float = 0.1,
    queues: int = 32,
    threshold: int = 4,
    visibility_timeout_s: float = 5.0,
    broker: str | None = None,
) -> tuple[Celery, Any]:
    """The app and its ``work`` task for ``mode``: records and the fleet's state in the
    Redis ``url``, the broker ``broker`` (default: the same Redis).

    ``acks_late`` with ``task_reject_on_worker_lost``: a task cut by a SIGKILL goes back to
    its queue. The broker's ``visibility_timeout`` is short (tasks last under 2 s here) and
    the unacked sweep runs every second, so a dead worker's messages come back within the
    run rather than an hour later.
    """
    if mode != "shared" and not FEATURE:
        raise RuntimeError(f"mode {mode!r} needs issue 24 (fleet_distribution) in celery_fleet")
    app = Celery("dist", broker=broker or url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
    )

    def work(self: Any, customer_id: str, cost_s: float) -> None:
        request = self.request
        hostname = request.hostname or ""
        redelivered = bool((request.delivery_info or {}).get("redelivered"))
        client = _client(url, os.getpid())
        client.rpush(records, json.dumps({"ev": "start", "id": request.id, "worker": hostname}))
        start = time.monotonic()
        warm = _cache.enter(customer_id, warmup_s)
        time.sleep(cost_s)
        end = time.monotonic()
        record = {
            "ev": "done",
            "id": request.id,
            "customer": customer_id,
            "worker": hostname,
            "warm": warm,
            "start": start,
            "end": end,
            "redelivered": redelivered,
            "queue": (request.delivery_info or {}).get("routing_key"),
        }
        client.rpush(records, json.dumps(record))

    work.__module__ = __name__
    if not FEATURE:
        return app, app.task(bind=True, name=f"{__name__}.work")(work)

    from celery_fleet import Fleet, fleet_task

    app.conf.update(
        fleet_distribution=mode,
        fleet_affinity_queues=queues,
        fleet_steal_threshold=threshold,
        fleet_namespace="dist",
        fleet_redis_url=url,
        # nothing here reschedules; the fleet refuses a countdown the short visibility
        # timeout would cut (a redelivery before the countdown ends)
        fleet_max_countdown=visibility_timeout_s / 2,
    )
    Fleet(app)
    task = fleet_task(
        app=app, bind=True, name=f"{__name__}.work", affinity="customer:{customer_id}"
    )(work)
    return app, task


if os.environ.get("DIST_ROLE") == "worker":  # imported by `celery -A ... worker`
    app, work = make_app(
        os.environ.get("DIST_MODE", "shared"),
        os.environ["DIST_URL"],
        records=os.environ.get("DIST_RECORDS", "dist:records"),
        warmup_s=float(os.environ.get("DIST_WARMUP_S", "0.1")),
        queues=int(os.environ.get("DIST_QUEUES", "32")),
        threshold=int(os.environ.get("DIST_THRESHOLD", "4")),
        visibility_timeout_s=float(os.environ.get("DIST_VISIBILITY_S", "5")),
        broker=os.environ.get("DIST_BROKER") or None,
    )
