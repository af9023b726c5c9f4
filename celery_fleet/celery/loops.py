"""An async agent body inside a sync Celery task: one event loop per worker thread.

Celery runs a task's body as a plain call; it does not await a coroutine. ``asyncio.run``
in every task would make a new loop per call, and with it new Redis connections (a
``redis.asyncio`` client belongs to the loop it first ran in), new HTTP pools for the
model's client, and a teardown per call. :func:`run_async` runs a coroutine to completion
on a loop kept for the calling thread (made again in a forked child), so a prefork child or
a thread of ``-P threads`` keeps one loop and its connections for all its tasks.

Example::

    @fleet_task(limit=None)
    def research(topic):
        return run_async(agent(topic))       # agent: async def, using fleet.aslot(...)

``@fleet_task`` on an ``async def`` does this for you. Not for ``-P gevent``/``eventlet``
(their greenlets share one thread; use the blocking API there).

This module knows nothing about Celery.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..errors import FleetError

__all__ = ["run_async", "thread_loop"]

T = TypeVar("T")

_local = threading.local()
_all_loops: list[tuple[int, asyncio.AbstractEventLoop]] = []


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop for :func:`run_async` (made on first use, again after a
    fork: a loop copied from the parent is not this process's)."""
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is None or loop.is_closed() or getattr(_local, "pid", None) != os.getpid():
        loop = asyncio.new_event_loop()
        _local.loop, _local.pid = loop, os.getpid()
        _all_loops.append((os.getpid(), loop))
    return loop


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on this thread's loop and return its result (or raise
    its exception). Refused inside a running loop: there, ``await`` it."""
    if not asyncio.iscoroutine(coro):
        raise FleetError(f"run_async() needs a coroutine, got {type(coro).__name__}")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        green = [name for name in ("gevent", "eventlet") if name in sys.modules]
        hint = (
            f" (under {green[0]}, greenlets share one thread and its loop: use -P prefork or "
            f"-P threads for async bodies, or the blocking API)"
            if green
            else ""
        )
        raise FleetError(
            f"run_async() called inside a running event loop: await the coroutine{hint}"
        )
    loop = thread_loop()
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except BaseException:
        # Interrupted from outside (a soft time limit, Ctrl-C): the coroutine must not stay
        # pending on the loop, holding slots, to resume under the next task.
        if not task.done():
            task.cancel()
            try:
                loop.run_until_complete(task)
            except BaseException:  # its own cancellation, or what it raised on the way out
                pass
        raise


@atexit.register
def _close_loops() -> None:
    for pid, loop in _all_loops:
        if pid == os.getpid() and not loop.is_closed() and not loop.is_running():
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
