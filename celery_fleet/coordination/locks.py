"""Lease locks on the fleet's Redis: renewed while held, with fencing tokens.

Example::

    with fleet.lock("nightly-report", ttl=30) as lock:
        warehouse.write(rows, fence=lock.token)   # the store refuses tokens older than seen

A name's lease is a hash ``{<namespace>:lock:<name>}:lease`` (``owner``, ``token``) that
expires on Redis's clock unless its owner renews it; a daemon thread renews it every third
of its TTL while held, so a holder killed with SIGKILL frees it within one TTL. Acquiring
takes the name's next *fencing token*, ``max(last + 1, Redis TIME in µs)``, kept in
``...:fence`` (which never expires) and with the lease: strictly increasing per name across
every process, and still above every earlier token when Redis lost the counter (restarted
empty, failed over, evicted it). Tokens are large (~1.8e15), not consecutive, below 2**53.
Renewal and release compare the owner id inside the script, so a holder that stalled past
its lease (SIGSTOP, a suspended VM, a long GIL-holding call) can neither extend nor release
its successor's lock: it learns it lost the lock instead (:class:`~celery_fleet.LockLost`).
A lease is not a fence, though: nothing stops the stalled holder's own writes, which is
what the token is for (pass it along; let the resource refuse tokens older than it saw).

A release pushes one wake-up (``...:wake``) that a blocked acquirer pops, so a waiter gets
a released lock at once, and one held by a dead holder as soon as Redis expires it.
:class:`LeaseHold` (one owner's acquire / renew / release) is shared with leader election
(:mod:`celery_fleet.coordination.election`), which runs on the same three scripts.

This module knows nothing about Celery.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from types import TracebackType

from ..background import BackgroundLoop
from ..checks import MAX_SECONDS, check_max_wait, check_name, number
from ..clock import Clock, SystemClock
from ..errors import ConfigError, FleetError, LockLost, LockNotAcquired
from ..store.specs import LOCK_ACQUIRE, LOCK_RELEASE, LOCK_RENEW
from ..store.sync import RedisStore

__all__ = [
    "Lock",
    "LeaseHold",
    "lease_keys",
    "check_lease_s",
    "DEFAULT_LOCK_TTL_S",
    "MIN_LEASE_S",
]

log = logging.getLogger("celery_fleet")

DEFAULT_LOCK_TTL_S = 30.0
#: The shortest lease: it is renewed every third, and each renewal is a round trip.
MIN_LEASE_S = 0.1
#: How much faster than Redis's the local clock may run: a hold counts as lost here this
#: fraction of its lease before Redis can let it go, never after.
CLOCK_DRIFT = 0.01
#: The longest wait between two tries of a blocked acquirer (a wake-up it missed costs no
#: more than this).
MAX_POLL_S = 2.0
#: Ask again this long after the holder's lease should have lapsed.
EXPIRY_SLACK_S = 0.005


def lease_keys(namespace: str, kind: str, name: str) -> list[str]:
    """The keys of lease ``name`` of ``kind`` (``lock``, ``leader``): lease, fence, wake.

    One hash tag, so the scripts that use them together run on Redis Cluster.
    """
    tag = f"{{{namespace}:{kind}:{name}}}"
    return [f"{tag}:lease", f"{tag}:fence", f"{tag}:wake"]


def check_lease_s(value: object, what: str) -> float:
    """A lease in seconds: a number from :data:`MIN_LEASE_S` to a year."""
    return number(value, what, lo=MIN_LEASE_S, hi=MAX_SECONDS)


class LeaseHold:
    """One owner's hold on a lease: acquire, renew and release it by the owner's id.

    A new hold (a new owner id) per acquisition or leadership term. Asking again with the
    same hold after a lost reply is safe: the script answers with the same token.
    """

    def __init__(self, store: RedisStore, keys: list[str], lease_s: float, clock: Clock) -> None:
        self.store = store
        self.keys = keys
        self.lease_s = lease_s
        self.lease_ms = max(1, round(lease_s * 1000))
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.pid = os.getpid()
        self.token: int | None = None
        self.lost = False
        self.released = False
        self.valid_until = -math.inf

    def try_acquire(self) -> int:
        """0 when acquired (``token`` is set), else the ms the holder's lease lasts."""
        sent = self.clock.monotonic()
        reply = LOCK_ACQUIRE.run(self.store, self.keys[:2], [self.owner, self.lease_ms])
        if not reply.acquired:
            return max(int(reply.value), 1)
        self.token = int(reply.value)
        self._valid_from(sent)
        return 0

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost``) when it is gone or another owner's."""
        sent = self.clock.monotonic()
        if not LOCK_RENEW.run(self.store, self.keys[:1], [self.owner, self.lease_ms]):
            self.lost = True
            return False
        self._valid_from(sent)
        return True

    def release(self) -> bool:
        """Give the lease up and wake one waiter; False when it was not ours any more."""
        self.released = True
        self.valid_until = -math.inf
        keys = [self.keys[0], self.keys[2]]
        return LOCK_RELEASE.run(self.store, keys, [self.owner, self.lease_ms])

    @property
    def live(self) -> bool:
        """Acquired, in this process, and surely not lapsed by the local clock."""
        return (
            self.token is not None
            and not (self.lost or self.released)
            and self.pid == os.getpid()
            and self.clock.monotonic() < self.valid_until
        )

    def _valid_from(self, sent: float) -> None:
        # Redis (re)started the lease no earlier than the call was sent: it is ours until
        # then plus the lease, less what the two clocks may drift apart meanwhile.
        self.valid_until = sent + self.lease_s * (1.0 - CLOCK_DRIFT)


