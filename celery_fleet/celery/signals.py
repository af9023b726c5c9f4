"""Celery signals: per-process Redis connections and breaker announcements.

- ``worker_process_shutdown`` (a prefork child leaving with ``os._exit``): write what its
  Redis wires hold (a slot's release rides with the next call; store/combiner.py).
- ``worker_process_init`` (prefork and solo children): run the callback :func:`install`
  was given (the Fleet drops every Redis client, so no socket is shared with the parent
  across ``fork()``). It must only forget clients (the next call creates one lazily)
  because Celery kills a child whose init takes more than 4 s. Pools without this signal
  (threads, gevent) are covered by the pid check in :class:`~celery_fleet.store.sync.RedisStore`.
- ``worker_ready`` (the worker's main process): run the callbacks :func:`at_worker_ready`
  was given with the app (the Fleet checks its Redis once and logs an error naming the URL
  when it does not answer: a wrong ``fleet_redis_url`` should not look like a working
  worker).
- :data:`breaker_state_changed` and the ``fleet-breaker`` event, sent by
  :func:`breaker_announcer` when this process sees a breaker change; the
  ``fleet-quality`` event, sent by :func:`quality_announcer` when it sees a quality
  breaker change.

This module imports nothing of the package's glue (``fleet``, ``task``): they import it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.utils.dispatch import Signal

from ..logfields import log_fields

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "install",
    "at_worker_ready",
    "pool_concurrency",
    "breaker_state_changed",
    "breaker_announcer",
    "quality_announcer",
    "slot_admitted",
    "slot_refused",
    "slot_watcher",
    "sends_task_events",
    "task_rescheduled",
    "task_throttled",
]

#: Sent (in the process that saw it) when a limit's breaker opens, lets a probe through
#: (``half_open``) or closes: ``sender`` is the Fleet's app, with ``limit`` and ``state``.
breaker_state_changed = Signal(
    name="fleet_breaker_state_changed", providing_args={"limit", "state"}
)

#: Sent in the worker when a FleetTask is rescheduled by backpressure (its copy already
#: published): ``sender`` is the task, with ``request``, ``exc`` (the refusal),
#: ``countdown`` (s) and ``reschedules`` (the count including this one). A reschedule is
#: not a Celery retry: ``on_retry`` and ``task_retry`` do not fire for it.
task_rescheduled = Signal(
    name="fleet_task_rescheduled", providing_args={"request", "exc", "countdown", "reschedules"}
)

#: Sent (in the process of the slot) when a slot is admitted: ``sender`` is the Fleet's
#: app, with ``limit``, ``waited_s`` (in line) and ``attempts`` (asks). For your metrics.
slot_admitted = Signal(name="fleet_slot_admitted", providing_args={"limit", "waited_s", "attempts"})

#: Sent when a slot gives up (``Throttled``/``CircuitOpen`` raised: ``reason`` is the
#: refusal's, e.g. ``in_flight``, ``requests/60s``, ``circuit_open``) or the provider pushed
#: back on its call (``reason`` ``provider 429``/``provider 503``): ``sender`` is the app,
#: with ``limit``, ``reason`` and ``wait_ms``.
slot_refused = Signal(name="fleet_slot_refused", providing_args={"limit", "reason", "wait_ms"})

#: Sent in the worker when backpressure reaches a FleetTask, before it decides: ``sender``
#: is the task, with ``request``, ``exc`` and ``action`` (``"reschedule"``, ``"wait"``
#: (eager: sleeps in place) or ``"fail"``).
task_throttled = Signal(name="fleet_task_throttled", providing_args={"request", "exc", "action"})

log = logging.getLogger("celery_fleet")
_on_process_init: list[Callable[[], None]] = []


#: The worker's node name (``-n``), noted in its main process at start-up and inherited by
#: its pool's children, so events they send name the worker, not ``gen<pid>@host``.
_node: list[str | None] = [None]


#: Whether this worker sends task events (``-E``), noted the same way.
_task_events = [False]

#: The worker's pool concurrency (``-c``), noted the same way (0: not a worker).
_concurrency = [0]

_on_worker_ready: list[Callable[[Any], None]] = []


@signals.worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _note_worker(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None)
    _node[0] = hostname if isinstance(hostname, str) else None
    _task_events[0] = bool(getattr(sender, "task_events", False))
    concurrency = getattr(sender, "concurrency", 0)
    _concurrency[0] = concurrency if isinstance(concurrency, int) else 0


def pool_concurrency() -> int:
    """This worker's pool concurrency (0 outside a worker): at least that many processes
    or threads share the fleet's budgets here."""
    return _concurrency[0]


def at_worker_ready(callback: Callable[[Any], None]) -> None:
    """Call ``callback(app)`` in the worker's main process once it is ready (idempotent)."""
    if not _on_worker_ready:
        signals.worker_ready.connect(_worker_ready, weak=False)
    if callback not in _on_worker_ready:
        _on_worker_ready.append(callback)


