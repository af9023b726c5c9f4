"""The quality breaker's Python side: verdicts out, state in, admission's routing.

Each limit with ``"quality"`` has one Redis hash (``{ns:limit}:quality``) that counts the
judged calls of the whole fleet (``scripts/quality/quality_count.lua``, sent in the same
write as the slot's release) and opens, half-opens and closes (see
:class:`~celery_fleet.quality.config.QualityConfig`).

Admission with ``on_degraded="pause"`` or ``"fallback:<limit>"`` reads a local copy of the
state, refreshed by every count's reply and, when older than :data:`REFRESH_S` (or past
the moment an open breaker half-opens), by one read (``quality_read.lua``). While a
breaker with a fallback is open, the fallback's own breaker (if it has one) is read the
same way: falling back to a degraded limit would only buy its garbage. The acquire
script is left alone: a limit without quality (or with ``flag``) asks exactly as before,
and a limit that gates pays at most one read a second per process, which a one-second lag
costs nothing against a breaker that opens on seconds of evidence.

Example::

    fleet.quality("openai")
    # QualityState(limit='openai', state='open', garbage_rate=0.48, baseline=0.021, ...)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..clock import Clock, SystemClock
from ..errors import ConfigError, QualityDegraded, StoreUnavailable
from ..store.aio import AsyncStore
from ..store.combiner import Packed
from ..store.specs import QUALITY_COUNT, QUALITY_READ, QualityReply
from ..store.sync import RedisStore
from .config import QualityConfig
from .judge import LengthBaseline, Verdict

__all__ = ["QualityState", "QualityBreakers", "REFRESH_S"]

log = logging.getLogger("celery_fleet")

#: How old the local copy of a gating limit's state may be before admission reads it again.
REFRESH_S = 1.0


class _Limit(Protocol):
    @property
    def quality(self) -> QualityConfig | None: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class QualityState:
    """A limit's quality breaker: ``state`` ("closed", "open", "half_open"), the garbage
    rate over its window (``garbage`` of ``calls`` judged), the rolling ``baseline``,
    ``wait_ms`` until an open breaker half-opens, and the top ``reasons`` (reason, count)."""

    limit: str
    state: str
    garbage_rate: float
    baseline: float
    calls: int
    garbage: int
    wait_ms: int
    reasons: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, limit: str, reply: QualityReply) -> QualityState:
        calls, garbage = int(reply.calls), int(reply.garbage)
        pairs = reply.reasons
        counted = [(_text(pairs[i]), int(pairs[i + 1])) for i in range(0, len(pairs) - 1, 2)]
        counted.sort(key=lambda rc: (-rc[1], rc[0]))
        return cls(
            limit,
            _text(reply.state),
            garbage / calls if calls else 0.0,
            float(_text(reply.baseline)),
            calls,
            garbage,
            int(reply.wait_ms),
            tuple(counted[:5]),
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (status, events)."""
        return {
            "state": self.state,
            "garbage_rate": round(self.garbage_rate, 4),
            "baseline": round(self.baseline, 4),
            "calls": self.calls,
            "garbage": self.garbage,
            "wait_ms": self.wait_ms,
            "reasons": dict(self.reasons),
        }


@dataclass
class _Seen:
    """This process's copy of one limit's state: what it was and when (monotonic)."""

    state: str = "closed"
    wait_ms: int = 0
    at: float = -1e18
    #: when a read last failed (Redis away): not tried again for REFRESH_S
    tried: float = -1e18
    lengths: LengthBaseline = field(default_factory=LengthBaseline)
    #: the baseline (and the calls it weighed) the hash last held: seeds a hash Redis lost
    baseline: float = 0.0
    base_n: int = 0
    #: until when (monotonic) the hash last said it stays open (-inf: not open)
    open_until: float = -1e18


#: A quality listener: ``listener(limit, state, fields)`` on a transition this process saw.
Listener = Callable[[str, str, dict[str, Any]], None]


