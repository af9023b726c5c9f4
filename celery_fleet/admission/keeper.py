"""Keeping held leases alive: the per-process renewal thread, and injectable time.

A slot's lease expires unless renewed, so that a holder killed with SIGKILL gives its slot
back. :class:`LeaseKeeper` is the daemon thread that renews the leases of the slots this
process holds (one round trip per limit), and marks a slot lost when it could not renew it
in time. It knows a slot only by the few attributes in :class:`HeldLease`, and tells who
holds each one (:meth:`LeaseKeeper.describe`: the task, if any, that took it, and since
when) for ``celery inspect fleet``.

Time is injectable (:class:`~celery_fleet.clock.Clock`, re-exported here) so tests of waits
and leases are deterministic.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from ..background import BackgroundLoop
from ..clock import Clock, SystemClock
from ..errors import FleetError, LeaseLost, StoreUnavailable
from ..logfields import log_fields
from .core import Admission

__all__ = [
    "Clock",
    "SystemClock",
    "LeaseKeeper",
    "HeldLease",
    "Holder",
    "IDLE_EXIT_S",
    "lease_fields",
]

#: The keeper thread ends after this long with no slot held (and starts again with one).
IDLE_EXIT_S = 60.0
#: Posted replies (releases) still unread after this are read by the keeper thread.
POSTED_READ_AFTER_S = 0.5

log = logging.getLogger("celery_fleet")

#: Who took a slot: ``(task id, task name)`` of the task running where it was taken (the
#: id is None for a task called directly), or None when no task was running there.
Holder = tuple[str | None, str] | None


def no_holder() -> Holder:
    """The holder hook outside Celery: no task is ever running."""
    return None


class HeldLease(Protocol):
    """What the keeper reads and writes on a held slot."""

    limit: str
    lease_id: str | None
    tokens: int
    lost: bool
    last_renewed: float
    #: Set by :meth:`LeaseKeeper.track`: when the lease was taken (the keeper's clock),
    #: and by whom (:data:`Holder`).
    held_since: float
    holder: Holder


class LeaseKeeper:
    """A daemon thread per process that renews the leases of held slots.

    It wakes every ``tick_s`` and renews (one round trip per limit) every lease that has
    not been renewed for a third of its TTL. A lease that was lost (the process stalled
    past its TTL) is flagged on the slot and logged: the slot may already be someone
    else's, which :class:`~celery_fleet.errors.LeaseLost` describes.
    """

    def __init__(
        self, admission: Admission, clock: Clock | None = None, tick_s: float = 1.0
    ) -> None:
        self.admission = admission
        self.clock = clock or SystemClock()
        self.tick_s = tick_s
        #: Who is running in the calling thread when a slot is taken (:data:`Holder`).
        #: The Celery binding sets it to read Celery's current task; this package knows
        #: nothing of Celery.
        self.holder: Callable[[], Holder] = no_holder
        self._slots: set[HeldLease] = set()
        # Slots whose renewal failed because Redis was unreachable: past their TTL they
        # are renewed (put back) when it answers, not declared lost for the outage.
        self._stranded: weakref.WeakSet[HeldLease] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid: int | None = None
        # When the thread found no slot held (it leaves after IDLE_EXIT_S of that).
        self._idle_since: float | None = None
        self._background = BackgroundLoop(
            self,
            LeaseKeeper._round,
            "celery-fleet-lease-keeper",
            retry_s=tick_s,
            after_fork=LeaseKeeper._after_fork,
        )

    def track(self, slot: HeldLease) -> None:
        """Renew ``slot``'s lease from now on; remember since when and for whom it is held
        (called in the thread, or on the loop, that took it)."""
        slot.held_since = self.clock.monotonic()
        try:
            slot.holder = self.holder()
        except Exception:  # who holds it is for display: it must never cost the slot
            slot.holder = None
        with self._lock:
            if self._pid != os.getpid():
                # A fork copied the parent's slots and a dead thread: start afresh.
                self._slots = set()
                self._background.forget()
                self._pid = os.getpid()
            self._slots.add(slot)
            self._background.start()

    def untrack(self, slot: HeldLease) -> None:
        with self._lock:
            self._slots.discard(slot)

    def stranded(self, slot: HeldLease) -> bool:
        """True when ``slot``'s last renewal failed because Redis was unreachable."""
        return slot in self._stranded

    def held(self) -> list[HeldLease]:
        """The slots this process holds now (none after a fork: the parent's are not ours)."""
        with self._lock:
            return list(self._slots) if self._pid == os.getpid() else []

    def describe(self) -> list[dict[str, object]]:
        """The slots this process holds, oldest first, for ``celery inspect fleet`` (and
        recorded in Redis by presence.py, where it reads a prefork pool's): limit, lease,
        tokens, ``task_id`` and ``task`` (the task that took it; both None when none was
        running there, and ``holder`` then says "no task"), ``held_s`` (since the lease
        was taken) and ``renewed_s_ago``.

        Example: ``[{"limit": "openai", "lease": "9f2c...", "tokens": 1500, "task_id":
        "5b1e...", "task": "proj.research", "holder": "proj.research[5b1e...]", "held_s":
        12.4, "renewed_s_ago": 0.7}]``
        """
        now = self.clock.monotonic()
        return [
            {"limit": s.limit, "lease": s.lease_id, "tokens": s.tokens,
             **describe_holder(s.holder),
             "held_s": round(now - s.held_since, 3),
             "renewed_s_ago": round(now - s.last_renewed, 3)}
            for s in sorted(self.held(), key=lambda s: s.held_since)  # oldest first
            if s.lease_id
        ]  # fmt: skip

    def _round(self) -> float | None:
        """One round of the keeper thread: renew what is due, read replies left unread,
        replay what an outage owed; then the pause before the next round, or None when
        no slot was held for :data:`IDLE_EXIT_S` (the thread ends; the next slot starts
        another)."""
        try:
            self.renew_due()
        except Exception:  # keep renewing: nothing may end the thread
            log.warning("celery-fleet: lease renewal failed; will retry", exc_info=True)
        self._drain(POSTED_READ_AFTER_S)
        self.replay()
        with self._lock:
            if self._slots:
                self._idle_since = None
                ttls = [self.admission.limit(s.limit).lease_s for s in self._slots]
                # Wake often enough to renew at a third of the shortest TTL.
                return min(self.tick_s, min(ttls) / 6.0)
            # Linger: a loop of short slots must not start a thread per slot.
            now = time.monotonic()
            if self._idle_since is None:
                self._idle_since = now
            if now - self._idle_since < IDLE_EXIT_S:
                return self.tick_s
            self._idle_since = None
            self._background.forget()  # under the lock: a slot tracked now starts a thread
        # outside the lock: callbacks may take slots (and so this lock)
        self._drain(0.0)
        self.replay()
        return None

    def _drain(self, older_than_s: float) -> None:
        """Read posted releases' replies that nobody read for a while (an idle process):
        their callbacks (lost leases, breaker changes) should not wait for the next call."""
        store = self.admission.store
        try:
            if store._combiner is not None and store.combiner.pending() > older_than_s:
                store.drain()
        except Exception:
            log.warning("celery-fleet: reading posted replies failed", exc_info=True)

    def replay(self) -> None:
        """Send what an outage left owed to Redis (releases, leaves, look-ups of asks that
        timed out: replay.py) once it answers, so their slots free now, not at their TTL.
        While the outage lasts, the admission's own retry (one caller a second) asks."""
        admission = self.admission
        down = admission.store_down
        if down.down or not admission.replays.due():
            return
        try:
            released = admission.replay()
        except StoreUnavailable as exc:
            down.failed(exc)
            return
        except Exception:
            log.warning("celery-fleet: replaying owed releases failed", exc_info=True)
            return
        if released:
            log.info("celery-fleet: released %d lease(s) an outage had left in Redis", released)

    def renew_due(self) -> None:
        """Renew every lease older than a third of its TTL (one round trip per limit).

        A lease not renewed within its TTL (Redis was unreachable, the process stalled) is
        marked lost here, without asking Redis: its slot may already be someone else's.
        Lost slots are logged once and no longer renewed; renewal failures of one limit do
        not stop the others.
        """
        now = self.clock.monotonic()
        due: dict[str, list[HeldLease]] = {}
        with self._lock:
            for slot in self._slots:
                ttl = self.admission.limit(slot.limit).lease_s
                if slot.lost or not slot.lease_id:
                    continue
                if now - slot.last_renewed >= ttl and slot not in self._stranded:
                    self.lose(slot, "not renewed within its TTL")
                elif now - slot.last_renewed >= ttl / 3.0:
                    due.setdefault(slot.limit, []).append(slot)
        for limit, slots in due.items():
            leases = [(s.lease_id, s.tokens) for s in slots if s.lease_id]
            try:
                lost, restored = self.admission.renew(limit, leases)
            except StoreUnavailable as exc:
                down = self.admission.store_down
                if not down.fallback:
                    log.warning(
                        "celery-fleet: renewing %r leases failed; will retry",
                        limit,
                        extra=log_fields(limit=limit),
                    )
                else:  # the outage is logged once, by the policy
                    self._stranded.update(slots)
                    down.failed(exc)
                continue
            except FleetError:
                log.warning(
                    "celery-fleet: renewing %r leases failed; will retry",
                    limit,
                    extra=log_fields(limit=limit),
                )
                continue
            down = self.admission.store_down
            asked = any(not down.owns(lease) for lease, _tokens in leases)
            if asked and down.down:
                down.answered()  # looks for the hand-over (which empties lost windows)
            if restored:
                log.warning(
                    "celery-fleet: Redis had lost %d live lease(s) of %r (restarted empty, "
                    "flushed or evicted?); put them back",
                    len(restored),
                    limit,
                    extra=log_fields(limit=limit),
                )
            for s in slots:
                self._stranded.discard(s)
                if s.lease_id in lost:
                    self.lose(s, "expired while held, or Redis lost it and the cap was full")
                else:
                    s.last_renewed = now

    @staticmethod
    def lose(slot: HeldLease, why: str) -> None:
        """Mark ``slot`` lost (its lease is gone) and log it once."""
        if slot.lost:
            return
        slot.lost = True
        log.error(
            "celery-fleet: %s",
            LeaseLost(slot.limit, slot.lease_id or "", why),
            extra=lease_fields(slot),
        )

    def _after_fork(self) -> None:
        # The child has the parent's slots and lock state but not its thread: start afresh.
        self._lock = threading.Lock()
        self._slots = set()
        self._idle_since = None
        self._pid = os.getpid()


def lease_fields(slot: HeldLease) -> dict[str, object]:
    """The ``extra=`` fields of a log line about ``slot``: its limit, and the id of the
    task holding it when one does (docs/observability.md, the log fields)."""
    if slot.holder is not None and slot.holder[0]:
        return log_fields(limit=slot.limit, task_id=slot.holder[0])
    return log_fields(limit=slot.limit)


def describe_holder(holder: Holder) -> dict[str, str | None]:
    """``task_id``, ``task`` and a readable ``holder``: ``"proj.research[5b1e...]"``, the
    task's name alone when it was called directly, or ``"no task"``."""
    if holder is None:
        return {"task_id": None, "task": None, "holder": "no task"}
    task_id, name = holder
    return {"task_id": task_id, "task": name, "holder": f"{name}[{task_id}]" if task_id else name}
