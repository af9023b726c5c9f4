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
    "CircuitOpen",
    "QualityDegraded",
    "QuotaExhausted",
    "StoreUnavailable",
    "LeaseLost",
    "LockLost",
    "LockNotAcquired",
    "StepError",
    "ThrottledTooLong",
    "attach_pushback",
    "attached_pushback",
]

#: Attribute of a library's exception carrying the fleet's :class:`Backpressure` for it.
_PUSHBACK_ATTR = "__celery_fleet_pushback__"


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
        # args are the constructor's arguments: Celery's JSON result serializer rebuilds
        # an exception as cls(*args), so the fields survive a round trip through a backend.
        super().__init__(limit, int(wait_ms), reason)
        self.limit = limit
        self.wait_ms = int(wait_ms)
        self.reason = reason

    def __str__(self) -> str:
        detail = f" ({self.reason})" if self.reason else ""
        return f"limit {self.limit!r} refused admission{detail}; retry in {self.wait_ms} ms"


class Throttled(Backpressure):
    """A rate, token or in-flight budget refused the call for longer than ``max_wait``.

    ``wait_ms`` is how long until the same request would be admitted (for the
    in-flight semaphore it is an estimate: nobody knows when a holder will finish).
    """


class ThrottledTooLong(Throttled):
    """A task ran out of patience: refused more often (``max_reschedules``) or for longer
    (``max_throttled`` seconds) than it allows. Not backpressure any more: the task fails.

    ``reschedules`` and ``throttled_s`` say how much waiting it had done; ``limit``,
    ``wait_ms`` and ``reason`` are those of the last refusal.
    """

    def __init__(
        self,
        limit: str,
        wait_ms: int,
        reason: str = "",
        reschedules: int = 0,
        throttled_s: float = 0.0,
    ) -> None:
        Exception.__init__(self, limit, int(wait_ms), reason, reschedules, throttled_s)
        self.limit = limit
        self.wait_ms = int(wait_ms)
        self.reason = reason
        self.reschedules = int(reschedules)
        self.throttled_s = float(throttled_s)

    def __str__(self) -> str:
        return (
            f"gave up on limit {self.limit!r} after {self.reschedules} reschedule(s) and "
            f"{self.throttled_s:.1f} s throttled (last refusal: {self.reason or 'refused'}, "
            f"retry in {self.wait_ms} ms); raise max_reschedules / max_throttled or the budget"
        )


class CircuitOpen(Backpressure):
    """The limit's circuit breaker is open (the dependency is failing): do not call it now.

    ``wait_ms`` is the time until the breaker lets one probe through; a FleetTask that
    sees it is rescheduled to then (plus jitter), not failed.
    """


class QualityDegraded(Backpressure):
    """The limit's quality breaker is open with ``on_degraded="pause"``: its provider answers,
    but with garbage. ``wait_ms`` is the time until the breaker half-opens; a FleetTask that
    sees it is rescheduled to then instead of spending its budget on garbage.
    """


class QuotaExhausted(FleetError):
    """The provider said the budget is gone for good: quota, spend cap, per-day limit.

    These 429s never clear in seconds, so nothing reschedules them: the call fails fast
    with the provider's own words in ``detail``.
    """

    def __init__(self, limit: str, detail: str = "") -> None:
        super().__init__(limit, detail)
        self.limit = limit
        self.detail = detail

    def __str__(self) -> str:
        return (
            f"limit {self.limit!r}: the provider's quota is exhausted, retrying will not help"
            + (f" ({self.detail})" if self.detail else "")
        )


class StoreUnavailable(FleetError):
    """The Redis that holds the fleet's shared state did not answer.

    ``url`` is the Redis URL (password masked) so the operator knows which one.
    ``dropped`` is True when an established connection was lost (a reset, ``CLIENT KILL``):
    the call may or may not have run, and a second try on a new connection may well work.
    """

    def __init__(self, url: str, cause: object = None, dropped: bool = False) -> None:
        super().__init__(url, str(cause) if cause else "")
        self.url = url
        self.cause = cause
        self.dropped = dropped

    def __str__(self) -> str:
        why = f": {self.cause}" if self.cause else ""
        return f"celery-fleet cannot reach Redis at {self.url}{why}"


