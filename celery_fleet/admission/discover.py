"""Capacity discovery: a limit that learns the provider allows more than it declares.

Providers' documented limits are a floor: an account's real limit is often higher, and the
provider says so in its ``x-ratelimit-limit-*`` headers, or only by not refusing. A limit
with ``"discover": {"up_to": 2.0}`` lets the fleet find out, fleet-wide:

- **headers**: when a response's rate-limit headers (``slot.observe``) state a higher limit
  than the declared one, the rate may rise toward it, never above it;
- **no headers**: while calls keep succeeding at the declared ceiling (a window is what
  refuses callers, and no 429 comes), the rate rises additively, ``increase`` times the
  declared rate per second of such traffic, up to ``up_to`` times the declared rate;
- the first 429 (of a call admitted after the last cut) cuts it by ``decrease``; the factor
  that drew it is approached to 2% below and not passed again before ``probe_interval``,
  each failed probe doubling that wait (up to 8 intervals), like the adaptive in-flight cap;
- what was learned lives in Redis (the limit's ``ctl`` hash, field ``disc``) for
  ``remember`` seconds after it last moved or was used: every process, and a restarted one,
  starts from it; past that the declared rate is back;
- with ``adaptive=True`` the learned in-flight cap may grow to ``up_to * max_in_flight``.

Limits without ``discover`` are untouched: their rate factor never exceeds 1, and their
admission reads no field of it (the script checks the length of its constants, nothing
more). The learning runs in the release script (``scripts/_lib/adaptive_discover.lua``);
admission reads the factor in its one ``HMGET`` (``scripts/_lib/gcra.lua``).

Example::

    app.conf.fleet_limits = {"openai": {
        "rpm": 600, "max_in_flight": 16,
        "discover": {"up_to": 2.0},   # up to 1200 rpm, never above a header's limit
    }}
    fleet.discovered("openai")        # {"factor": 1.42, "declared": {...}, "effective": {...}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..checks import number, reject_unknown
from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import LimitConfig
    from .core import Admission

__all__ = ["DiscoverConfig", "parse_discover", "cap_bound", "discover_state"]

_KEYS = frozenset({"up_to", "increase", "decrease", "probe_interval", "remember"})


@dataclass(frozen=True)
class DiscoverConfig:
    """How far and how fast a limit may probe above its declared rate.

    ``up_to``: the most, as a multiple of the declared rate (and of ``max_in_flight`` for an
    adaptive limit), in (1, 10]; ``increase``: growth per second at the ceiling, as a
    fraction of the declared rate; ``decrease``: the cut on a 429; ``probe_interval_s``:
    how long a factor that drew a 429 is not passed again; ``remember_s``: how long the
    learned factor is kept in Redis after it last moved.
    """

    up_to: float = 2.0
    increase: float = 0.05
    decrease: float = 0.9
    probe_interval_s: float = 5.0
    remember_s: float = 3600.0

    def acquire_tail(self) -> tuple[float, ...]:
        """What the acquire (and peek) script reads after the windows' constants."""
        return (self.up_to,)

    def release_tail(self) -> tuple[float, ...]:
        """What the release script reads after its 16 constants."""
        return (
            self.up_to,
            self.increase,
            self.decrease,
            self.probe_interval_s * 1000,
            self.remember_s * 1000,
        )


def parse_discover(value: object, setting: str) -> DiscoverConfig | None:
    """``"discover": {"up_to": 2.0}`` (or ``True`` for the defaults) into a
    :class:`DiscoverConfig`; None when absent or False."""
    if value is None or value is False:
        return None
    if value is True:
        return DiscoverConfig()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{setting} must be True or a dict like {{'up_to': 2.0}}, got {value!r}")
    reject_unknown(value, _KEYS, setting)
    return DiscoverConfig(
        up_to=number(value.get("up_to", 2.0), f"{setting}['up_to']", lo_open=1.0, hi=10.0),
        increase=number(value.get("increase", 0.05), f"{setting}['increase']", lo_open=0, hi=1),
        decrease=number(
            value.get("decrease", 0.9), f"{setting}['decrease']", lo_open=0.0, hi_open=1.0
        ),
        probe_interval_s=number(
            value.get("probe_interval", 5.0), f"{setting}['probe_interval']", lo=0.001, hi=3600
        ),
        remember_s=number(
            value.get("remember", 3600.0), f"{setting}['remember']", lo=1.0, hi=7 * 86400
        ),
    )


def check_discover(cfg: LimitConfig, setting: str) -> None:
    """A limit with ``discover`` must have something to discover: a rate, or an adaptive cap."""
    if cfg.discover and not cfg.windows and not cfg.adaptive:
        raise ConfigError(
            f"{setting}['discover'] needs a rate to raise (rpm, tpm, rate, requests, tokens) "
            f"or adaptive=True (an in-flight cap to raise)"
        )


def cap_bound(cfg: LimitConfig) -> int:
    """The in-flight bound the scripts hold a limit to (0: none): ``max_in_flight``, or for an
    adaptive limit with discovery ``floor(up_to * max_in_flight)`` (the learned cap may
    grow past the declared one)."""
    cap = cfg.max_in_flight or 0
    if cap and cfg.adaptive and cfg.discover:
        return max(cap, math.floor(cfg.discover.up_to * cap))
    return cap


def discover_state(admission: Admission, name: str) -> dict[str, Any] | None:
    """What ``name`` has discovered, fleet-wide (None without ``discover``): the learned
    ``factor`` (1.0: the declared rate), the factor that last drew a 429 (``ceiling``),
    the ``provider_factor`` its headers stated while fresh, per window the declared and the
    effective budget per period, and ``until_s`` (how long what was learned is kept)."""
    cfg = admission.limit(name)
    if cfg.discover is None:
        return None
    fields = ("disc", "disc_until", "disc_ceiling", "provider_factor", "provider_factor_until")
    raw = admission.store.call("HMGET", admission.keys(name).ctl, *fields)
    values = [None if v is None else float(v) for v in raw]
    now_s, now_us = admission.store.call("TIME")
    now_ms = int(now_s) * 1000 + int(now_us) / 1000
    disc, until, ceiling, provider, provider_until = values
    fresh = until is not None and until > now_ms
    factor = min(cfg.discover.up_to, max(1.0, disc)) if fresh and disc else 1.0
    if provider is not None and (provider_until or 0) > now_ms:
        factor = min(factor, provider)
    else:
        provider = None
    return {
        "factor": round(factor, 4),
        "up_to": cfg.discover.up_to,
        "ceiling": ceiling if fresh else None,
        "provider_factor": provider,
        "until_s": round((until - now_ms) / 1000, 1) if fresh and until else 0.0,
        "windows": {
            w.describe(): {"declared": w.declared, "effective": round(w.budget * factor, 1)}
            for w in cfg.windows
        },
    }
