"""The local limiter: a process's share of every budget while the fleet's Redis is away.

:class:`LocalLimiter` is GCRA as in ``acquire.lua``, in this process's memory, at
``1/share`` of each window's rate; its in-flight cap is the process's *allotment* of the
fleet's cap (:func:`allotment`). It also remembers what it admitted, so that the shared
buckets can be charged with it when the fleet hands over to Redis again (:meth:`LocalLimiter.
owed`). :mod:`celery_fleet.resilience.fallback` decides when it is used.

This module knows nothing about Redis, nor about Celery.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..admission.config import TOKENS, LimitConfig, Window
from ..admission.decision import Decision

__all__ = ["LocalLimiter", "allotment", "fleet_cap", "LOCAL_POLL_MS"]

#: The longest a local in-flight refusal asks to wait before asking again (ms).
LOCAL_POLL_MS = 50


@dataclass
class _Bucket:
    """One limit's local state: a GCRA arrival time per window, and the local leases."""

    tats: list[float]
    #: Per window, the arrival time of the calls admitted here alone (no initial debt, no
    #: refusal): what is charged to the shared bucket at the hand-over.
    spent: list[float]
    leases: dict[str, int] = field(default_factory=dict)  # lease -> reserved tokens


class LocalLimiter:
    """Per-process admission at ``1/share`` of every budget of each limit (thread-safe).

    GCRA as in ``acquire.lua``, with each window's emission interval multiplied by
    ``share`` (the rate divided among the processes; among at most ``cap`` of them for a
    limit with an in-flight allotment, since only those with a slot can use it) and its
    tolerance kept (so the burst is divided too, but never below one call), and the
    in-flight cap: ``allotted[limit]`` when given (see :meth:`StoreDown.failed`), else
    ``max(1, cap // share)``.
    """

    def __init__(
        self,
        limits: Mapping[str, LimitConfig],
        share: int,
        held: Callable[[str], int] | None = None,
        allotted: Mapping[str, int] | None = None,
    ) -> None:
        self.limits = limits
        self.share = max(1, int(share))
        self.held = held
        #: In-flight cap per limit, slots still held through Redis included (may be 0).
        self.allotted = dict(allotted or {})
        # A limit with allotments is used by at most `cap` processes (the allotments sum to
        # the cap; one of 0 admits nothing): its rate is divided among min(share, cap).
        self._rate_share = {
            name: max(1, min(self.share, fleet_cap(limits[name]) or self.share))
            for name in self.allotted
        }
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    def cap(self, cfg: LimitConfig) -> int | None:
        """This process's in-flight cap for ``cfg`` (None: no cap): its allotment, else its
        share, at least one (with more processes than the cap and no fleet-wide count, the
        processes together may hold more: one each)."""
        cap = fleet_cap(cfg)
        if not cap:
            return None
        if cfg.name in self.allotted:
            return self.allotted[cfg.name]
        return max(1, cap // self.share)

    def rate_share(self, limit: str) -> int:
        """How many processes share ``limit``'s rates here: the share, or fewer when only
        the processes with an in-flight allotment can use them."""
        return self._rate_share.get(limit, self.share)

    def _window(self, w: Window, share: int) -> tuple[float, float]:
        """A window's local emission interval and tolerance (ms): the rate divided by the
        share, the burst too, but never below one unit (or nothing would ever pass)."""
        emission = w.emission_ms * share
        return emission, max(w.tolerance_ms, emission)

    def _bucket(self, cfg: LimitConfig, now_ms: float) -> _Bucket:
        bucket = self._buckets.get(cfg.name)
        if bucket is None:
            # Starts empty, its first unit a random part of one interval away: no burst the
            # rate did not earn, and the processes of the fleet, which all start their
            # buckets at the same moment, do not then ask in step.
            tats = []
            share = self.rate_share(cfg.name)
            for w in cfg.windows:
                emission, tolerance = self._window(w, share)
                tats.append(now_ms + tolerance - emission + random.random() * emission)
            bucket = _Bucket(tats, [0.0] * len(tats))
            self._buckets[cfg.name] = bucket
        return bucket

    def acquire(self, cfg: LimitConfig, tokens: int, lease_id: str, now_ms: float) -> Decision:
        """Admit (a ``local.`` lease) or refuse with the wait and reason, as Redis would."""
        with self._lock:
            bucket = self._bucket(cfg, now_ms)
            cap = self.cap(cfg)
            # Slots this process still holds through Redis (taken before the outage) count.
            in_flight = len(bucket.leases) + (self.held(cfg.name) if self.held else 0)
            if cap is not None and in_flight >= cap:
                return self._refused(cfg, tokens, LOCAL_POLL_MS, "in_flight", in_flight, now_ms)
            share = self.rate_share(cfg.name)
            new_tats = []
            for i, w in enumerate(cfg.windows):
                emission, tolerance = self._window(w, share)
                cost = tokens if w.dimension == TOKENS else 1
                tat = max(bucket.tats[i], now_ms)
                new_tat = tat + cost * emission
                allow_at = new_tat - tolerance
                if allow_at > now_ms:
                    wait = math.ceil(allow_at - now_ms)
                    return self._refused(cfg, tokens, wait, w.field, in_flight, now_ms)
                new_tats.append(new_tat)
            bucket.tats = new_tats
            for i, w in enumerate(cfg.windows):
                cost = tokens if w.dimension == TOKENS else 1
                bucket.spent[i] = max(bucket.spent[i], now_ms) + cost * self._window(w, share)[0]
            lease = f"local.{lease_id}"
            bucket.leases[lease] = tokens
            return Decision(cfg.name, True, 0, lease, "", in_flight + 1, tokens, now_ms)

    @staticmethod
    def _refused(
        cfg: LimitConfig, tokens: int, wait_ms: int, field_: str, in_flight: int, now_ms: float
    ) -> Decision:
        from ..admission.decision import _reason

        reason = _reason(field_)
        return Decision(cfg.name, False, wait_ms, None, reason, in_flight, tokens, now_ms)

    def release(self, limit: str, lease_id: str) -> bool:
        """Give a local lease back; False if this limiter did not hold it."""
        with self._lock:
            bucket = self._buckets.get(limit)
            return bucket is not None and bucket.leases.pop(lease_id, None) is not None

    def settle(self, cfg: LimitConfig, lease_id: str, actual: int) -> int:
        """Charge (or refund) the local token windows the difference from the reservation."""
        with self._lock:
            bucket = self._buckets.get(cfg.name)
            if bucket is None or lease_id not in bucket.leases:
                return 0
            delta = actual - bucket.leases[lease_id]
            bucket.leases[lease_id] = actual
            share = self.rate_share(cfg.name)
            for i, w in enumerate(cfg.windows):
                if w.dimension == TOKENS:
                    bucket.tats[i] += delta * w.emission_ms * share
                    bucket.spent[i] += delta * w.emission_ms * share
            return delta

    def owed(self, now_ms: float) -> dict[str, list[object]]:
        """What this process admitted locally that the shared buckets would still remember
        at ``now_ms``: per limit, ``charge.lua``'s arguments (window field, ms to move its
        arrival time), only for limits with something to charge.

        A local call cost ``rate_share`` emission intervals here and costs one in Redis,
        hence the division; at most one period plus the burst, as a settle is capped.
        """
        out: dict[str, list[object]] = {}
        with self._lock:
            for name, bucket in self._buckets.items():
                cfg = self.limits[name]
                share = self.rate_share(name)
                args: list[object] = []
                for i, w in enumerate(cfg.windows):
                    ms = max(0.0, bucket.spent[i] - now_ms) / share
                    ms = min(ms, w.tolerance_ms + w.period_s * 1000.0)
                    if ms > 0:
                        args += [w.field, repr(ms)]
                if args:
                    out[name] = args
        return out

    def in_flight(self, limit: str) -> int:
        with self._lock:
            bucket = self._buckets.get(limit)
            return len(bucket.leases) if bucket else 0

    def leases(self, limit: str) -> list[tuple[str, int]]:
        """The local leases of ``limit`` held now, with their reserved tokens."""
        with self._lock:
            bucket = self._buckets.get(limit)
            return list(bucket.leases.items()) if bucket else []


def fleet_cap(cfg: LimitConfig) -> int:
    """The fleet-wide in-flight cap of ``cfg`` (0: none): ``max_in_flight``, else the
    adaptive limit's initial cap."""
    cap = cfg.max_in_flight or (cfg.adaptive.initial_in_flight if cfg.adaptive else 0)
    return int(cap)


def allotment(
    cap: int, fleet_in_flight: int, held: int, share: int, rank: int | None = None
) -> int:
    """A process's in-flight cap for an outage: the ``held`` slots it holds through Redis
    plus its ``1/share`` of the slots the fleet left free (``cap - fleet_in_flight``), one
    more of the remainder when its ``rank`` among the processes is below it.

    Summed over the processes this never exceeds the cap, however the fleet's slots were
    spread: each keeps what it holds and the free ones are divided (the remainder by rank,
    so with more processes than free slots, those slots still serve one process each). A
    process that held none while the cap was full gets none until Redis answers again
    (backpressure), where a plain share would put the fleet over its cap by the slots the
    others still hold.
    """
    share = max(1, share)
    free = max(0, cap - fleet_in_flight)
    extra = 1 if rank is not None and rank % share < free % share else 0
    # Never above the cap: more would mean the count is older than the slots held.
    return min(cap, held + free // share + extra)