class QualityBreakers:
    """Every quality breaker of one fleet: count commands, local copies, routing, listeners."""

    def __init__(
        self,
        store: RedisStore,
        namespace: str,
        limits: Mapping[str, _Limit],
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        #: how old the local copies are (a test moves a fake one by hand)
        self.clock: Clock = clock or SystemClock()
        self.namespace = namespace
        self.limits = limits
        self.listeners: list[Listener] = []
        self._seen: dict[str, _Seen] = {}
        self._packed: dict[str, tuple[QualityConfig, Packed]] = {}
        #: limits whose config differing from the fleet's was already logged
        self._warned: set[str] = set()

    def config(self, limit: str) -> QualityConfig | None:
        """The limit's quality options (None: no quality breaker, or no such limit)."""
        cfg = self.limits.get(limit)
        return cfg.quality if cfg is not None else None

    def key(self, limit: str) -> str:
        """The breaker's hash (in the limit's hash slot)."""
        return f"{{{self.namespace}:{limit}}}:quality"

    def seen(self, limit: str) -> _Seen:
        found = self._seen.get(limit)
        if found is None:
            found = self._seen[limit] = _Seen()
        return found

    def lengths(self, limit: str) -> LengthBaseline:
        """This process's output-length baseline of ``limit`` (the ``length_shift`` detector)."""
        return self.seen(limit).lengths

    # -- counting (rides on the release) ------------------------------------------------

    def count_command(self, limit: str, verdict: Verdict) -> tuple[str, bytes] | None:
        """The packed count of one verdict (None: the limit has no quality breaker)."""
        cfg = self.config(limit)
        if cfg is None:
            return None
        cached = self._packed.get(limit)
        if cached is None or cached[0] is not cfg:
            tail = [*_limits_args(cfg), cfg.baseline_calls, fingerprint(cfg)]
            packed = self.store.packed(QUALITY_COUNT.name, [self.key(limit)], 2, tail, 3)
            cached = self._packed[limit] = (cfg, packed)
        kind = b"ok" if verdict.ok else b"garbage"
        reasons = ",".join(verdict.reasons).encode()
        seen = self.seen(limit)
        if seen.base_n <= 0:  # nothing learnt yet: a new hash starts empty, as ever
            return QUALITY_COUNT.name, cached[1].pack(kind, reasons, b"", b"", b"0")
        left = max(0, int((seen.open_until - self.clock.monotonic()) * 1000))
        known = (b"%.6f" % seen.baseline, b"%d" % seen.base_n, b"%d" % left)
        return QUALITY_COUNT.name, cached[1].pack(kind, reasons, *known)

    def counted(self, limit: str, reply: Any) -> None:
        """Read a count's reply (an error is logged: a lost count changes little)."""
        if isinstance(reply, BaseException):
            log.debug("celery-fleet: a quality count of %r failed: %s", limit, reply)
            return
        self.apply(limit, QUALITY_COUNT.read(reply))

    def apply(self, limit: str, reply: QualityReply) -> QualityState:
        """Refresh the local copy from a reply; tell the listeners of a transition."""
        state = QualityState.of(limit, reply)
        seen = self.seen(limit)
        now = self.clock.monotonic()
        seen.state, seen.wait_ms, seen.at = state.state, state.wait_ms, now
        if int(reply.base_n) > 0:  # a hash that learnt (0: new, or lost: keep what we saw)
            seen.baseline, seen.base_n = state.baseline, int(reply.base_n)
            seen.open_until = now + state.wait_ms / 1000 if state.state == "open" else -1e18
        if reply.differs and limit not in self._warned:
            self._warned.add(limit)
            self.warn_differs(limit, _text(reply.differs))
        transition = _text(reply.transition)
        if transition:
            self.notify(limit, transition, state)
        return state

    def warn_differs(self, limit: str, fleet: str) -> None:
        """Log (once per limit) that this process counts ``limit`` with a quality config
        other than the one its hash was started with: the two share one window."""
        cfg = self.config(limit)
        ours = _fields(fingerprint(cfg)) if cfg is not None else {}
        theirs = _fields(fleet)
        diff = ", ".join(
            f"{_NAMES.get(k, k)} {ours.get(k, '?')} vs {theirs.get(k, '?')}"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)
        )
        log.warning(
            "celery-fleet: this process's quality config for %r differs from the fleet's "
            "(this process vs the fleet's hash): %s; their counts share one breaker",
            limit,
            diff or "differs",
        )

    def notify(self, limit: str, transition: str, state: QualityState) -> None:
        fields = state.as_dict()
        for listener in list(self.listeners):
            try:
                listener(limit, transition, fields)
            except Exception:
                log.exception("celery-fleet: quality listener %r failed", listener)

    # -- reading ------------------------------------------------------------------------

    def read_call(self, limit: str) -> tuple[list[str], list[Any]]:
        cfg = self.config(limit)
        if cfg is None:
            raise ConfigError(f"limit {limit!r} has no quality breaker (set 'quality')")
        args = _limits_args(cfg)
        return [self.key(limit)], [args[0], args[1], args[2], args[4]]

    def state(self, limit: str) -> QualityState:
        """Read the fleet-wide state of ``limit``'s quality breaker (one round trip)."""
        keys, args = self.read_call(limit)
        return self.apply(limit, QUALITY_READ.run(self.store, keys, args))

    async def astate(self, limit: str, store: AsyncStore) -> QualityState:
        """:meth:`state` on an asyncio store."""
        keys, args = self.read_call(limit)
        return self.apply(limit, QUALITY_READ.read(await store.run(QUALITY_READ.name, keys, args)))

    def stale(self, limit: str) -> bool:
        """Whether admission must read the state before routing a call of ``limit``."""
        cfg = self.config(limit)
        if cfg is None or not cfg.gates:
            return False
        return self._due(limit)

    def _due(self, limit: str) -> bool:
        """Whether the local copy of ``limit`` is older than REFRESH_S, or open past the
        moment it half-opens (and no read failed in the last REFRESH_S)."""
        seen = self.seen(limit)
        now = self.clock.monotonic()
        if now - seen.tried < REFRESH_S:
            return False  # a read just failed: the local copy it is, until the next try
        age = now - seen.at
        return age >= REFRESH_S or (seen.state == "open" and age * 1000 >= seen.wait_ms)

    def _left_ms(self, limit: str) -> int:
        """How long the local copy says ``limit``'s breaker stays open (0: not open, or
        half-open by the clock, Redis could not say so)."""
        seen = self.seen(limit)
        if seen.state != "open":  # closed, or half-open: its calls are the probes
            return 0
        return max(0, seen.wait_ms - int((self.clock.monotonic() - seen.at) * 1000))

    def target(self, limit: str) -> str | None:
        """The fallback whose own quality breaker must be read before routing a call of
        ``limit``: only while ``limit``'s is open (never on the closed path) and the
        target's copy is due."""
        cfg = self.config(limit)
        if cfg is None or cfg.on_degraded != "fallback" or cfg.fallback is None:
            return None
        if self.config(cfg.fallback) is None or self._left_ms(limit) <= 0:
            return None
        return cfg.fallback if self._due(cfg.fallback) else None

    def refresh(self, limit: str) -> None:
        """Read what routing a call of ``limit`` needs and the local copies lack: its own
        state when stale and, while open with a fallback, the fallback's (at most once a
        second each; a read that fails leaves the copy as it is)."""
        if self.stale(limit) and not self._read(limit):
            return  # Redis is away: not a second read to find out again
        target = self.target(limit)
        if target is not None:
            self._read(target)

    async def arefresh(self, limit: str, store: AsyncStore) -> None:
        """:meth:`refresh` on an asyncio store."""
        if self.stale(limit) and not await self._aread(limit, store):
            return
        target = self.target(limit)
        if target is not None:
            await self._aread(target, store)

    async def _aread(self, limit: str, store: AsyncStore) -> bool:
        try:
            await self.astate(limit, store)
            return True
        except StoreUnavailable:  # the store-down policy answers the ask itself
            self.seen(limit).tried = self.clock.monotonic()  # not again for REFRESH_S
            return False

    def _read(self, limit: str) -> bool:
        """Read ``limit``'s state into its local copy; False when Redis is away."""
        try:
            self.state(limit)
            return True
        except StoreUnavailable:  # the store-down policy answers the ask itself
            self.seen(limit).tried = self.clock.monotonic()  # not again for REFRESH_S
            return False

    # -- admission ----------------------------------------------------------------------

    def route(self, limit: str) -> str:
        """The limit a call of ``limit`` is admitted against, from the local copies (read
        first when stale): itself, or its fallback while the breaker is open; raises
        :class:`~celery_fleet.QualityDegraded` with ``pause``, or when the fallback's own
        quality breaker is open too."""
        cfg = self.config(limit)
        if cfg is None or not cfg.gates:
            return limit
        self.refresh(limit)
        return self.decide(limit, cfg)

    def decide(self, limit: str, cfg: QualityConfig) -> str:
        """:meth:`route` on the local copies as they are.

        A fallback is never followed further (``a`` to ``b`` to ``c``): while the
        fallback's own breaker is open, whatever its ``on_degraded`` (even ``flag``), the
        call is refused, ``wait_ms`` the sooner of the two half-opens."""
        left = self._left_ms(limit)
        if left <= 0:  # closed or half-open: its calls are the probes
            return limit
        if cfg.on_degraded == "fallback" and cfg.fallback is not None:
            target = cfg.fallback
            target_left = self._left_ms(target) if self.config(target) is not None else 0
            if target_left <= 0:
                return target
            raise QualityDegraded(limit, min(left, target_left), "quality_degraded")
        raise QualityDegraded(limit, left, "quality_degraded")


#: The fingerprint's fields, as the warning names them.
_NAMES = {
    "w": "window_ms",
    "r": "ratio",
    "m": "min_rate",
    "n": "min_calls",
    "t": "reset_ms",
    "p": "probes",
    "b": "baseline_calls",
}


def fingerprint(cfg: QualityConfig) -> str:
    """The quality config as the count script uses it, short and readable
    (``"w=30000 r=3.0 m=0.1 n=20 t=30000 p=20 b=500"``): stored in the hash by its first
    count, compared by every other."""
    values = [*_limits_args(cfg), cfg.baseline_calls]
    return " ".join(f"{k}={v}" for k, v in zip(_NAMES, values, strict=True))


def _fields(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def _limits_args(cfg: QualityConfig) -> list[Any]:
    """window_ms, ratio, min_rate, min_calls, reset_ms, probes (as the scripts take them)."""
    return [
        int(cfg.window_s * 1000),
        cfg.ratio,
        cfg.min_rate,
        cfg.min_calls,
        int(cfg.reset_timeout_s * 1000),
        cfg.probes,
    ]
