"""A task's priority lane: ``@fleet_task(limit="openai", lane=...)``.

``lane`` is one of three things, bound like ``idempotency_key``
(:mod:`celery_fleet.celery.idempotency`):

- a lane name (``"batch"``): checked against the limit's lanes at decoration (when the
  app's Fleet exists), when the app finalizes and at publish;
- a template over the task's arguments (``"{tier}"``): the lane of each call, checked
  at publish, so an unknown lane is a :class:`~celery_fleet.errors.ConfigError` raised by
  ``delay()`` rather than a failed task;
- a callable taking the task's arguments and returning a lane name (or None: the limit's
  lowest lane).

The lane is computed again from the same arguments when the task runs, so a rescheduled
task (same arguments, same ``since_ms`` header) keeps its lane and its place in line.

Example::

    @fleet_task(limit="openai", lane=lambda user_id, interactive=False:
                "interactive" if interactive else "batch")
    def answer(user_id, interactive=False): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..checks import check_name
from ..errors import ConfigError
from .idempotency import check_key_spec, key_of

__all__ = ["LaneSpec", "check_lane_spec", "fixed_lane", "lane_of"]

#: A task's lane option: a lane name, a template over its arguments, a callable, or None.
LaneSpec = str | Callable[..., Any] | None


def check_lane_spec(spec: object) -> LaneSpec:
    """At decoration: a lane name, a template (its fields parsed now), a callable, or None."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str) and "{" in spec:
        check_key_spec(spec, "lane")  # a template: checked as idempotency_key's are
        return spec
    if isinstance(spec, str):
        return check_name(spec, "lane", colon=False)
    raise ConfigError(
        f"lane must be a lane name ('batch'), a template over the task's arguments "
        f"('{{tier}}') or a callable taking them, got {spec!r}"
    )


def fixed_lane(spec: LaneSpec) -> str | None:
    """The lane name of a spec that names one (checkable before any call), else None."""
    return spec if isinstance(spec, str) and "{" not in spec else None


def lane_of(spec: LaneSpec, fun: Callable[..., Any], args: Any, kwargs: Any) -> str | None:
    """The lane of one call: ``spec`` applied to the arguments bound to ``fun``'s signature
    (None: the limit's lowest lane). :class:`ConfigError` when it cannot be computed; the
    lane itself is checked against the limit by the slot (or at publish)."""
    if spec is None or fixed_lane(spec) is not None:
        return fixed_lane(spec)
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    if callable(spec):
        try:
            lane = spec(*args, **kwargs)
        except Exception as exc:
            raise ConfigError(f"the lane callable raised {exc!r}") from exc
        if lane is not None and not isinstance(lane, str):
            raise ConfigError(f"the lane callable must return a str, got {type(lane).__name__}")
        return lane
    return key_of(spec, fun, args, kwargs, what="lane", check=str)