def _worker_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    for callback in list(_on_worker_ready):
        try:
            callback(app)
        except Exception:  # a check must never stop the worker
            log.exception("celery-fleet: the worker-start check failed")


def sends_task_events(app: Celery) -> bool:
    """Whether task events are on here: a worker started with ``-E``, or
    ``worker_send_task_events``. ``Task.send_event`` publishes whatever the settings say,
    a broker round trip (~0.6 ms) nobody reads when they are off."""
    return _task_events[0] or bool(app.conf.worker_send_task_events)


def install(on_process_init: Callable[[], None]) -> None:
    """Call ``on_process_init()`` in every new worker child (idempotent per callback); and
    write what the child's Redis wires hold as it exits."""
    if not _on_process_init:
        signals.worker_process_init.connect(_process_init, weak=False)
        signals.worker_process_shutdown.connect(_process_shutdown, weak=False)
    if on_process_init not in _on_process_init:
        _on_process_init.append(on_process_init)


def _process_init(**_: Any) -> None:
    for callback in list(_on_process_init):
        callback()


def _process_shutdown(**_: Any) -> None:
    """A prefork child leaves with ``os._exit``, past ``atexit``: a slot's release held for
    the next call (store/combiner.py) is written now, not left to expire with its lease."""
    from ..store.combiner import flush_all

    try:
        flush_all()
    except Exception:  # never in the way of the child's exit
        log.warning("celery-fleet: writing held releases at exit failed", exc_info=True)


def breaker_announcer(app: Celery) -> Callable[[str, str], None]:
    """A breaker listener that sends the Celery signal and a ``fleet-breaker`` event.

    The event goes to the broker's event exchange, where any event receiver sees it
    (``app.events.Receiver``, as ``BreakerEvents`` in ``benchmarks/harness/herd.py`` does).
    Flower 2.x receives it but shows nothing of it: its ``/metrics`` counts ``task-*`` events
    only (``flower/events.py``, 2.2.0). Failing to send it is logged and never breaks the call
    that changed the state.
    """

    def announce(limit: str, state: str) -> None:
        log.warning(
            "celery-fleet: breaker limit=%s state=%s",
            limit,
            state,
            extra=log_fields(limit=limit, state=state),
        )
        breaker_state_changed.send(sender=app, limit=limit, state=state)
        try:
            # Under the worker's node name (a pool child would say gen<pid>@host).
            with app.events.default_dispatcher(hostname=_node[0]) as dispatcher:
                dispatcher.send("fleet-breaker", limit=limit, state=state)
        except Exception:
            log.warning("celery-fleet: could not send the fleet-breaker event", exc_info=True)

    return announce


def quality_announcer(app: Celery) -> Callable[[str, str, dict[str, Any]], None]:
    """A quality listener that logs the change and sends a ``fleet-quality`` event
    (``limit``, ``state``, ``garbage_rate``, ``baseline``, ``calls``, ``garbage``,
    ``reasons``) to the broker's event exchange, as :func:`breaker_announcer` does."""

    def announce(limit: str, state: str, fields: dict[str, Any]) -> None:
        log.warning(
            "celery-fleet: quality limit=%s state=%s garbage_rate=%s baseline=%s",
            limit,
            state,
            fields.get("garbage_rate"),
            fields.get("baseline"),
            extra=log_fields(limit=limit, state=state),
        )
        info = {k: v for k, v in fields.items() if k != "state"}
        try:
            with app.events.default_dispatcher(hostname=_node[0]) as dispatcher:
                dispatcher.send("fleet-quality", limit=limit, state=state, **info)
        except Exception:
            log.warning("celery-fleet: could not send the fleet-quality event", exc_info=True)

    return announce


def slot_watcher(app: Celery) -> Callable[[str, str, dict[str, Any]], None]:
    """A slot watcher (``Admission.watchers``) that sends :data:`slot_admitted` and
    :data:`slot_refused`, and logs one line when the provider pushes back (its pause)."""

    def watch(event: str, limit: str, fields: dict[str, Any]) -> None:
        if event == "admitted":
            if slot_admitted.receivers:
                slot_admitted.send(sender=app, limit=limit, **fields)
            return
        if event not in ("refused", "pushback"):  # "waited": the tracing watcher's
            return
        if event == "pushback":
            log.warning(
                "celery-fleet: pause limit=%s status=%s retry_after_ms=%d",
                limit,
                fields["status"],
                fields["retry_after_ms"],
                extra=log_fields(
                    limit=limit,
                    reason=f"provider {fields['status']}",
                    wait_ms=fields["retry_after_ms"],
                ),
            )
            fields = {"reason": f"provider {fields['status']}", "wait_ms": fields["retry_after_ms"]}
        if slot_refused.receivers:
            slot_refused.send(sender=app, limit=limit, **fields)

    return watch
