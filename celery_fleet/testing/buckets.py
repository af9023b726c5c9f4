"""The continuous-refill token bucket the provider simulator enforces RPM and TPM with.

Kept apart from the HTTP server so the arithmetic can be read (and tested) on its own,
with time passed in explicitly rather than read from a clock.
"""

from __future__ import annotations

import math

__all__ = ["TokenBucket"]

# Tolerance for float drift: a retry at exactly the advertised ``retry-after-ms`` must pass.
_EPSILON = 1e-9


class TokenBucket:
    """A token bucket refilled continuously at ``limit_per_min / 60`` per second.

    This is how OpenAI (and the cookbook's parallel processor) model a per-minute limit:
    the capacity is one minute's budget by default, so a fresh bucket admits a full
    minute's worth at once and then settles to the steady rate. ``burst_s`` shrinks or
    grows the capacity to ``limit_per_min * burst_s / 60`` without changing the rate.

    Time is a float in seconds supplied by the caller (``now``), so the bucket never
    reads a clock itself.

    Example::

        bucket = TokenBucket(60, burst_s=5, now=0.0)   # capacity 5, refill 1/s
        assert bucket.wait_s(5, now=0.0) == 0.0
        bucket.take(5, now=0.0)
        assert bucket.wait_s(1, now=0.0) == 1.0
    """

    def __init__(self, limit_per_min: float, *, burst_s: float = 60.0, now: float = 0.0) -> None:
        if not limit_per_min > 0:
            raise ValueError(f"limit_per_min must be > 0, got {limit_per_min!r}")
        if not burst_s > 0:
            raise ValueError(f"burst_s must be > 0, got {burst_s!r}")
        self.burst_s = float(burst_s)
        self.limit_per_min = float(limit_per_min)
        self.tokens = self.capacity
        self.updated = now

    @property
    def capacity(self) -> float:
        """Most tokens the bucket holds: ``limit_per_min * burst_s / 60``."""
        return self.limit_per_min * self.burst_s / 60.0

    @property
    def rate_per_s(self) -> float:
        """Tokens added per second."""
        return self.limit_per_min / 60.0

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
            self.updated = now

    def remaining(self, now: float) -> float:
        """Tokens available at ``now``."""
        self._refill(now)
        return self.tokens

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` tokens are available: 0 if now, ``inf`` if ``cost > capacity``."""
        self._refill(now)
        if cost <= self.tokens + _EPSILON:
            return 0.0
        if cost > self.capacity + _EPSILON:
            return math.inf
        return (cost - self.tokens) / self.rate_per_s

    def take(self, cost: float, now: float) -> None:
        """Remove ``cost`` tokens; the caller has checked :meth:`wait_s` is 0."""
        self._refill(now)
        self.tokens = max(0.0, self.tokens - cost)

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again (OpenAI's ``x-ratelimit-reset-*``)."""
        self._refill(now)
        return (self.capacity - self.tokens) / self.rate_per_s

    def set_limit(self, limit_per_min: float, now: float) -> None:
        """Change the rate (and so the capacity) from ``now`` on.

        Tokens already earned are kept but clipped to the new capacity: raising a limit
        does not hand out a burst, lowering it takes effect at once.
        """
        if not limit_per_min > 0:
            raise ValueError(f"limit_per_min must be > 0, got {limit_per_min!r}")
        self._refill(now)
        self.limit_per_min = float(limit_per_min)
        self.tokens = min(self.tokens, self.capacity)
