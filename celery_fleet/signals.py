"""Celery signal handlers: per-process Redis connections and start-up validation.

- ``worker_process_init`` (prefork and solo children): drop every Fleet's Redis client,
  so no socket is shared with the parent across ``fork()``. The handler only forgets the
  client (the next call creates one lazily) because Celery kills a child whose init takes
  more than 4 s. Pools without this signal (threads, gevent) are covered by the pid check
  in :class:`~celery_fleet.store.RedisStore`.
- ``on_after_finalize``: every FleetTask's ``limit``/``tokens`` is checked against the
  Fleet's limits when the app finalizes, so a worker with a typo fails at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import signals

if TYPE_CHECKING:
    from celery import Celery

    from .fleet import Fleet

__all__ = ["install", "check_registered_tasks"]

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


def check_registered_tasks(app: Celery, fleet: Fleet) -> None:
    """Validate the FleetTasks of ``app`` now if it is finalized, else when it finalizes."""

    def check(*_: Any, **__: Any) -> None:
        from .task import FleetTask

        for task in list(app.tasks.values()):
            if isinstance(task, FleetTask):
                fleet.check_task_options(task.name, task.fleet_limit, task.fleet_tokens)

    if app.finalized:
        check()
    else:
        app.on_after_finalize.connect(check, weak=False)
