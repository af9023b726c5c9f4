"""Admission for the provider simulator: RPM and TPM buckets and an in-flight count, one lock.

A request is checked against every dimension before anything is taken, so a request
refused by any of them consumes nothing (the brief's rule; it also keeps the
simulator's accounting easy to verify from the outside).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .buckets import TokenBucket
from .phases import Limits

__all__ = ["Bucket", "Decision", "Limiter"]

REQUESTS, TOKENS, CONCURRENCY = "requests", "tokens", "concurrency"


@dataclass(frozen=True)
class Bucket:
    """What one rate dimension looked like when a request was decided (for headers and messages)."""

    limit: float
    capacity: float
    remaining: float
    reset_s: float


@dataclass(frozen=True)
class Decision:
    """The verdict on one request.

    ``limit`` names the refusing dimension (``"requests"``, ``"tokens"`` or
    ``"concurrency"``) when several refuse, the one with the longest wait, since the
    request needs all of them; ``wait_s`` is that wait (``inf``: the cost exceeds the
    bucket's capacity and can never pass). ``in_flight`` is the count at arrival, before
    this request. ``buckets`` holds the RPM/TPM state after the decision, keyed by dimension.
    """

    admitted: bool
    limit: str | None
    wait_s: float
    in_flight: int
    buckets: dict[str, Bucket] = field(default_factory=dict)


class Limiter:
    """RPM, TPM and max-in-flight enforced independently, thread-safe.

    The limits in force are passed with every call, so phases and
    ``ProviderSim.set_limits`` only have to compute them; the buckets follow a change
    from the moment it is seen (see :meth:`TokenBucket.set_limit`). A dimension that
    becomes unlimited drops its bucket; when limited again it starts full.

    Example::

        limiter = Limiter(burst_s=60.0, concurrency_retry_s=0.1)
        d = limiter.admit(cost=300, limits=Limits(rpm=600, tpm=90_000, max_in_flight=8), now=0.0)
        if d.admitted:
            ...  # serve, then
            limiter.release()
    """

    def __init__(self, *, burst_s: float = 60.0, concurrency_retry_s: float = 0.1) -> None:
        self.burst_s = burst_s
        self.concurrency_retry_s = concurrency_retry_s
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket | None] = {REQUESTS: None, TOKENS: None}
        self.in_flight = 0

    def _sync(self, limits: Limits, now: float) -> None:
        for dim, limit in ((REQUESTS, limits.rpm), (TOKENS, limits.tpm)):
            bucket = self._buckets[dim]
            if limit is None:
                self._buckets[dim] = None
            elif bucket is None:
                self._buckets[dim] = TokenBucket(limit, burst_s=self.burst_s, now=now)
            elif bucket.limit_per_min != limit:
                bucket.set_limit(limit, now)

    def _snapshot(self, now: float) -> dict[str, Bucket]:
        return {
            dim: Bucket(b.limit_per_min, b.capacity, b.remaining(now), b.reset_s(now))
            for dim, b in self._buckets.items()
            if b is not None
        }

    def admit(self, cost: float, limits: Limits, now: float) -> Decision:
        """Admit a request costing ``cost`` tokens and one request, or say what refuses, how long.

        An admitted request is in flight until :meth:`release` is called.
        """
        with self._lock:
            self._sync(limits, now)
            in_flight = self.in_flight
            waits: dict[str, float] = {}
            if limits.max_in_flight is not None and in_flight >= limits.max_in_flight:
                waits[CONCURRENCY] = self.concurrency_retry_s
            for dim, amount in ((REQUESTS, 1.0), (TOKENS, float(cost))):
                bucket = self._buckets[dim]
                wait = bucket.wait_s(amount, now) if bucket is not None else 0.0
                if wait > 0:
                    waits[dim] = wait
            if waits:
                # max() keeps the first of equal waits: concurrency, then requests, then tokens.
                refused_by = max(waits, key=lambda dim: waits[dim])
                return Decision(
                    False, refused_by, waits[refused_by], in_flight, self._snapshot(now)
                )
            for dim, amount in ((REQUESTS, 1.0), (TOKENS, float(cost))):
                bucket = self._buckets[dim]
                if bucket is not None:
                    bucket.take(amount, now)
            self.in_flight += 1
            return Decision(True, None, 0.0, in_flight, self._snapshot(now))

    def release(self) -> None:
        """End one admitted request's time in flight."""
        with self._lock:
            self.in_flight -= 1

    def refill(self) -> None:
        """Forget all bucket state: every limited dimension starts full at the next request."""
        with self._lock:
            self._buckets = {REQUESTS: None, TOKENS: None}
