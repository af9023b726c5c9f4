"""Leader election on the fleet's Redis: one leader per name, with fencing tokens.

Example::

    leader = fleet.leader("scheduler", lease=15, on_elected=print).start()
    ...
    if leader.is_leader:
        run_schedule(fence=leader.token)
    leader.stop()                        # steps down: another candidate is elected at once

A candidate holds (or tries to take) the lease ``{<namespace>:leader:<name>}:lease`` with
the lock scripts (:class:`~celery_fleet.coordination.locks.LeaseHold`): while it leads it renews the
lease every third of it; while it does not it tries every third, at once when the leader
steps down (the release's wake-up) and as soon as a dead leader's lease lapses. Each term
is a new hold (a new owner id), so each term has a new fencing token, strictly increasing
per name.

This module knows nothing about Celery.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..background import BackgroundLoop
from ..checks import check_max_wait, check_name
from ..clock import Clock, SystemClock
from ..errors import ConfigError, FleetError
from ..store.sync import RedisStore
from .locks import EXPIRY_SLACK_S, LeaseHold, check_lease_s, lease_keys

__all__ = ["Leader", "DEFAULT_LEADER_LEASE_S"]

log = logging.getLogger("celery_fleet")

DEFAULT_LEADER_LEASE_S = 15.0

Callback = Callable[[int], object]


class Leader:
    """A candidate in the leader election of ``name``: at most one leader per name.

    Example::

        with fleet.leader("scheduler", lease=15) as leader:
            while True:
                if leader.is_leader:
                    run_schedule(fence=leader.token)
                time.sleep(1)

    ``start()`` starts a daemon thread that tries to take the lease and, once elected,
    renews it every ``lease / 3``; a candidate that is not leader tries again every
    ``lease / 3``, at once when the leader steps down, and as soon as a dead leader's
    lease lapses. Losing the lease (this process stalled past it, or Redis lost it) is
    noticed at the next renewal; ``is_leader`` is False from then, and also whenever the
    lease may have lapsed by the local clock. ``stop()`` steps down: it deletes the lease
    if it is still ours, so another candidate is elected at once.

    ``token`` is the fencing token of the current term, strictly increasing per name.
    ``on_elected(token)`` runs in the candidate's thread when a term starts;
    ``on_lost(token)`` when it ends: in that thread when the lease was lost, in the caller's
    when ``stop()`` stepped down. Keep them short: the candidate waits for them.
    """

    def __init__(
        self,
        store: RedisStore,
        namespace: str,
        name: str,
        lease_s: float = DEFAULT_LEADER_LEASE_S,
        on_elected: Callback | None = None,
        on_lost: Callback | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.name = check_name(name, "leader name", colon=False)
        self.lease_s = check_lease_s(lease_s, f"leader {name!r} lease")
        for what, fn in (("on_elected", on_elected), ("on_lost", on_lost)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"leader {name!r}: {what} must be callable, got {fn!r}")
        self.store = store
        self.keys = lease_keys(namespace, "leader", name)
        self.clock: Clock = clock or SystemClock()
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.period_s = self.lease_s / 3.0
        self._state = threading.RLock()
        self._hold = self._new_hold()
        self._running = False
        self._generation = 0
        self._campaign: BackgroundLoop[Leader] | None = None
        self._elected = threading.Event()
        self._tried = threading.Event()

    def _new_hold(self) -> LeaseHold:
        return LeaseHold(self.store, self.keys, self.lease_s, self.clock)

    @property
    def is_leader(self) -> bool:
        """True while this candidate leads (its lease is surely not lapsed)."""
        return self._hold.live

    @property
    def token(self) -> int | None:
        """The fencing token of the current term; None while not elected."""
        return self._hold.token

    def start(self) -> Leader:
        """Start campaigning; returns once the first try has an answer (or after a lease)."""
        with self._state:
            if self._running:
                raise FleetError(f"leader {self.name!r} is already started")
            self._running = True
            self._generation += 1
            self._tried = threading.Event()
            self._campaign = campaign = _campaign(self, self._generation)
        campaign.start()
        self._tried.wait(self.lease_s)
        return self

    def stop(self) -> None:
        """Stop campaigning and step down: delete the lease if it is still ours (another
        candidate is elected at once) and call ``on_lost``."""
        with self._state:
            if not self._running:
                return
            self._running = False
            if self._campaign is not None:
                self._campaign.stop()
            self._step_down("stepped down")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until this candidate is leader (``timeout`` seconds at most)."""
        wait_s = None if timeout is None else check_max_wait(timeout, "leader wait timeout")
        return self._elected.wait(wait_s) and self.is_leader

    def __enter__(self) -> Leader:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _step(self, generation: int) -> float | None:
        """One renewal or try: how long to wait before the next, or None to end."""
        with self._state:
            if not self._running or generation != self._generation:
                return None
            try:
                if self._hold.token is not None:
                    if self._renew():
                        return self.period_s
                    self._step_down("lost its lease")
                wait_ms = self._hold.try_acquire()
            except FleetError as exc:
                log.warning("celery-fleet: leader %r: %s (will retry)", self.name, exc)
                return self.period_s
            finally:
                self._tried.set()
            if wait_ms:
                return min(self.period_s, wait_ms / 1000.0 + EXPIRY_SLACK_S)
            self._elected.set()
            self._call(self.on_elected, "on_elected", self._hold.token)
            return self.period_s

    def _renew(self) -> bool:
        """Renew the term's lease: False when it is lost (gone, another's, or unanswered
        for longer than it may have lived)."""
        try:
            return self._hold.renew()
        except FleetError as exc:
            if self._hold.live:
                log.warning(
                    "celery-fleet: leader %r: renewal failed (will retry): %s", self.name, exc
                )
                return True
            return False

    def _step_down(self, why: str) -> None:
        """End the current term (if any): release the lease if still ours, start a new
        hold (a new owner id, so the next term has a new token), call ``on_lost``."""
        hold, self._hold = self._hold, self._new_hold()
        self._elected.clear()
        if hold.token is None:
            return
        if why == "stepped down":
            try:
                hold.release()
            except FleetError as exc:  # it lapses within one lease anyway
                log.warning("celery-fleet: leader %r: step-down failed: %s", self.name, exc)
        else:
            log.warning("celery-fleet: leader %r %s (term %s)", self.name, why, hold.token)
        self._call(self.on_lost, "on_lost", hold.token)

    def _call(self, fn: Callback | None, what: str, token: int | None) -> None:
        """Run a callback; its failure is logged, never ends the candidacy."""
        if fn is None or token is None:
            return
        try:
            fn(token)
        except Exception:
            log.exception("celery-fleet: leader %r: %s callback failed", self.name, what)

    def __repr__(self) -> str:
        state = f"leader, term {self.token}" if self.is_leader else "not leader"
        return f"<Leader {self.name!r} lease={self.lease_s:g}s {state}>"


def _campaign(owner: Leader, generation: int) -> BackgroundLoop[Leader]:
    """The thread of one candidacy (one ``start()``): renew or try every period; wait on
    wake-ups between tries, on ``stop`` between renewals. It holds the Leader only weakly
    between rounds: a Leader dropped without ``stop()`` stops renewing and its lease lapses.
    """

    def round_(leader: Leader) -> float | None:
        pause = leader._step(generation)
        if pause is None or leader.is_leader or loop.stopped:
            return pause
        try:  # not leader: a step-down's wake-up ends the pause at once
            leader.store.blpop(leader.keys[2], pause)
        except FleetError:
            return pause
        return 0.0

    loop = BackgroundLoop(owner, round_, f"fleet-leader-{owner.name}", retry_s=owner.period_s)
    return loop
