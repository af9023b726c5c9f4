"""What each limit looks like right now, read from Redis only (no worker needed).

:func:`limit_status` gathers one limit's fleet-wide state into a :class:`LimitStatus` in
one round trip, through the read-only ``peek`` script (``scripts/admission/peek.lua``).
It is built from the same Lua parts the admission script decides with, so the figures
are what an ask would meet, computed once, in Redis:

- each window's budget left *now* (how many units GCRA would admit, at the rate factor
  in force) and the most it can hold (its burst);
- the live leases (in flight) against the cap in force (the adaptive cap when there is
  one) and the age of the oldest (its acquire time is in its name);
- the adaptive cap and rate factor, a provider pause still running, the breaker, and how
  many callers wait in line;
- a limit with capacity discovery (``"discover"``): the rate factor in force against the
  declared rate (above 1: what the fleet found the provider allows) and its ``up_to``;
- each priority lane's share: its leases in flight (a lease's lane is in its name) and its
  tickets in line, read in the same round trip.
- a limit with keys (tenants): its busiest keys, each with its calls in flight and its
  callers in line (read from the leases and the line, in the same round trip).

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

from ..admission.decision import acquire_args
from ..store.specs import PEEK

__all__ = [
    "KeyStatus",
    "LaneStatus",
    "LimitStatus",
    "StatusSource",
    "WindowStatus",
    "fields_text",
    "fleet_status",
    "limit_status",
]

#: At most this many leases are read to find the oldest (a cap of 10**6 stays cheap).
OLDEST_SCAN = 1000
#: A limit with keys shows this many of its busiest keys.
BUSIEST_KEYS = 10


@dataclass(frozen=True)
class KeyStatus:
    """One key of a limit with keys: ``key`` as its callers wrote it ("" for callers
    without a key; its hash when its state has expired), calls in flight, callers in line."""

    key: str
    in_flight: int
    waiting: int


@dataclass(frozen=True)
class WindowStatus:
    """One window: ``budget`` as configured, ``left`` units admissible now, ``full`` the
    most it can hold (its burst) at the rate factor in force."""

    window: str
    left: int
    full: int


@dataclass(frozen=True)
class LaneStatus:
    """One priority lane of a limit: ``in_flight`` its live leases (of the first
    ``OLDEST_SCAN`` read), ``waiting`` its tickets in line, ``cap`` the most it may hold
    (its usable share of the cap in force; None without a cap), ``share`` that share;
    ``guarantee`` the part of each budget it is owed while it waits (0: none) and
    ``owed`` those slots of the cap in force (``floor(cap * guarantee)``; None without a
    cap). See :mod:`celery_fleet.admission.lanes`."""

    lane: str
    priority: int
    share: float
    in_flight: int
    waiting: int
    cap: int | None = None
    guarantee: float = 0.0
    owed: int | None = None


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
    #: The version of the runtime change in force (``fleet.set_limit``; 0: none seen) and
    #: the fields it set over the configured values (empty: as configured).
    config_version: int = 0
    config_fields: dict[str, Any] = field(default_factory=dict)
    #: each priority lane's share, highest first (empty on a limit without lanes)
    lanes: list[LaneStatus] = field(default_factory=list)
    #: a limit with keys: its busiest keys, most in flight + in line first
    keys: list[KeyStatus] | None = None
    #: capacity discovery: the rate factor in force (1: the declared rate; above: found
    #: above it) and the most it may reach; None without ``"discover"``
    discovered: float | None = None
    discover_up_to: float | None = None
    #: each window's budget at that factor, e.g. ``"900 requests/60s"`` (declared 600)
    discovered_rates: list[str] = field(default_factory=list)
    #: a limit with a quality breaker: its state, garbage_rate, baseline, calls, garbage,
    #: wait_ms and top reasons (QualityState.as_dict; celery_fleet/quality/)
    quality: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for a person, as Flower's worker page shows it: ``in flight 3/3, 17 left
        of 30 requests/60s, breaker closed, 3 waiting`` (only what the limit has)."""
        parts = [f"in flight {self.in_flight}" + ("" if self.cap is None else f"/{self.cap}")]
        parts += [f"{w.left} left of {w.window}" for w in self.windows]
        if self.adaptive_cap is not None:
            parts.append(f"adaptive cap {self.adaptive_cap:.2f}")
        if self.rate_factor is not None and self.rate_factor != 1:
            parts.append(f"rate factor {self.rate_factor:.2f}")
        if self.discovered is not None:
            parts.append(
                f"discovered {self.discovered:.2f}x declared (up to {self.discover_up_to:g}x)"
            )
        if self.paused_s > 0:
            parts.append(f"paused {self.paused_s:.1f} s more")
        if self.breaker is not None:
            forced = " (forced)" if self.breaker_forced else ""
            parts.append(f"breaker {self.breaker}{forced}")
        if self.quality is not None:
            parts.append(quality_text(self.quality))
        parts.append(f"{self.waiting} waiting")
        if self.config_version:
            parts.append(f"config v{self.config_version}{fields_text(self.config_fields)}")
        parts += [f"{x.lane} {x.in_flight} in flight, {x.waiting} waiting" for x in self.lanes]
        if self.keys:
            busiest = self.keys[0]
            parts.append(f"busiest key {busiest.key or '(none)'!r} {busiest.in_flight} in flight")
        return ", ".join(parts)


