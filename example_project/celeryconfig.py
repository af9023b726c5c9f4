"""Celery settings of the example fleet, including its ``fleet_limits``.

Environment variables (all optional) let the demo and the benchmarks (``benchmarks/harness/``)
point the same project at their own Redis, queue and simulated provider:

- ``REDIS_URL``: Redis for broker, results and fleet state (default 127.0.0.1:6379)
- ``EXAMPLE_DB``: the Redis DB number (default 11)
- ``EXAMPLE_QUEUE``: the queue the tasks go to (default ``example``)
- ``EXAMPLE_NAMESPACE``: the fleet's key namespace (default ``example``)
- ``MODEL_RPM``, ``MODEL_TPM``, ``MODEL_MAX_IN_FLIGHT``: the provider's budget (``0``: the
  model limit has no such budget)
- ``MODEL_BURST``, ``MODEL_HEADROOM``: the model limit's ``burst`` (default 1.0) and
  ``headroom`` (default 0)
- ``MODEL_ADAPTIVE``: ``1`` makes the model limit adaptive (default ``0``);
  ``MODEL_BREAKER_RESET``: its breaker's ``reset_timeout`` in seconds (default 10)
- ``EXAMPLE_MAX_WAIT``: ``fleet_max_wait``, seconds a slot waits in place (default 30)
"""

import os

from celery.schedules import crontab

from celery_fleet import jittered

_redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
_redis = _redis.rsplit("/", 1)[0] if _redis.count("/") > 2 else _redis
_url = f"{_redis}/{os.environ.get('EXAMPLE_DB', '11')}"


def _budget(name: str, default: str) -> int | None:
    """An integer budget from the environment; 0 means the limit has none of that kind."""
    return int(os.environ.get(name, default)) or None


broker_url = _url
result_backend = _url
task_default_queue = os.environ.get("EXAMPLE_QUEUE", "example")
# Delivery: at-least-once. A task is acknowledged when it ends, and one whose worker process
# died (SIGKILL, OOM, hard time limit) goes back to the queue: an agent whose process is
# killed runs again under the same task id, and its durable steps (``self.step`` in
# tasks.py) return what they had stored, so only the step cut short is paid for again. (To
# run a unit of work once however often it is published, give its task an idempotency
# key: ``@fleet_task(idempotency_key=...)``.) The alternative, at-most-once (both
# settings False), loses the agent instead.
# task_acks_late alone does neither: a killed child's task is marked FAILED and acked.
task_acks_late = True
task_reject_on_worker_lost = True
# With the Redis broker an unacknowledged message (a running agent, or a rescheduled one
# waiting for its countdown) goes to another worker after visibility_timeout. It must be
# longer than the longest agent run AND than fleet_max_countdown (Fleet(app) refuses a
# countdown that is not below it), and it is also how long the tasks held by a worker that
# died as a whole (SIGKILL of the main process) wait before another worker gets them.
broker_transport_options = {"visibility_timeout": 900}
worker_prefetch_multiplier = 1  # agents are long: do not hoard them in one process
result_expires = 3600
broker_connection_retry_on_startup = True
imports = ("example_project.tasks",)

# -- celery-fleet --------------------------------------------------------------------------
fleet_redis_url = _url
fleet_namespace = os.environ.get("EXAMPLE_NAMESPACE", "example")
fleet_max_countdown = 300  # the longest reschedule countdown: below visibility_timeout
fleet_max_wait = float(os.environ.get("EXAMPLE_MAX_WAIT", "30"))  # then a task reschedules
fleet_limits = {
    # The model provider: its published budget, all workers together.
    "model": {
        "rpm": int(os.environ.get("MODEL_RPM", "600")),
        "tpm": _budget("MODEL_TPM", "90000"),
        "max_in_flight": _budget("MODEL_MAX_IN_FLIGHT", "8"),
        # The provider (the simulator, like OpenAI and Anthropic) refills a token bucket that
        # holds a whole minute, so the fleet may use all of it at once. The default, 0.1,
        # suits providers that count a sliding window or enforce in short slices (Azure).
        "burst": float(os.environ.get("MODEL_BURST", "1.0")),
        "headroom": float(os.environ.get("MODEL_HEADROOM", "0")),
        # Find the provider's real concurrency by AIMD (MODEL_ADAPTIVE=1 turns it on).
        "adaptive": os.environ.get("MODEL_ADAPTIVE", "0") == "1",
        # Stop calling a failing provider fleet-wide; one probe after reset_timeout.
        "breaker": {
            "failure_rate": 0.5,
            "min_calls": 10,
            "window": 30,
            "reset_timeout": float(os.environ.get("MODEL_BREAKER_RESET", "10")),
        },
        "validate": "example_project.model.has_content",
    },
    # A search API the agents use as a tool, with a budget of its own.
    "search-api": {"rate": "600/minute", "max_in_flight": 4, "burst": 1.0},
}

# -- beat ----------------------------------------------------------------------------------
# Jittered: every night at 02:00 plus a fixed offset in [0, 10 min) for this entry (the same
# after a beat restart), so entries added on the same crontab do not fire together.
beat_schedule = {
    "nightly-research-batch": {
        "task": "example_project.tasks.nightly_batch",
        "schedule": jittered(crontab(hour=2, minute=0), max_delay=600),
        "kwargs": {"topics": ["rate limiting", "circuit breakers", "token buckets"]},
    },
}
