"""Celery signal handlers: per-process Redis connections and start-up validation.

- ``worker_process_init`` (prefork and solo children): drop every Fleet's Redis client,
  so no socket is shared with the parent across ``fork()``. The handler only forgets the
  client (the next call creates one lazily) because Celery kills a child whose init takes
  more than 4 s. Pools without this signal (threads, gevent) are covered by the pid check
  in :class:`~celery_fleet.store.RedisStore`.
- :func:`check_registered_tasks`: when ``Fleet(app)`` comes after the app finalized,
  every FleetTask's ``limit``/``tokens`` is checked at once (otherwise
  ``FleetTask.on_bound`` checks each as the app finalizes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.utils.dispatch import Signal

from .errors import ConfigError

if TYPE_CHECKING:
    from celery import Celery

    from .fleet import Fleet

__all__ = ["install", "check_registered_tasks", "breaker_state_changed", "breaker_announcer"]

#: Sent (in the process that saw it) when a limit's breaker opens, lets a probe through
#: (``half_open``) or closes: ``sender`` is the Fleet's app, with ``limit`` and ``state``.
breaker_state_changed = Signal(
    name="fleet_breaker_state_changed", providing_args={"limit", "state"}
)

log = logging.getLogger("celery_fleet")
_installed = False


def install() -> None:
    """Connect the handlers once per process (idempotent)."""
    global _installed
    if _installed:
        return
    signals.worker_process_init.connect(_reset_connections, weak=False)
    _installed = True


def _reset_connections(**_: Any) -> None:
    from .fleet import Fleet

    for fleet in Fleet.all():
        fleet.reset_connections()


def breaker_announcer(app: Celery) -> Callable[[str, str], None]:
    """A breaker listener that sends the Celery signal and a ``fleet-breaker`` event.

    The event goes to the broker's event exchange (Flower counts it in its ``/metrics``
    as ``flower_events_total{type="fleet-breaker"}``); failing to send it is logged and
    never breaks the call that changed the state.
    """

    def announce(limit: str, state: str) -> None:
        breaker_state_changed.send(sender=app, limit=limit, state=state)
        try:
            with app.events.default_dispatcher() as dispatcher:
                dispatcher.send("fleet-breaker", limit=limit, state=state)
        except Exception:
            log.warning("celery-fleet: could not send the fleet-breaker event", exc_info=True)

    return announce


def check_registered_tasks(app: Celery, fleet: Fleet) -> None:
    """Validate every FleetTask of ``app`` if it is already finalized, naming all bad ones.

    Tasks bound later are checked by ``FleetTask.on_bound`` as the app finalizes.
    """
    from .task import FleetTask

    if not app.finalized:
        return
    problems = []
    for task in list(app.tasks.values()):
        if isinstance(task, FleetTask):
            try:
                fleet.check_task_options(task.name, task.fleet_limit, task.fleet_tokens)
            except ConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
