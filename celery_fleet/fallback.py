"""When the fleet's Redis does not answer: the store-down policy and the local limiter.

A limiter that blocks the whole fleet when its store is away is worse than the herd it
prevents. :class:`StoreDown` decides, per process, what an admission does while the
fleet's Redis is unreachable (``fleet_store_down``):

``"local"`` (default)
    Keep admitting through a per-process :class:`LocalLimiter` sized to this process's
    fair share of every budget: each window's rate divided by the number of fleet
    processes (``fleet_expected_processes``, else the number of live fleet processes the
    fleet last recorded in Redis, see :mod:`celery_fleet.presence`), the in-flight cap
    likewise (at least one per process, so every process progresses; slots it still holds
    through Redis count). Its buckets start empty, each at a random point of its first
    interval: a burst the shared bucket may already have spent is not granted again, and the
    processes, which all lose Redis at the same moment, do not ask in step.
``"open"``
    Admit everything: the dependency's own limits are the only ones left.
``"closed"``
    Refuse with reason ``"store_down"``: backpressure, so a task reschedules with backoff.

The first failure of an outage is logged once (a warning naming the policy and the share);
during the outage the store is asked again at most every :data:`RETRY_S` seconds (one
caller at a time asks, the others use the policy meanwhile, so a frozen Redis does not
cost every call a socket timeout), and the first answer ends the outage (logged once).

Leases the local limiter (or ``"open"``) hands out are named ``local.<id>`` / ``open.<id>``
and never reach Redis: their release, settle and renewal are local.

This module knows nothing about Celery.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .config import TOKENS, LimitConfig, Window
from .decision import Decision
from .errors import ConfigError

__all__ = ["StoreDown", "LocalLimiter", "POLICIES", "RETRY_S", "is_local_lease"]

log = logging.getLogger("celery_fleet")

#: What an admission does while the fleet's Redis is unreachable (``fleet_store_down``).
POLICIES = ("local", "open", "closed")
#: During an outage the store is asked again at most this often (seconds).
RETRY_S = 1.0
#: The wait a ``"closed"`` refusal reports (ms): a guess, so a task backs off with jitter.
CLOSED_WAIT_MS = 1000
#: The longest a local in-flight refusal asks to wait before asking again (ms).
LOCAL_POLL_MS = 50
#: Prefixes of leases that live only in this process.
LOCAL_PREFIXES = ("local.", "open.")


def is_local_lease(lease_id: object) -> bool:
    """True for a lease the store-down policy handed out (it never reached Redis)."""
    return isinstance(lease_id, str) and lease_id.startswith(LOCAL_PREFIXES)


def check_policy(policy: object, setting: str = "fleet_store_down") -> str:
    """``policy`` if it is one of :data:`POLICIES`, else :class:`ConfigError`."""
    if policy not in POLICIES:
        raise ConfigError(f"{setting} must be one of {POLICIES}, got {policy!r}")
    return str(policy)


@dataclass
class _Bucket:
    """One limit's local state: a GCRA arrival time per window, and the local leases."""

    tats: list[float]
    leases: dict[str, int] = field(default_factory=dict)  # lease -> reserved tokens


