"""Wake-ups shared by every waiter of one limit in one process: one listener, one connection.

A waiter in a limit's line is woken when the release (or admission, or leave) that makes
its turn pushes its ticket id onto its *process's* wake list, ``{ns:limit}:wake:<tag>``
(a ticket starts with its process's tag, see :func:`celery_fleet.admission.decision.new_lease_id`
and ``scripts/_lib/line.lua``). One daemon thread per process and limit (a :class:`Listener`)
blocks on that one list (``BLPOP``, then ``LPOP`` of whatever else is there, in the same
loop) and hands each ticket's wake-up to its waiter: a ``threading.Event`` for a blocking
caller, an ``asyncio`` future (set from the listener thread with ``call_soon_threadsafe``)
for a coroutine. A process holds one blocking connection per limit it waits on, whatever
the number of waiters; a wake-up costs one pop, not a scan of every waiter.

A wake-up that arrives before its waiter has registered (it was refused, and has not
started waiting yet) is kept for :data:`KEEP_S` and delivered at registration. A listener
with no waiter for :data:`IDLE_EXIT_S` ends (and starts again with the next waiter).

This module knows nothing about Celery.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

from ..background import BackgroundLoop
from ..errors import FleetError
from .sync import MAX_BLOCK_S, RedisStore

__all__ = ["Listener", "listener_for", "wake_waiters", "IDLE_EXIT_S"]

log = logging.getLogger("celery_fleet")

#: A listener with no waiter for this long ends its thread.
IDLE_EXIT_S = 30.0
#: After a Redis error the listener wakes every waiter (they ask again) and pauses this long.
ERROR_PAUSE_S = 0.2
#: A wake-up for a ticket not (yet) waiting is kept this long (a woken waiter's grace).
KEEP_S = 2.0
#: Wake-ups popped at most per round trip after the blocking pop.
DRAIN = 256

Notify = Callable[[], None]


class Listener:
    """The wake-up listener of one limit's line for the tickets tagged ``tag``."""

    def __init__(self, store: RedisStore, key: bytes) -> None:
        self.store = store
        self.key = key  # the process's wake list: {ns:limit}:wake:<tag>
        self._lock = threading.Lock()
        self._waiters: dict[str, list[Notify]] = {}
        self._early: dict[str, float] = {}  # ticket -> when its wake-up came, unclaimed
        self._idle_since: float | None = None  # when the thread last found no waiter
        self._background = BackgroundLoop(
            self, Listener._listen_round, "fleet-wakeups", retry_s=ERROR_PAUSE_S
        )

    # -- waiters ------------------------------------------------------------------------

    def wait(
        self, ticket: str, timeout_s: float, woken_before: Callable[[], bool] | None = None
    ) -> bool:
        """Block until ``ticket`` is woken (True) or ``timeout_s`` passes (False).

        ``woken_before``: asked once the waiter is registered; True means a wake-up this
        waiter should have had went out before it registered (a limit changed at runtime
        while its ask was in flight, :func:`wake_waiters`): it returns True at once."""
        event = threading.Event()
        self._register(ticket, event.set)
        try:
            if woken_before is not None and woken_before():
                return True
            return event.wait(max(0.0, timeout_s))
        finally:
            self._unregister(ticket, event.set)

    async def await_wake(
        self, ticket: str, timeout_s: float, woken_before: Callable[[], bool] | None = None
    ) -> bool:
        """Wait in the running loop until ``ticket`` is woken (True) or ``timeout_s`` passes;
        the loop is never blocked. ``woken_before`` as for :meth:`wait`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()

        def notify() -> None:
            loop.call_soon_threadsafe(_resolve, future)

        self._register(ticket, notify)
        try:
            if woken_before is not None and woken_before():
                return True
            done, _ = await asyncio.wait([future], timeout=max(0.0, timeout_s))
            return bool(done)
        finally:
            self._unregister(ticket, notify)
            if not future.done():
                future.cancel()

    def _register(self, ticket: str, notify: Notify) -> None:
        with self._lock:
            early = self._early.pop(ticket, None)
            self._waiters.setdefault(ticket, []).append(notify)
            self._idle_since = None
            self._background.wake()  # an idle listener pops again at once
            self._background.start()
        if early is not None and time.monotonic() - early < KEEP_S:
            _notify_all([notify])

    def _unregister(self, ticket: str, notify: Notify) -> None:
        with self._lock:
            notifies = self._waiters.get(ticket)
            if notifies and notify in notifies:
                notifies.remove(notify)
                if not notifies:
                    del self._waiters[ticket]

    # -- the listener thread -------------------------------------------------------------

    def _listen_round(self) -> float | None:
        """The thread's round: one blocking pop while anyone waits. With no waiter it
        pauses (a new waiter wakes it) and ends after :data:`IDLE_EXIT_S` of that."""
        try:
            if self._round():
                return 0.0
        except FleetError:
            return 0.0
        now = time.monotonic()
        with self._lock:
            if self._waiters:
                return 0.0
            if self._idle_since is None:
                self._idle_since = now
            idle_left_s = self._idle_since + IDLE_EXIT_S - now
            if idle_left_s > 0:
                return idle_left_s
            self._idle_since = None
            self._background.forget()  # under the lock: a waiter registering now starts one
            return None

    def _round(self) -> bool:
        """One blocking pop (and a drain of what else is there); False when idle."""
        with self._lock:
            if not self._waiters:
                return False
        try:
            client = self.store.blocking_client
            reply = client.execute_command(  # type: ignore[no-untyped-call]
                "BLPOP", self.key, f"{MAX_BLOCK_S:.3f}"
            )
            tickets = [reply[1]] if reply else []
            if reply:
                more = client.execute_command("LPOP", self.key, DRAIN)  # type: ignore[no-untyped-call]
                tickets += more or []
        except Exception as exc:
            log.debug("celery-fleet: the wake-up listener's BLPOP failed: %s", exc)
            self._wake_all()  # they ask again: the store-down policy decides
            time.sleep(ERROR_PAUSE_S)
            return True
        for raw in tickets:
            self._wake(raw.decode() if isinstance(raw, bytes) else str(raw))
        return True

    def _wake(self, ticket: str) -> None:
        now = time.monotonic()
        with self._lock:
            notifies = list(self._waiters.get(ticket, ()))
            if not notifies:
                self._early[ticket] = now
                if len(self._early) > 1024:  # drop the stale ones
                    self._early = {t: at for t, at in self._early.items() if now - at < KEEP_S}
        _notify_all(notifies)

    def _wake_all(self) -> None:
        with self._lock:
            notifies = [n for v in self._waiters.values() for n in v]
        _notify_all(notifies)


def _notify_all(notifies: list[Notify]) -> None:
    """Wake each waiter; one that cannot be woken (its loop closed) never stops the rest."""
    for notify in notifies:
        try:
            notify()
        except Exception:
            log.debug("celery-fleet: a waiter could not be woken", exc_info=True)


def _resolve(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)


#: (pid, Redis, wake list) -> its listener: two stores (two Fleets) on one Redis and
#: namespace share one, so they never pop each other's wake-ups.
_listeners: dict[tuple[int, str, bytes], Listener] = {}
_registry_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def listener_for(store: RedisStore, prefix: str, ticket: str) -> Listener:
    """This process's listener for ``ticket``'s wake-ups in the line whose wake lists start
    with ``prefix``: one per Redis, limit and ticket tag (a new one after a fork). The tag
    is the ticket's first 8 *bytes*, as the scripts cut it."""
    key = prefix.encode() + ticket.encode()[:8]
    ident = (os.getpid(), store.url, key)
    with _registry_lock:
        listener = _listeners.get(ident)
        if listener is None:
            listener = _listeners[ident] = Listener(store, key)
    return listener


def wake_waiters(store: RedisStore, prefix: str) -> int:
    """Wake every waiter of this process in the line whose wake lists start with ``prefix``
    (they ask again now); returns how many listeners were woken. For a change no release
    announces: a limit changed at runtime (a wider cap, a higher rate) may admit callers
    already waiting, who would otherwise ask again only at their next re-ask (seconds)."""
    head, pid = prefix.encode(), os.getpid()
    with _registry_lock:
        found = [
            listener
            for (owner, url, key), listener in _listeners.items()
            if owner == pid and url == store.url and key.startswith(head)
        ]
    for listener in found:
        listener._wake_all()
    return len(found)
