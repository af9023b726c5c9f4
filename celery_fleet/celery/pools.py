"""Refuse ``async def`` fleet task bodies on a green pool (gevent, eventlet) at worker start.

An ``async def`` body decorated with ``@fleet_task`` runs on the worker thread's own event
loop (:func:`celery_fleet.celery.loops.run_async`). Under ``-P gevent`` or ``-P eventlet`` every
task is a greenlet on one OS thread: while one task's loop waits on I/O the hub switches to
another greenlet, whose task finds that loop running and fails with ``run_async() called
inside a running event loop``. The first task succeeds, which hides it until load. So a
worker with such a pool and such tasks refuses to start, naming both.

Example::

    $ celery -A proj worker -P gevent
    celery_fleet.errors.ConfigError: celery-fleet: async task bodies cannot run on the
    'gevent' pool ...: proj.research. Use -P prefork or -P threads, ...
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from ..errors import ConfigError

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["GreenPoolCheck", "async_tasks", "check_pool", "install"]


def async_tasks(app: Celery) -> list[str]:
    """The names of ``app``'s tasks whose body is an ``async def`` (wrapped or not)."""
    names = []
    for name, task in sorted(app.tasks.items()):
        run = getattr(task, "run", None)
        if run is None:
            continue
        try:
            body = inspect.unwrap(run)
        except ValueError:  # a cycle of __wrapped__
            continue
        if inspect.iscoroutinefunction(body) or inspect.iscoroutinefunction(run):
            names.append(name)
    return names


def check_pool(app: Celery, pool_cls: Any) -> None:
    """Raise :class:`~celery_fleet.ConfigError` when ``pool_cls`` is green (gevent,
    eventlet) and ``app`` has async task bodies."""
    if not getattr(pool_cls, "is_green", False):
        return
    names = async_tasks(app)
    if not names:
        return
    pool = str(getattr(pool_cls, "__module__", pool_cls)).rsplit(".", 1)[-1]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    raise ConfigError(
        f"celery-fleet: async task bodies cannot run on the {pool!r} pool (its greenlets "
        f"share one thread and one event loop, so a second task at once fails with 'run_async()"
        f" called inside a running event loop'): {shown}. Use -P prefork or -P threads, or "
        f"make these bodies plain functions using the blocking API (fleet.slot)"
    )


class GreenPoolCheck(bootsteps.Step):  # type: ignore[misc]
    """Worker bootstep: :func:`check_pool` as the worker is built (the pool class is known,
    the task modules are imported, nothing has started yet)."""

    label = "celery-fleet pool check"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        check_pool(worker.app, getattr(worker, "pool_cls", None))


def install(app: Celery) -> None:
    """Add :class:`GreenPoolCheck` to ``app``'s worker blueprint (idempotent)."""
    app.steps["worker"].add(GreenPoolCheck)
