"""Which store answers an admission: the fleet's Redis, or this process while it is away.

Every caller that meets an unanswered Redis call (an ask, a release, a settle, a renewal,
a wait for a wake-up) hands the error to one :class:`StoreStrategy` instead of deciding
for itself, and asks it whether a lease is one it handed out. Two strategies exist:

:class:`RedisOnly`
    Redis answers or the caller gets :class:`~celery_fleet.errors.StoreUnavailable`: an
    :class:`~celery_fleet.admission.core.Admission` made without a store-down policy.
:class:`~celery_fleet.resilience.fallback.StoreDown`
    Redis while it answers, the ``fleet_store_down`` policy (the local limiter, ``open`` or
    ``closed``) from its first failure until the fleet's hand-over back to Redis.

Like pybreaker's ``CircuitBreakerStorage``, the outage is a property of the store, not a
check in each caller. The healthy path reads one attribute (:attr:`StoreStrategy.down`)
per decision and calls nothing else.

Example::

    admission = Admission(store, limits)            # RedisOnly: StoreUnavailable raises
    admission = Admission(store, limits, namespace, StoreDown("local", limits, share))

This module knows nothing about Celery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..admission.config import LimitConfig
from ..admission.decision import Decision
from ..errors import StoreUnavailable
from ..store.calls import Steps

if TYPE_CHECKING:
    from .fallback import _Admission

__all__ = ["StoreStrategy", "RedisOnly"]


class StoreStrategy(Protocol):
    """What admission asks about the store (see the module docstring)."""

    #: False: an unanswered call raises to the caller (no store-down policy).
    fallback: bool

    @property
    def down(self) -> bool:
        """True while admission is answered by this process, not Redis (hot path: read once
        per decision)."""
        ...

    @property
    def unreachable(self) -> bool:
        """True while Redis is away and not found back (a release is owed, not sent)."""
        ...

    def back_steps(self, admission: _Admission) -> Steps[bool]:
        """While :attr:`down`: whether this ask may go to Redis (True) or not (False)."""
        ...

    def admit(self, cfg: LimitConfig, tokens: int, lease_id: str) -> Decision:
        """The answer to an ask Redis cannot give now."""
        ...

    def owns(self, lease_id: object) -> bool:
        """True for a lease this strategy handed out: it never reached Redis, and its
        release, settle and renewal stay in this process."""
        ...

    def release(self, limit: str, lease_id: str) -> bool:
        """Give back a lease :meth:`owns` says is this strategy's."""
        ...

    def settle(self, cfg: LimitConfig, lease_id: str, actual: int) -> int:
        """Settle a lease :meth:`owns` says is this strategy's; the delta charged."""
        ...

    def failed(self, error: StoreUnavailable) -> None:
        """Redis did not answer a call whose caller carries on without it (a background
        renewal, a release that is owed): note the outage."""
        ...

    def cover(self, error: StoreUnavailable) -> None:
        """Redis did not answer a call its caller needs: note the outage and return (the
        caller then answers by the policy), or raise ``error`` when there is no policy."""
        ...

    def saw(
        self, limit: str, in_flight: int, admitted: bool, redis_ms: float | None = None
    ) -> None:
        """Redis answered an ask of ``limit`` with the fleet's ``in_flight`` count at
        ``redis_ms`` (Redis's clock, when known)."""
        ...

    def answered(self) -> bool:
        """Redis answered a call that is not an ask (a renewal, the presence record)."""
        ...


class RedisOnly:
    """The strategy without a store-down policy: Redis answers every call, or the caller
    gets :class:`~celery_fleet.errors.StoreUnavailable`.

    Example::

        Admission(RedisStore(url), limits).try_acquire("llm")  # raises while Redis is away
    """

    fallback = False
    down = False
    unreachable = False

    def back_steps(self, admission: _Admission) -> Steps[bool]:
        return True
        yield  # a generator, like every strategy's (never reached: never down)

    def admit(self, cfg: LimitConfig, tokens: int, lease_id: str) -> Decision:
        raise AssertionError("RedisOnly never answers an ask itself")  # pragma: no cover

    @staticmethod
    def owns(lease_id: object) -> bool:
        return False

    def release(self, limit: str, lease_id: str) -> bool:
        raise AssertionError("RedisOnly hands out no lease")  # pragma: no cover

    def settle(self, cfg: LimitConfig, lease_id: str, actual: int) -> int:
        raise AssertionError("RedisOnly hands out no lease")  # pragma: no cover

    def failed(self, error: StoreUnavailable) -> None:
        """Nothing to note: without a policy there is no outage to follow."""

    def cover(self, error: StoreUnavailable) -> None:
        raise error

    def saw(
        self, limit: str, in_flight: int, admitted: bool, redis_ms: float | None = None
    ) -> None:
        """Nothing to keep: no outage will need the count."""

    def answered(self) -> bool:
        return False
