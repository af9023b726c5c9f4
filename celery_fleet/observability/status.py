"""What each limit looks like right now, read from Redis only (no worker needed).

:func:`limit_status` gathers one limit's fleet-wide state into a :class:`LimitStatus`:

- each window's budget left *now*, from its GCRA arrival time in the ``ctl`` hash: the
  script admits ``n`` units while ``tat + n*T - tau <= now``, so ``floor((now + tau -
  max(tat, now)) / T)`` units fit (T stretched by the rate factor in force);
- the live leases (in flight) against the cap in force (the adaptive cap when there is
  one) and the age of the oldest (its acquire time is in its name);
- the adaptive cap and rate factor, a provider pause still running, the breaker, and how
  many callers wait in line.

The ``celery fleet`` command (:mod:`celery_fleet.observability.cli`) prints it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..admission.breaker import BreakerState
    from ..admission.config import LimitConfig
    from ..admission.decision import LimitKeys

__all__ = ["LimitStatus", "StatusSource", "WindowStatus", "fleet_status", "limit_status"]

#: At most this many leases are read to find the oldest (a cap of 10**6 stays cheap).
OLDEST_SCAN = 1000


@dataclass(frozen=True)
class WindowStatus:
    """One window: ``budget`` as configured, ``left`` units admissible now, ``full`` the
    most it can hold (its burst) at the rate factor in force."""

    window: str
    left: int
    full: int


@dataclass(frozen=True)
class LimitStatus:
    """One limit's fleet-wide state (see the module docstring)."""

    limit: str
    windows: list[WindowStatus] = field(default_factory=list)
    in_flight: int = 0
    cap: int | None = None
    oldest_lease_s: float | None = None
    adaptive_cap: float | None = None
    rate_factor: float | None = None
    paused_s: float = 0.0
    breaker: str | None = None
    breaker_forced: str | None = None
    breaker_retry_s: float = 0.0
    waiting: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Limits(Protocol):
    """What status reads of :class:`~celery_fleet.admission.core.Admission`."""

    def limit(self, name: str) -> LimitConfig: ...

    def keys(self, name: str) -> LimitKeys: ...


class _Commands(Protocol):
    """A store that sends one Redis command (:meth:`RedisStore.call`)."""

    def call(self, command: str, *args: Any) -> Any: ...


class _BreakerReader(Protocol):
    def state(self) -> BreakerState: ...


class StatusSource(Protocol):
    """What :func:`limit_status` reads of a :class:`~celery_fleet.Fleet`: the limits
    configured, their keys, the store to read them from, and each limit's breaker.

    Read-only members, so any object holding them fits (a Fleet, a test's stand-in)."""

    @property
    def admission(self) -> _Limits: ...

    @property
    def store(self) -> _Commands: ...

    @property
    def limits(self) -> Mapping[str, LimitConfig]: ...

    def breaker(self, name: str) -> _BreakerReader: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def limit_status(fleet: StatusSource, name: str) -> LimitStatus:
    """The state of limit ``name`` of ``fleet`` (a :class:`~celery_fleet.Fleet`) now: a few
    round trips, never on the hot path."""
    cfg = fleet.admission.limit(name)
    keys = fleet.admission.keys(name)
    store = fleet.store
    seconds, micros = store.call("TIME")
    now_ms = int(seconds) * 1000 + int(micros) / 1000
    raw = store.call("HGETALL", keys.ctl) or {}
    ctl = {_text(k): _text(v) for k, v in raw.items()}

    def num(key: str) -> float | None:
        try:
            return float(ctl[key])
        except (KeyError, ValueError):
            return None

    factor = 1.0
    if cfg.adaptive is not None and num("rate_factor") is not None:
        factor = num("rate_factor") or 1.0
    provider = num("provider_factor")
    if provider is not None and (num("provider_factor_until") or 0) > now_ms:
        factor = min(factor, provider)
    factor = min(1.0, max(0.01, factor)) if factor > 0 else 1.0
    windows = []
    for w in cfg.windows:
        step, tau = w.emission_ms / factor, w.tolerance_ms
        tat = max(num(w.field) or now_ms, now_ms)
        windows.append(
            WindowStatus(
                w.describe(),
                left=max(0, math.floor((now_ms + tau - tat) / step)),
                full=max(0, math.floor(tau / step)),
            )
        )
    live = store.call("ZRANGEBYSCORE", keys.leases, f"({now_ms}", "+inf", "LIMIT", 0, OLDEST_SCAN)
    acquired = [int(_text(m).split(".", 1)[0]) for m in live or [] if _text(m)[:1].isdigit()]
    in_flight = int(store.call("ZCOUNT", keys.leases, f"({now_ms}", "+inf"))
    adaptive_cap = None
    if cfg.adaptive is not None:  # before the first admission the script starts from this
        adaptive_cap = num("cap") or float(cfg.adaptive.initial_in_flight)
    cap = cfg.max_in_flight
    if adaptive_cap is not None:  # as the script does: the smaller of the two
        learned = max(1, math.floor(adaptive_cap))
        cap = learned if cap is None else min(cap, learned)
    breaker = fleet.breaker(name).state() if cfg.breaker is not None else None
    pause = num("pause_until") or 0.0
    return LimitStatus(
        limit=name,
        windows=windows,
        in_flight=in_flight,
        cap=cap,
        oldest_lease_s=round((now_ms - min(acquired) / 1000) / 1000, 3) if acquired else None,
        adaptive_cap=adaptive_cap,
        rate_factor=(num("rate_factor") or 1.0) if cfg.adaptive is not None else None,
        paused_s=round(max(0.0, pause - now_ms) / 1000, 3),
        breaker=breaker.state if breaker else None,
        breaker_forced=breaker.forced if breaker else None,
        breaker_retry_s=round(breaker.retry_in_ms / 1000, 3) if breaker else 0.0,
        waiting=int(store.call("ZCARD", keys.line)),
    )


def fleet_status(fleet: StatusSource, names: list[str] | None = None) -> list[LimitStatus]:
    """:func:`limit_status` of each limit named (default: every configured limit)."""
    return [limit_status(fleet, n) for n in (names or sorted(fleet.limits))]
