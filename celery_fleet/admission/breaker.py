"""A circuit breaker per dependency, whose state the whole fleet shares.

The breaker of a limit lives in one Redis hash (``{ns:limit}:breaker``) and changes only in
Lua: the admission script refuses with ``circuit_open`` while it is open and lets exactly
ONE caller through as the half-open probe after ``reset_timeout`` (the probe holds a
lease: a crashed prober's claim expires with it); the release script counts outcomes in a
sliding window, opens when the failure rate over at least ``min_calls`` calls reaches
``failure_rate``, and closes or re-opens on the probe's result. ``opened_at`` is Redis TIME.

What counts as a failure: 5xx, overloads, timeouts, connection errors and output your
``validate`` hook rejects; a 429 is a rate signal, not a failure (``count_rate_limits``).

Example::

    app.conf.fleet_limits = {
        "openai": {"rpm": 500, "breaker": {"failure_rate": 0.5, "min_calls": 10,
                                          "window": 30, "reset_timeout": 10},
                   "validate": lambda resp: bool(resp.choices[0].message.content)},
    }
    fleet.breaker("openai").force_open()     # operators: stop calling it now
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..store.specs import BREAKER_ADMIN

if TYPE_CHECKING:
    from .core import Admission

__all__ = ["BreakerState", "Breaker"]


@dataclass(frozen=True)
class BreakerState:
    """A snapshot of one breaker, as every process sees it.

    ``state`` is ``"closed"``, ``"open"`` or ``"half_open"`` (open, past the reset
    timeout: the next caller, or the running ``probing`` one, decides); ``forced`` is
    ``"open"``, ``"closed"`` or None; ``retry_in_ms`` is the wait until a probe may run.
    """

    limit: str
    state: str
    forced: str | None
    opened_at_ms: float | None
    retry_in_ms: int
    probing: bool
    calls: int
    failures: int


class Breaker:
    """Read or override the fleet-wide breaker of one limit (one round trip per call)."""

    def __init__(self, admission: Admission, limit: str) -> None:
        cfg = admission.limit(limit)
        if cfg.breaker is None:
            raise ConfigError(f"limit {limit!r} has no breaker (set 'breaker' in fleet_limits)")
        self.admission = admission
        self.limit = limit
        self.config = cfg.breaker

    def __repr__(self) -> str:
        c = self.config
        return (
            f"<Breaker {self.limit!r} failure_rate={c.failure_rate} min_calls={c.min_calls} "
            f"window={c.window_s:g}s reset_timeout={c.reset_timeout_s:g}s "
            f"(.state() reads it from Redis)>"
        )

    def state(self) -> BreakerState:
        """The breaker as the admission script sees it now."""
        return self._run("state")

    def force_open(self) -> BreakerState:
        """Refuse every call (``CircuitOpen``) until :meth:`unforce` or :meth:`reset`."""
        return self._run("force_open")

    def force_closed(self) -> BreakerState:
        """Admit every call and never trip, until :meth:`unforce` or :meth:`reset`."""
        return self._run("force_closed")

    def unforce(self) -> BreakerState:
        """Drop a manual override; the breaker resumes from its own state."""
        return self._run("unforce")

    def reset(self) -> BreakerState:
        """Forget everything: closed, no counts, no override."""
        return self._run("reset")

    def trip(self, half_open: bool = False) -> BreakerState:
        """Open the breaker now as if its failure rate had tripped it: refused for
        ``reset_timeout``, then one probe decides (no override: it recovers on its own).
        With ``half_open``, as if it had opened ``reset_timeout`` ago: the next caller in
        the fleet is the probe. Drops any override and a running probe's claim."""
        ago_ms = self.config.reset_timeout_s * 1000 if half_open else 0
        return self._run("trip", ago_ms)

    def _run(self, op: str, *args: float) -> BreakerState:
        k = self.admission.keys(self.limit)
        reply = BREAKER_ADMIN.run(self.admission.store, BREAKER_ADMIN.keys_of(k), [op, *args])
        state, opened_at, forced, probe, probe_until, now, calls, failures = (
            x.decode() if isinstance(x, bytes) else str(x) for x in reply
        )
        return self.seen(float(now), state, opened_at, forced, probe, probe_until, calls, failures)

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
    ) -> BreakerState:
        """The :class:`BreakerState` the breaker hash's fields (as text, "" when absent)
        mean at Redis time ``now_ms``: what ``breaker_admin.lua`` and ``peek.lua`` read."""
        reset_ms = self.config.reset_timeout_s * 1000
        retry_in = 0
        shown = "closed"
        if forced == "open":
            shown, retry_in = "open", int(reset_ms)
        elif forced != "closed" and state == "open":
            half_at = float(opened_at) + reset_ms
            shown = "open" if now_ms < half_at else "half_open"
            retry_in = max(0, int(half_at - now_ms))
            if probe and probe_until and float(probe_until) > now_ms:  # a probe is running
                retry_in = max(retry_in, int(min(float(probe_until) - now_ms, reset_ms)))
        return BreakerState(
            limit=self.limit,
            state=shown,
            forced=forced or None,
            opened_at_ms=float(opened_at) if opened_at else None,
            retry_in_ms=retry_in,
            probing=bool(probe) and bool(probe_until) and float(probe_until) > now_ms,
            calls=int(calls or 0),
            failures=int(failures or 0),
        )