class Lock:
    """A lease lock on a name, shared by every process on the fleet's Redis.

    Example::

        lock = fleet.lock("reindex", ttl=30)
        with lock:                      # blocks until acquired
            db.write(..., fence=lock.token)
        try:
            lock.acquire(blocking=False)
        except LockNotAcquired as busy:
            print("held for", busy.wait_ms, "ms more")

    While held, a daemon thread renews the lease every ``ttl / 3``; ``held`` turns False
    when a renewal finds the lock gone or another owner's (or, without any answer from
    Redis, once the lease may have lapsed by the local clock). ``token`` is the fencing
    token of the current hold. Not reentrant; reusable after release (a new token).

    Args:
        store: the fleet's Redis.
        namespace: the fleet's key prefix.
        name: the lock's name (letters, digits and ``_./@+-``).
        ttl_s: the lease in seconds: how long a holder that died keeps others out.
        clock: local time for waits and validity (tests inject a fake one).
    """

    def __init__(
        self,
        store: RedisStore,
        namespace: str,
        name: str,
        ttl_s: float = DEFAULT_LOCK_TTL_S,
        clock: Clock | None = None,
    ) -> None:
        self.name = check_name(name, "lock name", colon=False)
        self.ttl_s = check_lease_s(ttl_s, f"lock {name!r} ttl")
        self.store = store
        self.keys = lease_keys(namespace, "lock", name)
        self.clock: Clock = clock or SystemClock()
        self._hold: LeaseHold | None = None
        self._renewal: BackgroundLoop[LeaseHold] | None = None

    @property
    def token(self) -> int | None:
        """The fencing token of the current (or last) hold; None before the first."""
        return self._hold.token if self._hold is not None else None

    @property
    def held(self) -> bool:
        """True while this process holds the lock (its lease is surely not lapsed)."""
        return self._hold is not None and self._hold.live

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> int:
        """Acquire the lock and return its fencing token.

        Blocks until the lock is free (``timeout`` seconds at most, default forever); with
        ``blocking=False`` asks once. Raises :class:`~celery_fleet.LockNotAcquired` when
        it gives up. A waiter is woken when the holder releases, and asks again when the
        holder's lease should have lapsed.
        """
        if not isinstance(blocking, bool):
            raise ConfigError(f"lock {self.name!r}: blocking must be a bool, got {blocking!r}")
        if timeout is not None and not blocking:
            raise ConfigError(f"lock {self.name!r}: timeout= needs blocking=True")
        wait_s = math.inf if timeout is None else check_max_wait(timeout, "lock timeout")
        if not blocking:
            wait_s = 0.0
        if self._hold is not None and self._hold.live:
            raise FleetError(f"lock {self.name!r} is already held here; a Lock is not reentrant")
        if self._renewal is not None:
            self._renewal.stop()  # a lost hold's renewal thread, if it still runs
        hold = LeaseHold(self.store, self.keys, self.ttl_s, self.clock)
        deadline = self.clock.monotonic() + wait_s
        while True:
            wait_ms = self._do_acquire(hold)
            if wait_ms == 0:
                break
            left = deadline - self.clock.monotonic()
            if left <= 0:
                raise LockNotAcquired(self.name, wait_ms, timeout)
            until_lapse = wait_ms / 1000.0 + EXPIRY_SLACK_S
            self.store.blpop(self.keys[2], min(left, until_lapse, self.ttl_s / 3.0, MAX_POLL_S))
        self._hold = hold
        self._renewal = _renewal(hold, self.name, self.ttl_s / 3.0)
        self._renewal.start()
        assert hold.token is not None
        return hold.token

    def _do_acquire(self, hold: LeaseHold) -> int:
        """One try (0: acquired, else ms the holder's lease lasts): the seam for tests."""
        return hold.try_acquire()

    def release(self) -> None:
        """Release the lock (and wake one waiter).

        Raises :class:`~celery_fleet.LockLost` when the lock was no longer this holder's:
        its lease lapsed, and the work done under it may have overlapped another holder's.
        """
        hold = self._hold
        if hold is None or hold.released:
            raise FleetError(f"lock {self.name!r} is not held: release() without acquire()")
        if hold.pid != os.getpid():
            raise FleetError(
                f"lock {self.name!r} was acquired in process {hold.pid}; only that process "
                f"may release it"
            )
        if self._renewal is not None:
            self._renewal.stop()
        if not hold.release():
            raise LockLost(self.name, hold.token, "its lease lapsed before release()")

    def ensure_held(self) -> None:
        """Raise :class:`~celery_fleet.LockLost` unless the lock is still held: call it
        before a step that must not run without the lock."""
        if not self.held:
            raise LockLost(self.name, self.token, "a renewal found it gone or another's")

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.release()
            return
        try:  # the block's own error matters more than a failed release
            self.release()
        except FleetError as failure:
            log.error("celery-fleet: %s (while leaving on %r)", failure, exc)

    def __repr__(self) -> str:
        state = f"held, token {self.token}" if self.held else "not held"
        return f"<Lock {self.name!r} ttl={self.ttl_s:g}s {state}>"


def _renewal(owner: LeaseHold, name: str, every_s: float) -> BackgroundLoop[LeaseHold]:
    """The renewal thread of one hold: renew every ``every_s`` until released or lost.

    It holds the hold only weakly (and not the Lock): a Lock dropped while held stops
    being renewed, and its lease lapses, instead of being kept forever by nobody.
    """

    def renew(hold: LeaseHold) -> float | None:
        try:
            if hold.renew():
                return every_s
        except FleetError as exc:
            if hold.live:
                log.warning("celery-fleet: could not renew lock %r (will retry): %s", name, exc)
                return every_s
            hold.lost = True
        if not loop.stopped:  # a release (or a new acquire) stopped it: not a loss
            log.error("celery-fleet: %s", LockLost(name, hold.token, "renewal found it gone"))
        return None

    loop = BackgroundLoop(
        owner, renew, f"fleet-lock-{name}", first_pause_s=every_s, retry_s=every_s
    )
    return loop
