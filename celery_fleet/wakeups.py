"""Wake-ups shared by every waiter of one limit in one process: one listener, one connection.

A waiter in a limit's line is woken by an element pushed onto its ticket's own list
(``{ns:limit}:wake:<ticket>``, see :mod:`celery_fleet.line`). Blocking on that list costs
one Redis connection per waiter: a gevent or asyncio worker with 1,000 waiters would hold
1,000 connections. Here one daemon thread per process and limit (a :class:`Listener`)
blocks on the lists of all its process's waiters at once (``BLPOP`` takes many keys, all
under the limit's hash tag, so also on Redis Cluster) and hands each wake-up to its waiter:
a ``threading.Event`` for a blocking caller, an ``asyncio`` future (set from the listener
thread with ``call_soon_threadsafe``) for a coroutine. A process holds one blocking
connection per limit it waits on, whatever the number of waiters.

A new waiter interrupts the listener's current ``BLPOP`` (which does not name its list) by
pushing onto the listener's own control list; a wake-up pushed before the listener names
the new list stays in it and is popped at the next ``BLPOP``, so none is lost. A listener
with no waiter for :data:`IDLE_EXIT_S` ends (and starts again with the next waiter).

This module knows nothing about Celery.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .errors import FleetError
from .store import MAX_BLOCK_S, RedisStore

__all__ = ["Listener", "listener_for", "IDLE_EXIT_S"]

log = logging.getLogger("celery_fleet")

#: A listener with no waiter for this long ends its thread.
IDLE_EXIT_S = 30.0
#: After a Redis error the listener wakes every waiter (they ask again) and pauses this long.
ERROR_PAUSE_S = 0.2

Notify = Callable[[], None]


class Listener:
    """The wake-up listener of one limit (its wake-list ``prefix``) in this process."""

    def __init__(self, store: RedisStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.control = f"{prefix}_listener:{os.getpid()}:{os.urandom(4).hex()}"
        self._lock = threading.Lock()
        self._waiters: dict[str, list[Notify]] = {}
        self._thread: threading.Thread | None = None
        self._arrived = threading.Event()  # a waiter registered (wakes an idle listener)
        self._named: frozenset[str] = frozenset()  # the tickets the current BLPOP names
        self._interrupted = False  # an interrupt is on its way: the next round names all

    # -- waiters ------------------------------------------------------------------------

    def wait(self, ticket: str, timeout_s: float) -> bool:
        """Block until ``ticket`` is woken (True) or ``timeout_s`` passes (False)."""
        event = threading.Event()
        if self._register(ticket, event.set):
            self._interrupt()
        try:
            return event.wait(max(0.0, timeout_s))
        finally:
            self._unregister(ticket, event.set)

    async def await_wake(self, ticket: str, timeout_s: float, interrupt: Any) -> bool:
        """Wait in the running loop until ``ticket`` is woken (True) or ``timeout_s`` passes.
        ``interrupt`` is an awaitable factory that pushes onto :attr:`control` (the async
        store's), so the loop is never blocked by a Redis call."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()

        def notify() -> None:
            loop.call_soon_threadsafe(_resolve, future)

        must_interrupt = self._register(ticket, notify)
        try:
            if must_interrupt:
                await interrupt(self.control)
            done, _ = await asyncio.wait([future], timeout=max(0.0, timeout_s))
            return bool(done)
        finally:
            self._unregister(ticket, notify)
            if not future.done():
                future.cancel()

    def _register(self, ticket: str, notify: Notify) -> bool:
        """Add a waiter; True when the caller must interrupt the listener's BLPOP (it does
        not name this ticket and no interrupt is on its way already)."""
        with self._lock:
            self._waiters.setdefault(ticket, []).append(notify)
            self._arrived.set()
            must = ticket not in self._named and not self._interrupted
            if must:
                self._interrupted = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=_listen, args=(weakref.ref(self),), name="fleet-wakeups", daemon=True
                )
                self._thread.start()
        return must

    def _unregister(self, ticket: str, notify: Notify) -> None:
        with self._lock:
            notifies = self._waiters.get(ticket)
            if notifies and notify in notifies:
                notifies.remove(notify)
                if not notifies:
                    del self._waiters[ticket]

    def _interrupt(self) -> None:
        """Make the listener's current BLPOP return, so the next one names the new list."""
        try:
            with self.store.client.pipeline(transaction=False) as pipe:
                pipe.rpush(self.control, 1)
                pipe.pexpire(self.control, int(MAX_BLOCK_S * 2000))
                pipe.execute()
        except Exception as exc:  # the waiter still wakes at its timeout and asks again
            log.debug("celery-fleet: could not interrupt the wake-up listener: %s", exc)

    def waiting(self) -> int:
        """How many waiters are registered now."""
        with self._lock:
            return sum(len(v) for v in self._waiters.values())

    # -- the listener thread -------------------------------------------------------------

    def _round(self) -> bool:
        """One BLPOP over every waiter's list; False when the listener should end."""
        with self._lock:
            tickets = list(self._waiters)
            self._named = frozenset(tickets)
            self._interrupted = False  # this round names every waiter registered so far
        if not tickets:
            return False
        keys = [self.control, *(self.prefix + t for t in tickets)]
        try:
            reply = self.store.blocking_client.execute_command(  # type: ignore[no-untyped-call]
                "BLPOP", *keys, f"{MAX_BLOCK_S:.3f}"
            )
        except Exception as exc:
            log.debug("celery-fleet: the wake-up listener's BLPOP failed: %s", exc)
            self._wake_all()  # they ask again: the store-down policy decides
            time.sleep(ERROR_PAUSE_S)
            return True
        if reply:
            key = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if key != self.control:
                self._wake(key[len(self.prefix) :])
        return True

    def _wake(self, ticket: str) -> None:
        with self._lock:
            notifies = list(self._waiters.get(ticket, ()))
        for notify in notifies:
            notify()

    def _wake_all(self) -> None:
        with self._lock:
            notifies = [n for v in self._waiters.values() for n in v]
        for notify in notifies:
            notify()


def _resolve(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)


def _listen(ref: weakref.ref[Listener]) -> None:
    while True:
        listener = ref()
        if listener is None:
            return
        listener._arrived.clear()  # before the round reads the waiters: none is missed
        try:
            busy = listener._round()
        except FleetError:
            busy = True
        arrived = listener._arrived
        del listener
        if busy or arrived.wait(IDLE_EXIT_S):
            continue
        listener = ref()
        if listener is None:
            return
        with listener._lock:
            if not listener._waiters:
                listener._thread = None
                return
        del listener


_listeners: weakref.WeakKeyDictionary[RedisStore, dict[tuple[int, str], Listener]] = (
    weakref.WeakKeyDictionary()
)
_registry_lock = threading.Lock()


def listener_for(store: RedisStore, prefix: str) -> Listener:
    """This process's listener for the wake lists under ``prefix`` (one per store and
    limit; a new one after a fork)."""
    key = (os.getpid(), prefix)
    with _registry_lock:
        mine = _listeners.setdefault(store, {})
        listener = mine.get(key)
        if listener is None:
            listener = mine[key] = Listener(store, prefix)
    return listener