class LocalLimiter:
    """Per-process admission at ``1/share`` of every budget of each limit (thread-safe).

    GCRA as in ``acquire.lua``, with each window's emission interval multiplied by
    ``share`` (the rate divided among the processes) and its tolerance kept (so the burst
    is divided too, but never below one call), and the in-flight cap
    ``max(1, cap // share)``.
    """

    def __init__(
        self,
        limits: Mapping[str, LimitConfig],
        share: int,
        held: Callable[[str], int] | None = None,
    ) -> None:
        self.limits = limits
        self.share = max(1, int(share))
        self.held = held
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    def cap(self, cfg: LimitConfig) -> int:
        """This process's in-flight cap for ``cfg`` (0: no cap): its share, at least one
        (with more processes than the cap, the processes together may hold more: one each)."""
        cap = cfg.max_in_flight or (cfg.adaptive.initial_in_flight if cfg.adaptive else 0)
        return max(1, int(cap) // self.share) if cap else 0

    def _window(self, w: Window) -> tuple[float, float]:
        """A window's local emission interval and tolerance (ms): the rate divided by the
        share, the burst too, but never below one unit (or nothing would ever pass)."""
        emission = w.emission_ms * self.share
        return emission, max(w.tolerance_ms, emission)

    def _bucket(self, cfg: LimitConfig, now_ms: float) -> _Bucket:
        bucket = self._buckets.get(cfg.name)
        if bucket is None:
            # Starts empty, its first unit a random part of one interval away: no burst the
            # rate did not earn, and the processes of the fleet, which all start their
            # buckets at the same moment, do not then ask in step.
            tats = []
            for w in cfg.windows:
                emission, tolerance = self._window(w)
                tats.append(now_ms + tolerance - emission + random.random() * emission)
            bucket = _Bucket(tats)
            self._buckets[cfg.name] = bucket
        return bucket

    def acquire(self, cfg: LimitConfig, tokens: int, lease_id: str, now_ms: float) -> Decision:
        """Admit (a ``local.`` lease) or refuse with the wait and reason, as Redis would."""
        with self._lock:
            bucket = self._bucket(cfg, now_ms)
            cap = self.cap(cfg)
            # Slots this process still holds through Redis (taken before the outage) count.
            in_flight = len(bucket.leases) + (self.held(cfg.name) if self.held else 0)
            if cap and in_flight >= cap:
                return self._refused(cfg, tokens, LOCAL_POLL_MS, "in_flight", in_flight, now_ms)
            new_tats = []
            for i, w in enumerate(cfg.windows):
                emission, tolerance = self._window(w)
                cost = tokens if w.dimension == TOKENS else 1
                tat = max(bucket.tats[i], now_ms)
                new_tat = tat + cost * emission
                allow_at = new_tat - tolerance
                if allow_at > now_ms:
                    wait = math.ceil(allow_at - now_ms)
                    return self._refused(cfg, tokens, wait, w.field, in_flight, now_ms)
                new_tats.append(new_tat)
            bucket.tats = new_tats
            lease = f"local.{lease_id}"
            bucket.leases[lease] = tokens
            return Decision(cfg.name, True, 0, lease, "", in_flight + 1, tokens, now_ms)

    @staticmethod
    def _refused(
        cfg: LimitConfig, tokens: int, wait_ms: int, field_: str, in_flight: int, now_ms: float
    ) -> Decision:
        from .decision import _reason

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
            for i, w in enumerate(cfg.windows):
                if w.dimension == TOKENS:
                    bucket.tats[i] += delta * w.emission_ms * self.share
            return delta

    def in_flight(self, limit: str) -> int:
        with self._lock:
            bucket = self._buckets.get(limit)
            return len(bucket.leases) if bucket else 0


class StoreDown:
    """This process's view of the fleet's Redis, and what admission does without it.

    ``share`` returns how many processes share the budgets now (called once per outage).
    """

    def __init__(
        self,
        policy: str,
        limits: Mapping[str, LimitConfig],
        share: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
        held: Callable[[str], int] | None = None,
        restarted: Callable[[], bool] | None = None,
    ) -> None:
        self.policy = check_policy(policy)
        self.limits = limits
        self.share = share
        #: How many slots of a limit this process holds through Redis (they count locally).
        self.held = held
        #: Whether Redis restarted during the outage (then its lost windows start empty).
        self.restarted = restarted
        self.clock = clock
        self.local = LocalLimiter(limits, 1)
        self._lock = threading.Lock()
        #: Monotonic time the current outage began (None: Redis answers).
        self.down_since: float | None = None
        self._retry_at = 0.0
        #: Outages this process has seen (a counter for metrics and tests).
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def skip_store(self) -> bool:
        """True while the store should not be asked (an outage, and not yet time to retry).

        When it is time, exactly one caller gets False (and asks); the others keep using
        the policy until that ask is answered or fails.
        """
        if self.down_since is None:
            return False
        now = self.clock()
        with self._lock:
            if now < self._retry_at:
                return True
            self._retry_at = now + RETRY_S
            return False

    def failed(self, error: Exception) -> None:
        """The store did not answer: start an outage (logged once) or extend it."""
        now = self.clock()
        with self._lock:
            self._retry_at = now + RETRY_S
            if self.down_since is not None:
                return
            share = max(1, int(self.share()))
            held = self.local._buckets  # local leases still held from an earlier outage
            self.local = LocalLimiter(self.limits, share, self.held)
            for limit, bucket in held.items():
                if bucket.leases:
                    now_ms = time.time() * 1000.0
                    self.local._bucket(self.limits[limit], now_ms).leases.update(bucket.leases)
            self.down_since = now
            self.outages += 1
        how = {
            "local": f"admitting locally at 1/{share} of each budget (fleet_store_down='local')",
            "open": "admitting every call (fleet_store_down='open')",
            "closed": "refusing every call as backpressure (fleet_store_down='closed')",
        }[self.policy]
        log.warning("celery-fleet: the fleet's Redis is unreachable (%s); %s", error, how)

    def answered(self) -> bool:
        """The store answered: end the outage, if there was one (logged once). True when
        this call ended one."""
        if self.down_since is None:
            return False
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is None:
            return False
        log.warning(
            "celery-fleet: the fleet's Redis answers again after %.1f s; admission is shared again",
            self.clock() - since,
        )
        return True

    def admit(self, cfg: LimitConfig, tokens: int, lease_id: str) -> Decision:
        """The policy's answer to one admission while the store is away."""
        now_ms = time.time() * 1000.0
        if self.policy == "open":
            return Decision(cfg.name, True, 0, f"open.{lease_id}", "", 0, tokens, now_ms)
        if self.policy == "closed":
            return Decision(cfg.name, False, CLOSED_WAIT_MS, None, "store_down", 0, tokens, now_ms)
        return self.local.acquire(cfg, tokens, lease_id, now_ms)

    def release(self, limit: str, lease_id: str) -> bool:
        """Give back a lease the policy handed out (local leases only count)."""
        if lease_id.startswith("open."):
            return True
        return self.local.release(limit, lease_id)

    def settle(self, cfg: LimitConfig, lease_id: str, actual: int) -> int:
        if lease_id.startswith("open."):
            return 0
        return self.local.settle(cfg, lease_id, actual)
