"""What Redis has not heard of yet: releases, leaves and look-ups sent once it answers again.

While the fleet's Redis is away (dead, or frozen: a call that timed out), three things a
process owes it cannot be sent, and each would cost the fleet until its TTL ran out:

- a **release** (a slot left during the outage): its lease keeps a unit of the in-flight
  cap for the rest of its TTL, so after a failover or a thaw the cap can stay full for a
  whole lease with nobody holding it;
- a **leave** (a waiter that gave up): its ticket stays in line until it expires;
- an **ask that timed out**: a frozen Redis runs it when it thaws, and the lease it makes
  is held by nobody (the caller took the timeout as an outage and went on without it).

:class:`Replays` remembers them, bounded (the oldest are dropped past
:data:`MAX_PENDING`: they still expire by themselves), and the admission sends them once
Redis answers (``Admission.replay_steps``): releases again (the release script is
idempotent), leaves again (idempotent too), and for an ask that timed out a look-up of the
lease it may have made (its id ends with the ask's ticket), released when found. An ask
Redis has not run yet may still run after the first look-up (a thawed server serves its
connections in any order), so it is looked up again, for :data:`WATCH_S` after the first
answer.

This module knows nothing about Redis clients or Celery: :func:`replay_steps` yields the
calls (:mod:`celery_fleet.store.calls`), so the blocking and the asyncio stores run it alike.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from ..errors import FleetError, StoreUnavailable
from ..store.calls import PackedCalls, ScriptCall, Steps
from ..store.specs import AcquireReply

__all__ = ["Owed", "Replays", "replay_steps", "met_outage", "MAX_PENDING", "WATCH_S", "EVERY_S"]

log = logging.getLogger("celery_fleet")

#: The most a process remembers; past it the oldest are dropped (they expire in Redis).
MAX_PENDING = 10_000
#: How long after Redis first answers an ask that timed out is still looked up (s).
WATCH_S = 3.0
#: Replays are attempted at most this often per process (s): one caller at a time.
EVERY_S = 0.2

#: The ticket of the last ask of this thread (or task) that met an outage.
_met: ContextVar[str] = ContextVar("celery_fleet_met_outage", default="")


def met_outage(ticket: str) -> bool:
    """True when this thread's (or task's) last ask that failed for want of Redis was
    ``ticket``'s: it may still run (and join the line) when Redis comes back."""
    return bool(ticket) and _met.get() == ticket


@dataclass
class Owed:
    """One thing to tell Redis: ``kind`` is ``"release"`` (``key``: the lease),
    ``"leave"`` (``key``: the ticket) or ``"ask"`` (``key``: the ticket of an ask that
    timed out; its lease is looked up). ``outcome`` is the release's (``"neutral"`` when
    the release may have run already: the breaker must not count a call twice)."""

    kind: str
    limit: str
    key: str
    outcome: str = "neutral"
    #: For an ask: when Redis first answered a look-up of it (monotonic; None: not yet).
    answered_at: float | None = None


class Replays:
    """A bounded, thread-safe queue of :class:`Owed` items (see the module docstring).

    ``clock`` is monotonic seconds (injectable for tests).
    """

    def __init__(
        self, limit: int = MAX_PENDING, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.clock = clock
        self._items: deque[Owed] = deque()
        self._lock = threading.Lock()
        self._next_at = 0.0
        self._warned = False
        #: How many were dropped for room (a counter for tests and metrics).
        self.dropped = 0
        _live.add(self)

    def _after_fork(self) -> None:
        # The parent sends what it owes; a lock held by another thread at fork stays held.
        self._lock = threading.Lock()
        self._items = deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, kind: str, limit: str, key: str, outcome: str = "neutral") -> None:
        """Remember one item to send when Redis answers."""
        if kind == "ask":
            _met.set(key)
        with self._lock:
            self._items.append(Owed(kind, limit, key, outcome))
            self._next_at = 0.0  # worth trying at the next chance
            while len(self._items) > self.limit:
                self._items.popleft()
                self.dropped += 1
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "celery-fleet: more than %d releases owed to Redis; the oldest are "
                        "dropped (their leases expire by themselves)",
                        self.limit,
                    )

    def due(self) -> bool:
        """True (for one caller at a time, at most every :data:`EVERY_S`) when there is
        something to send. Cheap when there is nothing: one length check."""
        if not self._items:
            return False
        now = self.clock()
        with self._lock:
            if now < self._next_at:
                return False
            self._next_at = now + EVERY_S
            return True

    def take(self) -> list[Owed]:
        """Every item, removed (give back with :meth:`put_back` what was not sent)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            return items

    def put_back(self, items: list[Owed]) -> None:
        """Items that could not be sent (Redis still away), ahead of newer ones."""
        if not items:
            return
        with self._lock:
            self._items.extendleft(reversed(items))
            while len(self._items) > self.limit:
                self._items.popleft()
                self.dropped += 1

    def still_watched(self, item: Owed) -> bool:
        """For an ask whose lease was not found: whether to look again later (it may not
        have run yet), stamping when Redis first answered."""
        now = self.clock()
        if item.answered_at is None:
            item.answered_at = now
        return now - item.answered_at < WATCH_S


_live: weakref.WeakSet[Replays] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for replays in list(_live):
        replays._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


class _Admission(Protocol):
    replays: Replays

    def lookup_command(self, name: str, lease_id: str) -> tuple[str, bytes]: ...

    def release_command(
        self, name: str, lease_id: str, outcome: str = "neutral", retry_after_ms: int = 0
    ) -> tuple[str, bytes]: ...

    def leave_call(self, name: str, ticket: str) -> ScriptCall: ...


def replay_steps(admission: _Admission) -> Steps[int]:
    """Send what ``admission.replays`` holds (see the module docstring); returns how many
    leases were released. Raises :class:`StoreUnavailable` (everything not sent is kept)
    when Redis is still away; any other error drops what it was about, logged."""
    items = admission.replays.take()
    if not items:
        return 0
    asks = [i for i in items if i.kind == "ask"]
    releases = [i for i in items if i.kind == "release"]
    leaves = [i for i in items if i.kind == "leave"]
    watched: list[Owed] = []  # asks to look up again later
    try:
        if asks:
            found = yield PackedCalls(tuple(admission.lookup_command(i.limit, i.key) for i in asks))
            for item, raw in zip(asks, found, strict=True):
                reply = AcquireReply._make(raw)
                if reply.allowed:  # the ask ran after all: its lease is held by nobody
                    lease = reply.detail
                    lease = lease.decode() if isinstance(lease, bytes) else str(lease)
                    releases.append(Owed("release", item.limit, lease))
                elif admission.replays.still_watched(item):
                    watched.append(item)  # it may not have run yet
            asks = []
        if releases:
            yield PackedCalls(
                tuple(admission.release_command(i.limit, i.key, i.outcome) for i in releases)
            )
        count, releases = len(releases), []
        while leaves:
            yield admission.leave_call(leaves[0].limit, leaves[0].key)
            leaves.pop(0)
    except StoreUnavailable:
        admission.replays.put_back(asks + watched + releases + leaves)
        raise
    except FleetError as exc:
        log.warning("celery-fleet: replaying releases owed to Redis failed: %s", exc)
        count = 0
    admission.replays.put_back(watched)
    return count