def quality_text(q: Mapping[str, Any]) -> str:
    """``quality open (garbage 48.0% of 120, baseline 2.1%; empty 40, refusal 9)``."""
    reasons = ", ".join(f"{r} {n}" for r, n in dict(q.get("reasons") or {}).items())
    return (
        f"quality {q['state']} (garbage {100 * q['garbage_rate']:.1f}% of {q['calls']}, "
        f"baseline {100 * q['baseline']:.1f}%" + (f"; {reasons})" if reasons else ")")
    )


def fields_text(fields: Mapping[str, Any]) -> str:
    """`` (rpm=900, max_in_flight=16)``, or ``""`` when nothing is set at runtime."""
    if not fields:
        return ""
    return " (" + ", ".join(f"{k}={v}" for k, v in sorted(fields.items())) + ")"


class _Applied(Protocol):
    @property
    def version(self) -> int: ...

    @property
    def fields(self) -> Mapping[str, Any]: ...


class _Runtime(Protocol):
    """What status reads of :class:`~celery_fleet.admission.runtime.RuntimeLimits`."""

    def sync(self) -> None: ...

    def applied(self, name: str) -> _Applied: ...


class _Limits(Protocol):
    """What status reads of :class:`~celery_fleet.admission.core.Admission`."""

    def limit(self, name: str) -> LimitConfig: ...

    def keys(self, name: str) -> LimitKeys: ...

    @property
    def runtime(self) -> _Runtime: ...

    @property
    def quality(self) -> _Quality: ...


class _Quality(Protocol):
    """What status reads of the quality breakers (celery_fleet/quality/breaker.py)."""

    def state(self, limit: str) -> _QualityState: ...


class _QualityState(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


class _Store(Protocol):
    """A store that runs one of the fleet's scripts (:meth:`RedisStore.run`: status reads
    through ``peek``) and sends one command (:meth:`RedisStore.call`: metrics read the
    counters)."""

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any: ...

    def call(self, command: str, *args: Any) -> Any: ...


class _BreakerReader(Protocol):
    def seen(
        self,
        now_ms: float,
        state: str,
        opened_at: str,
        forced: str,
        probe: str,
        probe_until: str,
        calls: str,
        failures: str,
    ) -> BreakerState: ...


class StatusSource(Protocol):
    """What :func:`limit_status` reads of a :class:`~celery_fleet.Fleet`: the limits
    configured, their keys, the store to read them from, and each limit's breaker.

    Read-only members, so any object holding them fits (a Fleet, a test's stand-in)."""

    @property
    def admission(self) -> _Limits: ...

    @property
    def store(self) -> _Store: ...

    @property
    def limits(self) -> Mapping[str, LimitConfig]: ...

    def breaker(self, name: str) -> _BreakerReader: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: Any) -> float | None:
    try:
        return float(_text(value))
    except ValueError:
        return None


