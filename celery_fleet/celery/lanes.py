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

import inspect
import string
from collections.abc import Callable
from typing import Any

from ..checks import check_name
from ..errors import ConfigError

__all__ = ["LaneSpec", "check_lane_spec", "fixed_lane", "lane_of"]

#: A task's lane option: a lane name, a template over its arguments, a callable, or None.
LaneSpec = str | Callable[..., Any] | None


def check_lane_spec(spec: object) -> LaneSpec:
    """At decoration: a lane name, a template (its fields parsed now), a callable, or None."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str) and "{" in spec:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(spec) if f is not None]
        except ValueError as exc:
            raise ConfigError(f"lane template {spec!r} is malformed: {exc}") from None
        if any(f == "" or f.isdigit() for f in fields):
            raise ConfigError(
                f"lane template {spec!r}: name the arguments ({{tier}}), "
                "positional fields cannot be matched to keyword arguments"
            )
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
    assert isinstance(spec, str)
    try:
        bound = inspect.signature(fun).bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"lane {spec!r}: the arguments do not fit: {exc}") from None
    bound.apply_defaults()
    fields = {k: v for k, v in bound.arguments.items() if k != "self"}
    try:
        return spec.format(**fields)
    except (KeyError, IndexError, AttributeError) as exc:
        raise ConfigError(
            f"lane {spec!r} names {exc} which is not an argument of the task "
            f"(arguments: {sorted(fields)})"
        ) from None
