"""Which worker is the home of which affinity queue: rendezvous hashing and leases.

Example::

    homes = Homes(store, config, "w1@host")
    live = homes.announce()                      # this worker is live; who else is
    wanted = queues_of(homes.worker_id, live, config.queues)
    held = homes.claim(wanted)                   # the queues this worker is the home of

**Assignment** (:func:`assign`, pure, the same in every process given the same live
workers and holders): every worker scores every queue with a stable hash of ``(worker,
queue)`` (rendezvous, or highest-random-weight, hashing); a queue goes to its
best-scoring worker. Plain rendezvous hashing balances only on average (32 queues over 3
workers can split 15/10/7), so the assignment is *bounded*: every worker gets
``floor(queues / workers)`` queues or one more, so the loads differ by one at most. And
it is *sticky*: a queue stays with its current home (read at the worker's last claim)
while that home is live and within the cap; only the others are placed by score, each
with its best-scoring worker that still has room. So a join moves about
``queues / (n + 1)`` queues, all to the newcomer, and a leave moves only the leaver's:
measured over 50 random fleets of 2 to 10 workers with 32 queues, a join moved 0.7-1.0
times the ideal ``queues / (n + 1)`` (plain bounded rendezvous: 1.1-4.8 times), and a
leave moved no other queue.

**Leases.** A worker announces itself in the zset ``{<ns>:affinity}:workers`` (its id, an
expiry on Redis's clock) every round; a worker killed with SIGKILL drops out within one
lease. Each queue's home is the string ``{<ns>:affinity}:home:<n>``: the owner id, with
a PX expiry, taken only when free, renewed and deleted only by its owner (one script for
every queue, one round trip). So a queue has at most one home at a time, and a dead
home's queues are free within one lease. A worker consumes a queue only while it holds
its lease (:attr:`Homes.valid_until`: the lease may have lapsed by the local clock after
that; the caller stops consuming).

This module knows nothing about Celery.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Sequence

from ..clock import Clock, SystemClock
from ..store.specs import AFFINITY_HOMES, AFFINITY_PRESENCE
from ..store.sync import RedisStore
from .ring import DistributionConfig, stable_hash
from .status import home_key

__all__ = [
    "Homes",
    "assign",
    "queues_of",
    "home_scores",
    "queues_in_id",
    "CLOCK_DRIFT",
    "LAPSE_MARGIN_S",
]

#: How much faster than Redis's the local clock may run (as for locks).
CLOCK_DRIFT = 0.01
#: How long after a peer's lease lapses (by the local clock) the loop looks again.
LAPSE_MARGIN_S = 0.02


def queues_in_id(worker_id: str) -> int | None:
    """The ``fleet_affinity_queues`` a worker id says its worker runs with (None: an id
    without it, from an older celery-fleet)."""
    tail = worker_id.rsplit("/", 1)[-1]
    _, sep, count = tail.rpartition("-q")
    return int(count) if sep and count.isdigit() else None


def home_scores(worker: str, queues: int) -> list[int]:
    """The rendezvous score of ``worker`` for each queue (higher wins)."""
    return [stable_hash(f"{worker}\0{q}") for q in range(queues)]


def assign(
    workers: Iterable[str], queues: int, holders: Sequence[str | None] | None = None
) -> list[str | None]:
    """The home worker of each queue (index -> worker id), balanced by count.

    Every worker gets ``floor(queues / len(workers))`` queues or one more. A queue stays
    with its current holder (``holders``: the home of each queue now, "" or None for
    none) while that holder is live and within the cap, so a join moves about
    ``queues / (n + 1)`` queues (to the newcomer) and a leave only the leaver's; the
    others go by rendezvous hashing with caps. Deterministic: every process that sees the
    same workers and holders computes the same homes.
    No workers: every queue is homeless (None).

    Example::

        assign(["a", "b", "c"], 6)   # each worker gets exactly 2 queues
    """
    live = sorted(set(workers))
    if not live:
        return [None] * queues
    scores = {w: home_scores(w, queues) for w in live}
    ranked = [_ranking(live, scores, q) for q in range(queues)]
    order = sorted(range(queues), key=lambda q: (-scores[ranked[q][0]][q], q))
    load = dict.fromkeys(live, 0)
    homes: list[str | None] = [None] * queues
    base, extra = divmod(queues, len(live))
    # Kept: the queues of a live holder, its best-scoring first, up to ``base`` each, then
    # one more each for as many holders as there are extra queues.
    kept = [(q, h) for q, h in enumerate(holders or ()) if q < queues and h and h in load]
    kept.sort(key=lambda qh: (-scores[qh[1]][qh[0]], qh[0]))
    for q, h in kept:
        if load[h] < base:
            homes[q] = h
            load[h] += 1
    plus = 0
    for q, h in kept:
        if homes[q] is None and plus < extra and load[h] == base:
            homes[q] = h
            load[h] += 1
            plus += 1
    # The others by rendezvous: every worker up to ``base``, then the remainder one each
    # (never more than ``extra`` workers get ``base + 1``), so the loads differ by one.
    for cap in (base, base + 1):
        for q in order:
            if homes[q] is not None:
                continue
            for w in ranked[q]:
                if load[w] < cap:
                    homes[q] = w
                    load[w] += 1
                    break
    return homes


def _ranking(live: list[str], scores: dict[str, list[int]], queue: int) -> list[str]:
    """The workers in order of preference for ``queue`` (best score first; ties by id)."""
    return sorted(live, key=lambda w: (-scores[w][queue], w))


def queues_of(
    worker: str,
    workers: Iterable[str],
    queues: int,
    holders: Sequence[str | None] | None = None,
) -> set[int]:
    """The queues whose home :func:`assign` makes ``worker`` (it counts as live)."""
    homes = assign([*workers, worker], queues, holders)
    return {q for q, home in enumerate(homes) if home == worker}


class Homes:
    """One worker's side of the homes: its presence and the leases of its queues.

    Args:
        store: the fleet's Redis.
        config: the fleet's distribution settings (queues, lease, namespace).
        name: the worker's name (Celery's nodename); the worker's id adds a random part,
            so two processes started with the same name are two workers, never one owner,
            and the number of affinity queues (``w1@host/3f02a9cb-q32``), so a worker
            tells a peer that runs with another ``fleet_affinity_queues`` (:meth:`strangers`).
        clock: local time for the validity of the leases (tests inject a fake one).

    Not thread-safe: one loop (the worker's distribution thread) calls it.
    """

    def __init__(
        self,
        store: RedisStore,
        config: DistributionConfig,
        name: str,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.worker_id = f"{name}/{uuid.uuid4().hex[:8]}-q{config.queues}"
        self.clock: Clock = clock or SystemClock()
        self.lease_ms = max(1, round(config.lease_s * 1000))
        self.workers_key = f"{{{config.namespace}:affinity}}:workers"
        self.home_keys = [home_key(config.namespace, q) for q in range(config.queues)]
        #: The queues this worker held at the last answered claim.
        self.held: set[int] = set()
        #: The home of each queue at the last answered claim ("" none).
        self.holders: list[str] = [""] * config.queues
        #: Until when (local monotonic) the leases of :attr:`held` are surely not lapsed.
        self.valid_until = -math.inf
        #: When (local monotonic) the first lease held by another worker, as the last
        #: answered call read it, lapses unless renewed (inf: none): the worker's loop
        #: looks again then, so a dead home's queues move within one lease of its death.
        self.lapse_at = math.inf

    def announce(self) -> list[str]:
        """Renew this worker's presence; the live workers' ids (this one included)."""
        return AFFINITY_PRESENCE.run(
            self.store, [self.workers_key], [self.worker_id, self.lease_ms, "1"]
        )

    def wanted(self, live: Sequence[str]) -> set[int]:
        """The queues this worker should be the home of, among ``live`` workers (those
        with another number of affinity queues left out: they compute other homes), each
        kept with its holder at the last answered claim while that one is live and
        within the cap (:func:`assign`)."""
        strangers = set(self.strangers(live))
        peers = [w for w in live if w not in strangers]
        return queues_of(self.worker_id, peers, self.config.queues, self.holders)

    def strangers(self, live: Sequence[str]) -> list[str]:
        """The ``live`` workers whose id says another ``fleet_affinity_queues`` than
        this worker's: a misconfigured fleet (their homes disagree with this worker's)."""
        mine = self.config.queues
        return [w for w in live if queues_in_id(w) not in (None, mine)]

    def peek(self) -> list[str]:
        """The live workers now, without announcing this one (read only)."""
        now_s, now_us = self.store.client.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        found = self.store.client.zrangebyscore(self.workers_key, now_ms, "+inf")
        return [w.decode() if isinstance(w, bytes) else str(w) for w in found]

    def claim(self, wanted: set[int], keep: set[int] | None = None) -> set[int]:
        """Take or renew the leases of ``wanted``; give up the others this worker holds,
        except those in ``keep`` (still consumed: the caller gives them up once its
        consumer stopped). Returns the queues this worker holds now."""
        keep = keep or set()
        flags = "".join(
            "1" if q in wanted else ("-" if q in keep else "0") for q in range(self.config.queues)
        )
        sent = self.clock.monotonic()
        self.lapse_at = math.inf  # unknown until the script answers
        holders = self._run(flags)
        self.holders = holders
        self.held = {q for q, owner in enumerate(holders) if owner == self.worker_id}
        # Redis (re)started the leases no earlier than the call was sent.
        self.valid_until = sent + self.config.lease_s * (1.0 - CLOCK_DRIFT)
        return set(self.held)

    def _run(self, flags: str) -> list[str]:
        """Run the homes script; the holders, and :attr:`lapse_at` from its last reply."""
        reply = AFFINITY_HOMES.run(
            self.store, self.home_keys, [self.worker_id, self.lease_ms, flags]
        )
        received = self.clock.monotonic()
        soonest_ms = int(reply[-1]) if len(reply) > self.config.queues else -1
        # The lease lapsed on Redis's clock no later than ``received + soonest``: look a
        # little after it, allowing for a local clock slower than Redis's.
        self.lapse_at = (
            received + soonest_ms / 1000.0 * (1.0 + CLOCK_DRIFT) + LAPSE_MARGIN_S
            if soonest_ms >= 0
            else math.inf
        )
        return list(reply[: self.config.queues])

    @property
    def live(self) -> bool:
        """True while the leases of :attr:`held` are surely not lapsed by the local clock."""
        return self.clock.monotonic() < self.valid_until

    def read_holders(self) -> list[str]:
        """The home of each queue now ("" none), changing nothing."""
        return self._run("-" * self.config.queues)

    def leave(self) -> None:
        """Give up every lease and withdraw this worker (it is stopping): its queues get
        their new homes at the peers' next round rather than after a lease."""
        self.valid_until = -math.inf
        self.held = set()
        self._run("0" * self.config.queues)
        self._presence("0")

    def _presence(self, announce: str) -> list[str]:
        return AFFINITY_PRESENCE.run(
            self.store, [self.workers_key], [self.worker_id, self.lease_ms, announce]
        )