class LeaseLost(FleetError):
    """A slot's lease is gone: the fleet may already have handed the slot to somebody else.

    Happens when the holder stalled longer than the lease TTL (SIGSTOP, a GIL-holding C
    call, a suspended VM: the renewal thread could not run) or when Redis forgot the lease
    and the cap had no room to put it back. A lease is not a fence: nothing stops the late
    holder's own call, so :meth:`Slot.ensure_held` before an expensive step, and ``settle``
    / ``observe`` (which raise this), are how a holder learns it lost its slot.
    """

    def __init__(self, limit: str, lease_id: str = "", why: str = "") -> None:
        super().__init__(limit, lease_id, why)
        self.limit = limit
        self.lease_id = lease_id
        self.why = why

    def __str__(self) -> str:
        why = f" ({self.why})" if self.why else ""
        return f"the lease {self.lease_id} of limit {self.limit!r} was lost{why}"


class StepError(ConfigError):
    """A durable step cannot be stored: a bad name, or a result that is not plain JSON data
    (or too large). Raised before the step's function runs whenever that can be known."""


class LockNotAcquired(FleetError):
    """A lock (or leadership) was not acquired: another owner holds it.

    Raised by ``lock.acquire(blocking=False)`` at once, and by a blocking acquire whose
    ``timeout`` passed. ``wait_ms`` is how long the current holder's lease lasts at most
    unless renewed (a holder that renews keeps it longer).
    """

    def __init__(self, name: str, wait_ms: int = 0, timeout_s: float | None = None) -> None:
        super().__init__(name, int(wait_ms), timeout_s)
        self.name = name
        self.wait_ms = int(wait_ms)
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        waited = f" within {self.timeout_s:g} s" if self.timeout_s else ""
        return (
            f"lock {self.name!r} was not acquired{waited}: another owner holds it "
            f"(its lease ends in {self.wait_ms} ms unless renewed)"
        )


class LockLost(FleetError):
    """A lock this process held is no longer its own: its lease lapsed (the process stalled
    past the TTL, or Redis was unreachable) and it may already belong to somebody else.

    Raised by ``lock.release()`` (nothing was released: the lock is not ours to release) and
    ``lock.ensure_held()``. ``token`` is the fencing token of the lost hold: a store that
    has seen a larger token for ``name`` must refuse writes carrying this one.
    """

    def __init__(self, name: str, token: int | None = None, why: str = "") -> None:
        super().__init__(name, token, why)
        self.name = name
        self.token = token
        self.why = why

    def __str__(self) -> str:
        why = f" ({self.why})" if self.why else ""
        return f"lock {self.name!r} (fencing token {self.token}) was lost{why}"


def attach_pushback(exc: BaseException, refusal: Backpressure) -> None:
    """Mark a library's exception as the provider's pushback the fleet already handled.

    For adapters that cannot raise the fleet's error themselves: a LiteLLM callback runs
    while LiteLLM raises its own ``RateLimitError``, and LiteLLM swallows what a callback
    raises. The mark lets a :class:`~celery_fleet.FleetTask` whose body let that
    exception escape reschedule on ``refusal`` instead of failing.

    Example::

        attach_pushback(rate_limit_error, Throttled("openai", 2000, "provider 429"))
    """
    try:
        setattr(exc, _PUSHBACK_ATTR, refusal)
    except (AttributeError, TypeError):  # an exception type without a __dict__
        pass


def attached_pushback(exc: BaseException) -> Backpressure | None:
    """The :class:`Backpressure` :func:`attach_pushback` put on ``exc``, else None."""
    refusal = getattr(exc, _PUSHBACK_ATTR, None)
    return refusal if isinstance(refusal, Backpressure) else None
