"""The deferred-task pump: the fleet's leader publishes rescheduled tasks when they are due.

With ``fleet_defer = "redis"`` (the default) a rescheduled task is not published with a
countdown (an ETA message a worker holds in memory until due, stranded for the broker's
``visibility_timeout`` when that worker dies) but kept in the fleet's Redis
(:mod:`celery_fleet.durability.deferred`) and published when due by the pump.

Every worker runs a :class:`PumpStep`: a candidate in the leader election
``"deferred-pump"`` (lease ``fleet_pump_lease``, 15 s) whose leader, every
``fleet_pump_period`` (1 s), takes the due messages (atomically: no other pump gets them)
and publishes each as it was. So a task waits at most its due time + one pump period, plus
one leader lease when the leader's whole worker is killed. ``fleet_defer = "countdown"``
keeps Celery's countdown instead, as does any reschedule while the fleet's Redis is away.

A message is stored serialized with the app's ``task_serializer``: the task's name, its
arguments and its publish options (id, headers, routing), and signed with the fleet's key
(``fleet_defer_signing_key``): the pump publishes only items whose signature checks out,
and drops, with a logged error, both those and items it fails to publish, after one try.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from ..background import BackgroundLoop
from ..durability.deferred import Deferred
from ..errors import FleetError
from ..fleet import Fleet
from . import pools
from .reschedule import decode
from .tracing import publish_in_trace

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["PumpStep", "Pump", "PUMP_ELECTION"]

log = logging.getLogger("celery_fleet")

#: The leader election whose winner runs the pump.
PUMP_ELECTION = "deferred-pump"
#: Messages one pump round publishes at most.
BATCH = 500


class Pump:
    """The pump of one app: a leader candidate, and a thread that publishes due messages."""

    def __init__(self, app: Celery, fleet: Fleet) -> None:
        self.app = app
        self.fleet = fleet
        self.deferred: Deferred = fleet.deferred
        self.period_s: float = fleet.pump_period_s
        self.leader = fleet.leader(PUMP_ELECTION, lease=fleet.pump_lease_s)
        self._background = BackgroundLoop(
            self, Pump._round, "fleet-pump", first_pause_s=self.period_s, retry_s=self.period_s
        )
        #: Messages this pump published (for tests and the worker's stats).
        self.published = 0
        # Published but not acknowledged (Redis blipped): acknowledged first next round, so
        # their lapsed claims do not publish them again.
        self._unacked: list[str] = []

    def start(self) -> Pump:
        """Campaign for the pump's election, and start the thread that pumps while leader.

        Keep the returned pump: the thread holds it only weakly, and stops without it."""
        self.leader.start()
        self._background.start()
        return self

    def stop(self) -> None:
        """Stop pumping (waiting for a round under way) and step down."""
        self._background.stop(join_s=self.period_s + 5.0)
        self.leader.stop()

    def _round(self) -> float:
        """The thread's round, every period: publish what is due while leader."""
        if self.leader.is_leader:
            try:
                self.pump_once()
            except FleetError as exc:
                log.warning("celery-fleet: the deferred-task pump could not run: %s", exc)
            except Exception:  # keep pumping: nothing may end the thread
                log.exception("celery-fleet: the deferred-task pump failed")
        return self.period_s

    def pump_once(self) -> int:
        """Publish every due message (up to :data:`BATCH`); returns how many."""
        if self._unacked:
            self.deferred.ack(self._unacked)
            self._unacked = []
        taken = self.deferred.take(BATCH)  # only items whose signature checks out
        done: list[str] = []
        refused: list[str] = []
        try:
            for item_id, message in taken:
                try:
                    # in the trace of the attempt that rescheduled it (tracing.py)
                    publish_in_trace(decode(self.app, message))
                except Exception:
                    # Dropped after this one try, not retried every claim period forever:
                    # a genuine task still runs from its broker backup (its copy is then
                    # unknown here), so nothing is lost.
                    log.exception(
                        "celery-fleet: could not publish deferred task %s; dropped it (its "
                        "broker backup runs it, if it has one)",
                        item_id,
                    )
                    refused.append(item_id)
                    continue
                done.append(item_id)
        finally:
            try:
                self.deferred.ack(done)
                self.deferred.drop(refused)
            except FleetError:
                self._unacked += done
                raise
        self.published += len(done)
        if done:
            log.debug("celery-fleet: published %d deferred task(s)", len(done))
        return len(done)


class PumpStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: run the deferred-task pump (a leader candidate) in the main process."""

    label = "celery-fleet pump"
    requires = ("celery.worker.components:Pool",)  # started after the pool's fork

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.pump: Pump | None = None

    def include_if(self, worker: Any) -> bool:
        return bool(worker.app.conf.get("fleet_defer", "redis") == "redis")

    def start(self, worker: Any) -> None:
        self.pump = Pump(worker.app, Fleet.for_app(worker.app)).start()
        log.info("celery-fleet: deferred-task pump started (leader election %r)", PUMP_ELECTION)

    def stop(self, worker: Any) -> None:
        if self.pump is not None:
            self.pump.stop()
            self.pump = None


def install(app: Celery) -> None:
    """Add :class:`PumpStep` to ``app``'s worker blueprint (idempotent), and the check that
    refuses async task bodies on a green pool (:mod:`celery_fleet.celery.pools`)."""
    app.steps["worker"].add(PumpStep)
    pools.install(app)
