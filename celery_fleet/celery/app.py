"""Binding a :class:`~celery_fleet.Fleet` to a Celery app: the one place they meet.

``Fleet(app)`` calls :func:`bind`, which does everything that needs the app: it remembers
the Fleet as the app's (:func:`fleet_for`), connects the worker signals that drop Redis
clients in each new child and check Redis once the worker is ready, validates the app's
fleet tasks, announces breaker changes as Celery signals and events, tells the
store-down policy the pool's concurrency, and tells the lease keeper which task takes each
slot (:func:`running_task`, for ``celery inspect fleet``). The facade itself imports no
Celery, so a plain process (a script, a FastAPI app) uses ``Fleet(redis_url=...)`` without
it.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from celery._state import get_current_task as _current_task

from ..admission.keeper import Holder
from ..errors import ConfigError
from ..store.urls import hide_url_password
from . import signals
from .stagger import stagger

if TYPE_CHECKING:
    from celery import Celery

    from ..fleet import Fleet

__all__ = ["bind", "fleet_for", "registered", "check_app_tasks", "running_task", "stagger"]

_by_app: weakref.WeakKeyDictionary[Any, Fleet] = weakref.WeakKeyDictionary()


def bind(fleet: Fleet, app: Celery, *, url_given: bool) -> None:
    """Make ``fleet`` the Fleet of ``app`` and wire it into the app's worker signals."""
    # The glue's own signal handlers (idempotency keys and stagger at publish, beat's
    # jitter, the deferred-task pump) connect when their modules load: load them all.
    from . import affinity, task  # noqa: F401

    affinity.install(app)  # the worker consumes the affinity queues it is home of

    if not url_given:
        hide_url_password(app.conf)  # the store keeps the real URL; app.conf shows none
    _by_app[app] = fleet
    fleet.local_concurrency = signals.pool_concurrency
    fleet.keeper.holder = running_task
    signals.install(_reset_all_connections)
    signals.at_worker_ready(_check_at_start)
    check_app_tasks(fleet, app)
    fleet.on_breaker_change(signals.breaker_announcer(app))
    fleet.on_quality_change(signals.quality_announcer(app))
    fleet.admission.watchers.append(signals.slot_watcher(app))


def running_task() -> Holder:
    """The task Celery runs in the calling thread (its id and name), or None.

    Celery keeps its current task per thread (per greenlet under gevent/eventlet), so this
    is right in a prefork child, in a thread of ``-P threads``, and in an async body run on
    the worker thread's loop; a thread that a task starts itself runs no task (None).

    Example: ``("5b1e9c0e-...", "proj.research")`` inside a worker's task."""
    # Called for every slot taken: the stacks themselves, not the proxies over them.
    task = _current_task()
    if task is None:
        return None
    request = task.request_stack.top
    return (request.id if request is not None else None) or None, str(task.name)


def fleet_for(app: Celery) -> Fleet:
    """The Fleet created for ``app``, or a new one built from ``app.conf``."""
    fleet = _by_app.get(app)
    if fleet is not None:
        return fleet
    from ..fleet import Fleet

    return Fleet(app)


def registered(app: Celery) -> Fleet | None:
    """The Fleet created for ``app``, if any (never creates one)."""
    return _by_app.get(app)


def check_app_tasks(fleet: Fleet, app: Celery) -> None:
    """Validate every fleet task of ``app`` if it is already finalized, naming all bad ones.

    Tasks bound later are checked by ``FleetTask.on_bound`` as the app finalizes.
    """
    if not app.finalized:
        return
    problems = []
    for task in list(app.tasks.values()):
        limit = getattr(task, "fleet_limit", None)
        tokens = getattr(task, "fleet_tokens", 0)
        try:
            fleet.check_task_options(task.name, limit, tokens)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))


def _check_at_start(app: Celery) -> None:
    """In a worker's main process, once ready: log each of its app's Fleets whose Redis
    does not answer (a wrong ``fleet_redis_url`` otherwise shows only as warnings)."""
    from ..fleet import Fleet

    for fleet in Fleet.all():
        if fleet.app is app:
            fleet.check_at_start()


def _reset_all_connections() -> None:
    """In a new worker child: every Fleet forgets the Redis client it inherited."""
    from ..fleet import Fleet

    for fleet in Fleet.all():
        fleet.reset_connections()
