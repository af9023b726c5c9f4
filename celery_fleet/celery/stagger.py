"""Jitter at publish: staggered fan-out, per-task jitter and jitter in beat entry options.

Three ways to stop N messages becoming runnable in the same millisecond, all as
forward-only countdowns (an ETA the worker honours):

- :func:`stagger` (``fleet.stagger(signatures, over=30)``) and ``task.fan_out(items,
  over=30)``: N messages spread evenly over the window, each at a random point of its own
  share (:func:`~celery_fleet.admission.backoff.stagger_offsets`), so they arrive at a steady rate.
- ``@fleet_task(jitter=5)``: every first publish of the task gets a random countdown in
  ``[0, 5)``; reschedules and retries carry their own countdown and get none.
- ``"options": jitter_options(60)`` on a beat entry (any task, any scheduler, celery-redbeat
  included): ``apply_async(..., fleet_jitter=60)``, turned into a random countdown by a
  ``before_task_publish`` handler for tasks that are not FleetTasks.

The Redis and SQS brokers hand an unacknowledged message to another worker after
``visibility_timeout`` (1 h by default), and a message waiting for its ETA is
unacknowledged: a countdown longer than that runs the task twice. Windows that can exceed
it are logged as warnings (:func:`warn_if_beyond_visibility`).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.result import GroupResult
from celery.utils import uuid

from ..admission.backoff import stagger_offsets
from ..checks import MAX_SECONDS, number
from ..errors import ConfigError
from ..settings import visibility_timeout

if TYPE_CHECKING:
    from celery import Celery, Task

__all__ = [
    "JITTER_OPTION",
    "jitter_options",
    "stagger",
    "warn_if_beyond_visibility",
    "check_entry_options",
]

log = logging.getLogger("celery_fleet")

#: The publish option (``apply_async(..., fleet_jitter=seconds)``, a beat entry's options).
JITTER_OPTION = "fleet_jitter"

_warned: set[tuple[str, float]] = set()


def check_jitter(value: object, what: str) -> float:
    """A jitter or window in seconds: a finite number in ``[0, a year]``."""
    return number(value, what, lo=0.0, hi=MAX_SECONDS)


def jitter_options(max_delay: float, **options: Any) -> dict[str, Any]:
    """Beat entry (or ``apply_async``) options that delay the publish's run by a random
    countdown in ``[0, max_delay)``, validated now (:class:`~celery_fleet.ConfigError`).

    Example (celery-redbeat keeps it, being plain JSON)::

        "options": jitter_options(120, queue="agents")
    """
    return {**options, JITTER_OPTION: check_jitter(max_delay, "jitter_options(max_delay)")}


def warn_if_beyond_visibility(seconds: float, what: str, conf: Mapping[str, Any] | None) -> bool:
    """Log once per (what, seconds) when a countdown of ``seconds`` can outlast the broker's
    ``visibility_timeout``; returns whether it can."""
    limit = visibility_timeout(conf or {})
    if limit is None or seconds < limit:
        return False
    if (what, seconds) not in _warned:
        _warned.add((what, seconds))
        log.warning(
            "celery-fleet: %s can delay a task by %g s, not below the broker's "
            "visibility_timeout of %g s: the broker would deliver the waiting message again "
            "and the task would run twice. Shorten it or raise "
            "broker_transport_options['visibility_timeout'] (docs/jitter.md).",
            what,
            seconds,
            limit,
        )
    return True


def add_countdown(options: dict[str, Any], seconds: float) -> None:
    """Delay a publish by ``seconds`` more, forward of any ``eta`` or ``countdown`` it has."""
    if seconds <= 0:
        return
    eta = options.get("eta")
    if eta is not None:
        if isinstance(eta, str):
            eta = dt.datetime.fromisoformat(eta)
        options["eta"] = eta + dt.timedelta(seconds=seconds)
    else:
        options["countdown"] = float(options.get("countdown") or 0.0) + seconds


def stagger(
    signatures: Iterable[Any],
    over: float,
    *,
    seed: int | None = None,
    app: Celery | None = None,
) -> GroupResult:
    """Publish ``signatures`` with countdowns spread evenly over ``over`` seconds.

    Message ``i`` of ``n`` gets a countdown at a random point of ``[i, i+1) * over / n``
    (added to any countdown it already has), so the batch becomes runnable at a steady
    ``n / over`` per second instead of all at once. ``seed`` makes the countdowns
    reproducible. Everything is checked before the first publish: a bad ``over`` or an
    item that is not a signature raises :class:`~celery_fleet.ConfigError` and nothing is
    published. Returns a :class:`celery.result.GroupResult` of the published tasks.
    """
    window = check_jitter(over, "stagger(over=...)")
    sigs = list(signatures)
    for sig in sigs:
        if not hasattr(sig, "clone") or not hasattr(sig, "apply_async"):
            raise ConfigError(f"stagger() takes Celery signatures, got {sig!r}")
    app = app if app is not None else (sigs[0].app if sigs else None)
    if sigs:
        warn_if_beyond_visibility(window, "a stagger window", getattr(app, "conf", None))
    offsets = stagger_offsets(len(sigs), window, random.Random(seed))
    results = []
    for sig, off in zip(sigs, offsets, strict=True):
        opts = dict(sig.options)
        add_countdown(opts, off)
        results.append(sig.clone(**opts).apply_async())
    return GroupResult(uuid(), results, app=app)


def jitter_publish(options: dict[str, Any], task_jitter_s: float) -> None:
    """Apply a publish's jitter to its ``options`` in place (before anything is sent).

    A ``fleet_jitter`` option is validated (:class:`~celery_fleet.ConfigError`, nothing
    published) and becomes a random countdown; otherwise the task's own ``jitter`` does, on
    a first publish only: a reschedule (``fleet`` header) or a retry (``retries`` given)
    carries its own countdown.
    """
    if JITTER_OPTION in options:
        seconds = check_jitter(options.pop(JITTER_OPTION), JITTER_OPTION)
    elif task_jitter_s > 0 and "retries" not in options:
        headers = options.get("headers") or {}
        seconds = 0.0 if "fleet" in headers else task_jitter_s
    else:
        return
    add_countdown(options, random.uniform(0.0, seconds))


def fan_out_signatures(task: Task, items: Iterable[Any]) -> list[Any]:
    """One signature of ``task`` per item: a tuple is its positional arguments, a dict its
    keyword arguments, anything else its one argument."""
    sigs = []
    for item in items:
        if isinstance(item, tuple):
            sigs.append(task.signature(item))
        elif isinstance(item, dict):
            sigs.append(task.signature((), item))
        else:
            sigs.append(task.signature((item,)))
    return sigs


def check_entry_options(entries: Any, app: Celery | None) -> None:
    """At beat start: log an error for an entry whose ``fleet_jitter`` option is bad (its
    publishes would go out without jitter) and warn when one can outlast the broker's
    visibility timeout."""
    if not hasattr(entries, "items"):
        return
    for name, entry in list(entries.items()):
        options = getattr(entry, "options", None) or {}
        if JITTER_OPTION not in options:
            continue
        try:
            seconds = check_jitter(options[JITTER_OPTION], f"beat entry {name!r} {JITTER_OPTION}")
        except ConfigError as exc:
            log.error("celery-fleet: %s; its runs are published without jitter", exc)
            continue
        warn_if_beyond_visibility(seconds, f"beat entry {name!r}", getattr(app, "conf", None))


@signals.before_task_publish.connect(weak=False)  # type: ignore[untyped-decorator]
def _jitter_at_publish(
    sender: Any = None,
    headers: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Turn a ``fleet_jitter`` publish option (left in the message properties by Celery for
    tasks that are not FleetTasks) into an ETA: later than any ETA the message has."""
    if not properties or JITTER_OPTION not in properties:
        return
    raw = properties.pop(JITTER_OPTION)  # never sent on as a message property
    try:
        seconds = check_jitter(raw, f"{JITTER_OPTION} of {sender}")
    except ConfigError as exc:
        log.error("celery-fleet: %s; published without jitter", exc)
        return
    if headers is None or "eta" not in headers or seconds <= 0:
        return  # not a protocol 2 task message
    base = dt.datetime.now(dt.timezone.utc)
    if headers["eta"]:
        eta = dt.datetime.fromisoformat(headers["eta"])
        base = max(base, eta if eta.tzinfo else eta.replace(tzinfo=dt.timezone.utc))
    headers["eta"] = (base + dt.timedelta(seconds=random.uniform(0.0, seconds))).isoformat()