def limit_status(fleet: StatusSource, name: str) -> LimitStatus:
    """The state of limit ``name`` of ``fleet`` (a :class:`~celery_fleet.Fleet`) now: one
    round trip (``peek.lua``: it writes nothing), never on the hot path. The limit's
    runtime changes are read first (one HGET) so that a process that
    does not admit (the ``celery fleet`` command, a worker's main process) shows them."""
    fleet.admission.runtime.sync()
    applied = fleet.admission.runtime.applied(name)
    cfg = fleet.admission.limit(name)
    keys = fleet.admission.keys(name)
    lanes = cfg.lanes.lanes if cfg.lanes else ()
    args: list[Any] = [OLDEST_SCAN, *acquire_args(cfg), len(lanes)]
    args += [lane.priority for lane in lanes]
    if cfg.keyed:
        args += [BUSIEST_KEYS, keys.ctl[: -len("ctl")] + "k:"]
    peek = PEEK.run(fleet.store, PEEK.keys_of(keys), args)
    cap_in_force = int(peek.cap_in_force) or None
    lane_rows = [
        LaneStatus(
            lane.name,
            lane.priority,
            lane.share,
            in_flight=int(peek.lanes[2 * i]),
            waiting=int(peek.lanes[2 * i + 1]),
            cap=None if cap_in_force is None else lane.usable(cap_in_force),
            guarantee=lane.guarantee,
            owed=None if cap_in_force is None else math.floor(cap_in_force * lane.guarantee),
        )
        for i, lane in enumerate(lanes)
    ]
    now_ms = int(peek.now_us) / 1000
    windows = [
        WindowStatus(w.describe(), left=int(peek.windows[2 * i]), full=int(peek.windows[2 * i + 1]))
        for i, w in enumerate(cfg.windows)
    ]
    adaptive_cap = rate_factor = None
    if cfg.adaptive is not None:  # before the first admission the script starts from these
        adaptive_cap = _number(peek.cap) or float(cfg.adaptive.initial_in_flight)
        rate_factor = _number(peek.rate_factor) or 1.0
    breaker = None
    if cfg.breaker is not None:
        breaker = fleet.breaker(name).seen(now_ms, *(_text(x) for x in peek.breaker))
    oldest = int(peek.oldest_us)
    quality = fleet.admission.quality.state(name).as_dict() if cfg.quality else None
    return LimitStatus(
        limit=name,
        windows=windows,
        in_flight=int(peek.in_flight),
        cap=cap_in_force,
        oldest_lease_s=round((now_ms - oldest / 1000) / 1000, 3) if oldest else None,
        adaptive_cap=adaptive_cap,
        rate_factor=rate_factor,
        paused_s=round(max(0.0, _number(peek.paused_ms) or 0.0) / 1000, 3),
        breaker=breaker.state if breaker else None,
        breaker_forced=breaker.forced if breaker else None,
        # A forced-open breaker sends no probe: its timer means nothing until `auto`.
        breaker_retry_s=(
            round(breaker.retry_in_ms / 1000, 3) if breaker and not breaker.forced else 0.0
        ),
        waiting=int(peek.waiting),
        config_version=applied.version,
        config_fields=dict(applied.fields),
        lanes=lane_rows,
        keys=_keys(peek.keys) if cfg.keyed else None,
        discovered=(_number(peek.factor) or 1.0) if cfg.discover else None,
        discover_up_to=cfg.discover.up_to if cfg.discover else None,
        discovered_rates=_rates(cfg, _number(peek.factor) or 1.0) if cfg.discover else [],
        quality=quality,
    )


def _rates(cfg: LimitConfig, factor: float) -> list[str]:
    """Each window's budget per period at ``factor``: ``"900 requests/60s"``."""
    return [f"{w.budget * factor:.6g} {w.dimension}/{w.period_s}s" for w in cfg.windows]


def _keys(flat: list[Any] | None) -> list[KeyStatus]:
    """peek's busiest keys: (hash, name, in flight, in line) each, flat."""
    flat = flat or []
    out = []
    for i in range(0, len(flat) - 3, 4):
        hashed, name = _text(flat[i]), _text(flat[i + 1])
        if hashed == "":
            name = ""  # callers without a key
        elif not name:
            name = f"#{hashed}"  # its state expired: only its hash is known
        out.append(KeyStatus(name, int(flat[i + 2]), int(flat[i + 3])))
    return out


def fleet_status(fleet: StatusSource, names: list[str] | None = None) -> list[LimitStatus]:
    """:func:`limit_status` of each limit named (default: every configured limit)."""
    return [limit_status(fleet, n) for n in (names or sorted(fleet.limits))]
