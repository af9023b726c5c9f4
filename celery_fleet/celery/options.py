"""The options of ``@fleet_task``: their names, and their checks at decoration.

``@fleet_task(limit=..., tokens=...)`` takes Celery's task options plus the fleet's
(:data:`FLEET_OPTIONS`, each stored on the task class as a ``fleet_*`` attribute). The fleet's
are checked here, once, when the decorator runs, so a bad value fails at import rather than
in a worker; an unknown option is refused by name (:func:`known_options`).
"""

from __future__ import annotations

from typing import Any

from celery import Task

from ..checks import MAX_SECONDS, MAX_UNITS, check_max_wait, number
from ..errors import ConfigError
from . import affinity, idempotency
from .lanes import check_lane_spec

__all__ = ["ON_LIMIT", "FLEET_OPTIONS", "check_fleet_options", "known_options"]

#: What a task does when admission is refused for longer than ``max_wait``.
ON_LIMIT = ("reschedule", "wait", "fail")

#: Each option of the decorator and the task attribute it sets.
FLEET_OPTIONS = {
    "limit": "fleet_limit",
    "tokens": "fleet_tokens",
    "max_wait": "fleet_max_wait",
    "on_limit": "fleet_on_limit",
    "wait_after_call": "fleet_wait_after_call",
    "max_reschedules": "fleet_max_reschedules",
    "max_throttled": "fleet_max_throttled",
    "jitter": "fleet_jitter",
    "idempotency_key": "fleet_idempotency_key",
    "key": "fleet_key",
    "singleton": "fleet_singleton",
    "release_on_failure": "fleet_release_on_failure",
    "lane": "fleet_lane",
    "affinity": "fleet_affinity",
}


# Options of @app.task / @shared_task that are not attributes of celery.Task.
_DECORATOR_OPTIONS = frozenset(
    {
        "name",
        "base",
        "bind",
        "shared",
        "lazy",
        "filter",
        "app",
        "autoretry_for",
        "dont_autoretry_for",
        "retry_kwargs",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "pydantic",
        "pydantic_strict",
        "pydantic_context",
        "pydantic_dump_kwargs",
        "queue",
        "routing_key",
        "exchange",
        "exchange_type",
        "compression",
        "delivery_mode",
        "store_eager_result",
    }
)


def known_options(base: type[Task]) -> frozenset[str]:
    """The options a decorator with base ``base`` takes besides the fleet's: the public
    attributes of the task class and those of Celery's decorator."""
    attrs = {k for k in dir(base) if not k.startswith("_")}
    return frozenset(attrs | _DECORATOR_OPTIONS)


def check_fleet_options(opts: dict[str, Any]) -> None:
    """Check the fleet's options (keyed by task attribute) of one decoration, turning
    callables into static methods and jitter into a float, in place."""
    on_limit = opts.get("fleet_on_limit", "reschedule")
    if on_limit not in ON_LIMIT:
        raise ConfigError(f"on_limit must be one of {ON_LIMIT}, got {on_limit!r}")
    tokens = opts.get("fleet_tokens", 0)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ConfigError(f"tokens must be a non-negative int, got {tokens!r}")
    if tokens > MAX_UNITS:  # no bucket holds more: fail at decoration, not at publish
        raise ConfigError(f"tokens must be at most {MAX_UNITS}, got a {len(str(tokens))}-digit int")
    if opts.get("fleet_max_wait") is not None:
        check_max_wait(opts["fleet_max_wait"])
    if not isinstance(opts.get("fleet_wait_after_call", True), bool):
        raise ConfigError(
            f"wait_after_call must be True or False, got {opts['fleet_wait_after_call']!r}"
        )
    count = opts.get("fleet_max_reschedules")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ConfigError(f"max_reschedules must be a non-negative int or None, got {count!r}")
    if opts.get("fleet_max_throttled") is not None:
        number(opts["fleet_max_throttled"], "max_throttled", lo=0.0, hi=MAX_SECONDS)
    if "fleet_jitter" in opts:
        opts["fleet_jitter"] = number(opts["fleet_jitter"], "jitter", lo=0.0, hi=MAX_SECONDS)
    if "fleet_key" in opts:
        spec = idempotency.check_key_spec(opts["fleet_key"], "key")
        opts["fleet_key"] = staticmethod(spec) if callable(spec) else spec
    if "fleet_idempotency_key" in opts:
        spec = idempotency.check_key_spec(opts["fleet_idempotency_key"])
        # a class attribute: a plain function would come back bound to the task
        opts["fleet_idempotency_key"] = staticmethod(spec) if callable(spec) else spec
    for flag in ("fleet_singleton", "fleet_release_on_failure"):
        if not isinstance(opts.get(flag, True), bool):
            raise ConfigError(f"{flag.removeprefix('fleet_')} must be True or False")
    if opts.get("fleet_singleton") and not opts.get("fleet_idempotency_key"):
        raise ConfigError("singleton=True needs an idempotency_key: the key is the lock")
    limit = opts.get("fleet_limit")
    if limit is not None and not isinstance(limit, str):
        raise ConfigError(f"limit must be the name of a limit in fleet_limits, got {limit!r}")
    if opts.get("fleet_affinity") is not None:
        spec = affinity.check_affinity_spec(opts["fleet_affinity"])
        opts["fleet_affinity"] = staticmethod(spec) if callable(spec) else spec
    if opts.get("fleet_lane") is not None:
        spec = check_lane_spec(opts["fleet_lane"])
        if limit is None:
            raise ConfigError(f"lane={spec!r} needs a limit= (the limit whose lanes it names)")
        opts["fleet_lane"] = staticmethod(spec) if callable(spec) else spec
