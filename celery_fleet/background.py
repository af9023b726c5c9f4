"""The one way this package runs work in a background thread: :class:`BackgroundLoop`.

Seven parts keep something alive in the background (leases, ledger claims, locks, a
leader's term, counters, the deferred-task pump, wake-up listeners). Each is a daemon
thread that runs one *step* of its owner again and again, pausing between steps for as
long as the step asks. The loop guarantees, for all of them:

- **Lazy start.** ``start()`` starts the thread only when none runs: callers may call it on
  every use (every slot, every counted event), and a process that never uses a part never
  pays for its thread. The check is one attribute read and takes no lock, so it costs the
  hot path nothing; callers that may race serialise ``start()`` under a lock of their own.
- **The owner is held weakly.** The thread keeps only a weak reference to its owner
  between steps, so an owner dropped without ``stop()`` (a ``Lock`` left held, a
  ``Leader`` never stopped) ends its thread instead of being kept alive, and renewed,
  by nobody's thread forever.
- **Reset after fork.** A forked child has the parent's objects but none of its threads.
  An ``os.register_at_fork`` hook forgets every loop's thread in the child (and runs the
  owner's ``after_fork``, for the state the parent's thread shared), so the child's next
  ``start()`` starts its own thread.
- **Wake and stop.** ``wake()`` cuts the current pause short (a new waiter arrived);
  ``stop()`` ends the loop for good, optionally joining the thread.
- **Failures are logged, never raised.** A step that raises is logged with its traceback
  and tried again after ``retry_s``: a background thread that died silently would leave
  leases unrenewed with nobody told.

A step returns the seconds to pause before the next step, or None to end the thread (a
lock lost, an idle listener leaving). A step that ends for a reason a later ``start()``
must undo (idle) calls :meth:`BackgroundLoop.forget` under the owner's lock first, so that
a ``start()`` racing with the exit starts a new thread rather than trusting the leaving one.

Example::

    class Flusher:
        def __init__(self) -> None:
            self._loop = BackgroundLoop(self, Flusher._flush, "fleet-flusher", retry_s=2.0)

        def add(self, n: int) -> None:
            ...
            self._loop.start()           # cheap when the thread runs

        def _flush(self) -> float:
            ...                          # send what was added
            return 2.0                   # the pause before the next flush

This module knows nothing about Celery, nor about Redis.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["BackgroundLoop", "Step"]

log = logging.getLogger("celery_fleet")

Owner = TypeVar("Owner")
#: One round of a loop's work: the pause (seconds) before the next round, None to end.
Step = Callable[[Owner], float | None]


class BackgroundLoop(Generic[Owner]):
    """A daemon thread that runs ``step(owner)`` until the owner is gone or it is stopped.

    Args:
        owner: what the steps work on; held weakly (see the module docstring).
        step: one round of work; returns the pause before the next, or None to end.
        name: the thread's name (shown by ``py-spy``, ``threading.enumerate()``, logs).
        first_pause_s: the pause before the first step (0: the first step runs at once).
        retry_s: the pause after a step that raised.
        after_fork: called with the owner in a forked child, after the loop forgot its
            thread: resets what the parent's thread shared with the callers (locks, queues).
    """

    def __init__(
        self,
        owner: Owner,
        step: Step[Owner],
        name: str,
        *,
        first_pause_s: float = 0.0,
        retry_s: float = 1.0,
        after_fork: Callable[[Owner], None] | None = None,
    ) -> None:
        self._owner = weakref.ref(owner)
        self._step = step
        self.name = name
        self.first_pause_s = first_pause_s
        self.retry_s = retry_s
        self._after_fork = after_fork
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopped = False
        _loops.add(self)

    @property
    def thread(self) -> threading.Thread | None:
        """The thread running the loop now; None before the first start, after it ended or
        was forgotten, and in a forked child until its own start."""
        return self._thread

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called (a step may read it to tell a stop from a loss)."""
        return self._stopped

    def start(self) -> None:
        """Start the thread unless it runs (or the loop was stopped). Not locked itself:
        callers on several threads call it under their owner's lock."""
        if self._thread is not None or self._stopped:
            return
        self._wake = wake = threading.Event()
        self._thread = thread = threading.Thread(
            target=self._run, args=(wake,), name=self.name, daemon=True
        )
        thread.start()

    def wake(self) -> None:
        """End the current pause now (the step runs again at once)."""
        self._wake.set()

    def forget(self) -> None:
        """Let the running thread go: the next :meth:`start` starts a new one. A step calls
        it, under the lock its owner's ``start()`` calls are made under, when it is about
        to return None for a reason a later start must undo."""
        self._thread = None

    def stop(self, join_s: float | None = None) -> None:
        """End the loop for good (at its next pause, or before its next step), and wait
        up to ``join_s`` seconds for the thread to finish when given."""
        self._stopped = True
        self._wake.set()
        thread = self._thread
        if join_s is not None and thread is not None and thread is not threading.current_thread():
            thread.join(join_s)

    def _run(self, wake: threading.Event) -> None:
        me = threading.current_thread()
        pause: float | None = self.first_pause_s
        try:
            while pause is not None:
                if pause > 0:
                    wake.wait(pause)
                owner = self._owner()
                if owner is None or self._stopped:
                    return
                wake.clear()  # before the step reads its state: a wake during it is kept
                try:
                    pause = self._step(owner)
                except Exception:
                    log.exception("celery-fleet: %s failed; trying again", self.name)
                    pause = self.retry_s
                # Between steps the owner is held only weakly (it may be dropped meanwhile).
                del owner
        finally:
            if self._thread is me:
                self._thread = None

    def _reset_in_child(self) -> None:
        self._thread = None
        self._wake = threading.Event()
        owner = self._owner()
        if owner is not None and self._after_fork is not None:
            try:
                self._after_fork(owner)
            except Exception:  # one owner's reset must not stop the others'
                log.exception("celery-fleet: resetting %s after a fork failed", self.name)

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running" if self._thread else "idle"
        return f"<BackgroundLoop {self.name!r} {state}>"


_loops: weakref.WeakSet[BackgroundLoop[Any]] = weakref.WeakSet()


def _reset_loops_after_fork() -> None:
    for loop in list(_loops):
        loop._reset_in_child()


os.register_at_fork(after_in_child=_reset_loops_after_fork)
