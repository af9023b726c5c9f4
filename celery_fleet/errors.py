"""The exceptions celery-fleet raises, all rooted at :class:`FleetError`.

Each carries the fields a caller needs to act on it (``limit``, ``wait_ms``, ``url``)
so that nobody has to parse a message string.
"""

from __future__ import annotations

__all__ = [
    "FleetError",
    "ConfigError",
    "Backpressure",
    "Throttled",
    "StoreUnavailable",
    "LeaseLost",
]


class FleetError(Exception):
    """Base class of every error celery-fleet raises on purpose."""


class ConfigError(FleetError, ValueError):
    """A setting, decorator option or call argument is invalid.

    Raised as early as possible (``Fleet(...)``, decoration, publish) and names the
    setting and the bad value, so a typo fails at import time rather than at 02:00.
    """


class Backpressure(FleetError):
    """The fleet must not call ``limit`` now; try again in ``wait_ms``.

    The common base of :class:`Throttled` (and, later, an open circuit): a
    :class:`~celery_fleet.FleetTask` that sees one escape its body reschedules
    itself instead of failing.
    """

    def __init__(self, limit: str, wait_ms: int, reason: str = "") -> None:
        self.limit = limit
        self.wait_ms = int(wait_ms)
        self.reason = reason
        detail = f" ({reason})" if reason else ""
        super().__init__(f"limit {limit!r} refused admission{detail}; retry in {self.wait_ms} ms")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Celery pickles/serialises exceptions into results; keep the fields.
        return (type(self), (self.limit, self.wait_ms, self.reason))


class Throttled(Backpressure):
    """A rate, token or in-flight budget refused the call for longer than ``max_wait``.

    ``wait_ms`` is how long until the same request would be admitted (for the
    in-flight semaphore it is an estimate: nobody knows when a holder will finish).
    """


class StoreUnavailable(FleetError):
    """The Redis that holds the fleet's shared state did not answer.

    ``url`` is the Redis URL (password masked) so the operator knows which one.
    """

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        self.url = url
        self.cause = cause
        why = f": {cause}" if cause else ""
        super().__init__(f"celery-fleet cannot reach Redis at {url}{why}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.url, None))


class LeaseLost(FleetError):
    """A slot's lease expired before it was released or settled.

    Happens when a process stalls longer than the lease TTL (the renewal thread
    could not run): the fleet already handed the slot to somebody else.
    """
