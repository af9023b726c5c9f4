"""The worker's distribution loop: consume the affinity queues it is home of, steal when idle.

One :class:`Distributor` runs in each worker's main process (started by
:class:`~celery_fleet.celery.affinity.DistributionStep`), in a daemon thread. Every round
(half a second at most; the leases are renewed every third of ``fleet_affinity_lease``,
at most every 2 s, and the live workers read again just after a peer's lease lapses
unrenewed, so a SIGKILLed worker's queues move within one lease of its death):

1. it announces the worker and reads the live workers (:class:`~celery_fleet.distribution.Homes`);
2. it computes the queues this worker should be home of (bounded rendezvous hashing);
3. it stops consuming the queues it should no longer have, *then* gives up their leases;
4. it takes or renews the leases of the others, and consumes the queues it now holds;
5. in ``"steal"`` mode, when idle (a free pool slot, its own queues empty), it samples the
   depths of the affinity queues from the broker and consumes the deepest peer queue past
   ``fleet_steal_threshold`` until it falls below half of it
   (:class:`~celery_fleet.distribution.StealPlanner`).

In ``"shared"`` mode it only drains: an affinity queue left with tasks (the fleet ran in
another mode before) is consumed until empty, so switching mode strands nothing.

Consumers are added and cancelled with Celery's own ``Consumer.add_task_queue`` /
``cancel_task_queue``, run on the consumer's thread (``call_soon``); the loop waits for a
cancel to have run before it gives up a lease. Redis calls run in this thread, never in
the consumer's: a frozen Redis stalls the loop, not the worker. When the leases cannot be
renewed for longer than they may live, the worker stops consuming its queues (another
worker may be their home by then).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..background import BackgroundLoop
from ..distribution import DistributionConfig, Homes, StealPlanner
from ..distribution.depths import BrokerDepths
from ..distribution.homes import queues_in_id
from ..distribution.status import STATS_TTL_MS, stats_key
from ..errors import ConfigError, FleetError
from ..store.sync import RedisStore

__all__ = ["Distributor", "BrokerDepths", "SAMPLE_PERIOD_S"]

log = logging.getLogger("celery_fleet")

#: How often an idle worker samples the affinity queues' depths (and the loop's period).
SAMPLE_PERIOD_S = 0.5
#: How often a ``"shared"`` worker looks for affinity queues left with tasks.
DRAIN_PERIOD_S = 5.0
#: The shortest pause between two rounds.
MIN_PAUSE_S = 0.01
#: How long the loop waits for the consumer's thread to run an add or cancel.
CONSUMER_WAIT_S = 5.0


def _strangers_message(queues: int, strangers: list[str]) -> str:
    others = ", ".join(f"{w.rsplit('/', 1)[0]} ({queues_in_id(w)})" for w in strangers)
    return (
        f"fleet_affinity_queues = {queues} here, but live workers of the fleet run with "
        f"another number of affinity queues: {others}. Their homes disagree, and queues "
        "would be left with no home: keep fleet_affinity_queues the same in every process "
        "(docs/distribution.md)"
    )


class Distributor:
    """One worker's distribution loop (see the module docstring).

    Args:
        consumer: Celery's worker ``Consumer`` (``call_soon``, ``add_task_queue``,
            ``cancel_task_queue``).
        store: the fleet's Redis.
        config: the fleet's distribution settings.
        name: the worker's nodename.
        depths: reads queue depths (:class:`BrokerDepths` on the worker's app).
        free_slots: how many pool slots are free now (reserved tasks count as busy).
        open_depths: a new depth reader for :meth:`inspect` (it runs on the consumer's
            thread, and ``depths`` is this loop's); None: ``depths``.
    """

    def __init__(
        self,
        consumer: Any,
        store: RedisStore,
        config: DistributionConfig,
        name: str,
        depths: BrokerDepths,
        free_slots: Callable[[], int],
        open_depths: Callable[[], BrokerDepths] | None = None,
    ) -> None:
        self.consumer = consumer
        self.store = store
        self.config = config
        self.homes = Homes(store, config, name)
        self.planner = StealPlanner(config.steal_threshold)
        self.depths = depths
        self.free_slots = free_slots
        self.open_depths = open_depths
        #: Affinity queues consumed as their home / stolen / drained (shared mode).
        self.own: set[int] = set()
        self.drained: set[int] = set()
        #: Tasks received from an own queue (locality hits) and from a stolen one.
        self.local_hits = 0
        self.stolen_tasks = 0
        self.stolen_by_queue: dict[int, int] = {}
        self.last_depths: dict[int, int] = {}
        self._unflushed: dict[str, int] = {}
        self._next_homes = 0.0
        self._strangers: list[str] = []
        self._next_drain = 0.0
        self._lock = threading.Lock()
        self._loop = BackgroundLoop(
            self, Distributor._round, "fleet-distribution", retry_s=SAMPLE_PERIOD_S
        )

    @property
    def stolen(self) -> int | None:
        """The peer queue this worker steals from now (None: none)."""
        return self.planner.stolen

    def start(self) -> Distributor:
        """Start the loop. Keep the returned object: the thread holds it only weakly.

        Raises :class:`ConfigError` when live workers of the fleet run with another
        ``fleet_affinity_queues``: their homes would disagree with this worker's, and the
        queues each side leaves to the other would have no home at all."""
        if self.config.routes:
            try:
                live = self.homes.peek()
            except Exception as exc:  # Redis away: the loop retries; the rounds warn
                log.warning("celery-fleet: could not read the live workers: %s", exc)
            else:
                self._refuse_strangers(live)
        self._loop.start()
        return self

    def _refuse_strangers(self, live: list[str]) -> None:
        strangers = self.homes.strangers(live)
        if strangers:
            raise ConfigError(_strangers_message(self.config.queues, strangers))

    def _warn_strangers(self, live: list[str]) -> None:
        """Log (once per change) live workers with another number of queues: they are
        left out of this worker's assignment (started at once, neither saw the other)."""
        strangers = sorted(self.homes.strangers(live))
        if strangers != self._strangers:
            self._strangers = strangers
            if strangers:
                log.error("celery-fleet: %s", _strangers_message(self.config.queues, strangers))

    def stop(self) -> None:
        """Stop the loop, stop consuming affinity queues, give up the leases and leave."""
        self._loop.stop(join_s=CONSUMER_WAIT_S + 5.0)
        consumed = self.own | self.drained
        stolen = self.planner.forget()
        if stolen is not None:
            consumed.add(stolen)
        self._cancel(consumed, wait=False)
        self.own, self.drained = set(), set()
        self._flush_counts()
        if self.config.routes:
            try:
                self.homes.leave()
            except FleetError as exc:  # they lapse within one lease anyway
                log.warning("celery-fleet: could not give up the affinity queues: %s", exc)
        self.depths.close()

    def received(self, queue_name: str) -> None:
        """Count one task received from ``queue_name``: a locality hit or a stolen task."""
        index = self.config.index_of(queue_name)
        if index is None:
            return
        with self._lock:
            if index in self.own:
                self.local_hits += 1
                kind = "local"
            else:  # stolen, or left over from a queue this worker just gave up
                self.stolen_tasks += 1
                self.stolen_by_queue[index] = self.stolen_by_queue.get(index, 0) + 1
                kind = "stolen"
            field = f"{kind}|{index}"
            self._unflushed[field] = self._unflushed.get(field, 0) + 1

    def _flush_counts(self) -> None:
        """Add this worker's new counts to the fleet's (one round trip on the store's
        wire: a frozen Redis costs the health deadline, not the socket timeout, at a
        worker's shutdown too); kept on failure."""
        with self._lock:
            counts, self._unflushed = self._unflushed, {}
        if not counts:
            return
        key = stats_key(self.config.namespace)
        commands: list[tuple[Any, ...]] = [("HINCRBY", key, f, n) for f, n in counts.items()]
        commands.append(("PEXPIRE", key, STATS_TTL_MS))
        try:
            self.store.write_many(commands)
        except Exception as exc:  # Redis away: count them at the next round
            with self._lock:
                for field, n in counts.items():
                    self._unflushed[field] = self._unflushed.get(field, 0) + n
            log.debug("celery-fleet: could not add the affinity counts: %s", exc)

    def _round(self) -> float:
        now = self.homes.clock.monotonic()
        # A round every third of the lease (2 s at most), and one just after a peer's
        # lease lapses unrenewed: its home died, and its queues move at once, within one
        # lease of the death. A live peer renews long before its lease would lapse, so
        # this adds no round while every peer lives.
        if self.config.routes and (now >= self._next_homes or now >= self.homes.lapse_at):
            self._homes_round()
            self._next_homes = now + min(self.config.lease_s / 3.0, 2.0)
        elif self.config.routes and self.own and not self.homes.live:
            self._lost_all("its leases may have lapsed")
        if self.config.steals:
            self._steal_round()
        elif not self.config.routes and now >= self._next_drain:
            self._drain_round()
            self._next_drain = now + DRAIN_PERIOD_S
        self._flush_counts()
        pause = min(SAMPLE_PERIOD_S, self.config.lease_s / 3.0)
        if self.config.routes:
            until_lapse = self.homes.lapse_at - self.homes.clock.monotonic()
            pause = min(pause, max(until_lapse, MIN_PAUSE_S))
        return pause

    def _homes_round(self) -> None:
        try:
            live = self.homes.announce()
            self._warn_strangers(live)
            wanted = self.homes.wanted(live)
            self._cancel(self.own - wanted)  # stop consuming before giving the lease up
            self.own &= wanted
            held = self.homes.claim(wanted)
        except FleetError as exc:
            log.warning("celery-fleet: distribution round failed (will retry): %s", exc)
            if self.own and not self.homes.live:
                self._lost_all("Redis has not answered for a lease")
            return
        self._cancel(self.own - held)  # taken over (this worker stalled past its lease)
        consumed = set(self.own)
        if self.planner.stolen is not None and self.planner.stolen in held:
            consumed.add(self.planner.stolen)  # already consumed: now as its home
            self.planner.stolen = None
        self._add(held - consumed)
        with self._lock:
            self.own = set(held)

    def _lost_all(self, why: str) -> None:
        log.warning("celery-fleet: stopped consuming affinity queues %s: %s", sorted(self.own), why)
        self._cancel(self.own)
        self.own = set()

    def _sample(self, queues: Iterable[int]) -> dict[int, int]:
        names = {self.config.queue_name(q): q for q in queues}
        found = self.depths.depths(names)
        depths = {names[name]: depth for name, depth in found.items()}
        self.last_depths.update(depths)
        return depths

    def _steal_round(self) -> None:
        idle = self.free_slots() > 0
        stolen = self.planner.stolen
        if not idle and stolen is None:
            return
        try:
            depths = self._sample(range(self.config.queues) if idle else [stolen or 0])
        except FleetError as exc:
            log.debug("celery-fleet: %s", exc)
            return
        start, stop = self.planner.decide(depths, self.own, idle)
        if stop is not None:
            self._cancel({stop})
            log.info("celery-fleet: gave back affinity queue %d (depth %d)", stop, depths[stop])
        if start is not None:
            self._add({start})
            log.info(
                "celery-fleet: stealing from affinity queue %d (depth %d)", start, depths[start]
            )

    def _drain_round(self) -> None:
        try:
            depths = self._sample(range(self.config.queues))
        except FleetError as exc:
            log.debug("celery-fleet: %s", exc)
            return
        full = {q for q, d in depths.items() if d > 0}
        self._cancel(self.drained - full)
        self._add(full - self.drained)
        self.drained = full

    def _add(self, queues: set[int]) -> None:
        for q in sorted(queues):
            name = self.config.queue_name(q)
            self._on_consumer(self.consumer.add_task_queue, name, wait=False)

    def _cancel(self, queues: set[int], wait: bool = True) -> None:
        for q in sorted(queues):
            name = self.config.queue_name(q)
            if not self._on_consumer(self.consumer.cancel_task_queue, name, wait=wait):
                log.warning("celery-fleet: the consumer did not cancel %s in time", name)

    def _on_consumer(self, fn: Callable[[str], Any], name: str, wait: bool) -> bool:
        """Run ``fn(name)`` on the consumer's thread; with ``wait``, until it ran."""
        done = threading.Event()

        def run() -> None:
            try:
                fn(name)
            except Exception:
                log.exception("celery-fleet: %s(%r) failed", getattr(fn, "__name__", fn), name)
            finally:
                done.set()

        self.consumer.call_soon(run)
        return done.wait(CONSUMER_WAIT_S) if wait else True

    def summary(self) -> str:
        """:meth:`info` in one line: ``steal, home of 0 3 5, stealing 2, 120 local, 7 stolen``."""
        info = self.info()
        parts = [str(info["mode"])]
        if self.config.routes:
            parts.append("home of " + (" ".join(map(str, info["home_of"])) or "none"))
        if info["stealing"] is not None:
            parts.append(f"stealing {info['stealing']}")
        if info["draining"]:
            parts.append("draining " + " ".join(map(str, info["draining"])))
        parts.append(f"{info['local_hits']} local, {info['stolen_tasks']} stolen")
        return ", ".join(parts)

    def inspect(self) -> dict[str, Any]:
        """:meth:`info`, with ``depths``: the depth of each queue this worker is home of
        (and of the one it steals from), read from the broker now, on this call only
        (``sampled_depths`` are what an idle ``"steal"`` worker last sampled: none in
        ``"dedicated"`` mode, and old once busy). ``depths_error`` when the broker does
        not answer."""
        info = self.info()
        queues = set(info["home_of"])
        if info["stealing"] is not None:
            queues.add(info["stealing"])
        names = {self.config.queue_name(q): q for q in sorted(queues)}
        reader = self.open_depths() if self.open_depths is not None else self.depths
        try:
            found = reader.depths(names)
        except FleetError as exc:
            info["depths"], info["depths_error"] = {}, str(exc)
        else:
            info["depths"] = {names[name]: depth for name, depth in found.items()}
        finally:
            if reader is not self.depths:
                reader.close()
        return info

    def info(self) -> dict[str, Any]:
        """What this worker does with the affinity queues (``inspect stats``/``fleet``)."""
        with self._lock:
            return {
                "mode": self.config.mode,
                "worker_id": self.homes.worker_id,
                "home_of": sorted(self.own),
                "stealing": self.planner.stolen,
                "draining": sorted(self.drained),
                "local_hits": self.local_hits,
                "stolen_tasks": self.stolen_tasks,
                "stolen_by_queue": dict(self.stolen_by_queue),
                "sampled_depths": dict(self.last_depths),
            }
