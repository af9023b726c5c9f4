"""Adaptive limits (AIMD): the fleet finds the provider's real capacity by itself.

A limit with ``adaptive=True`` keeps an effective in-flight cap (and a rate factor) in its
``ctl`` hash, where the admission script reads them at no extra round trip. The release
script updates them from how each call ended (see ``scripts/release.lua``):

- additive increase: ``cap += increase / cap`` per success while the cap is in use
  (at least half of it was in flight when the call was admitted), up to ``max_in_flight``;
- multiplicative decrease: ``cap *= decrease`` on a 429, an overload (503/529) or a
  timeout, at most once per congestion event: only calls admitted after the last cut can
  cut again, so a burst of 429s from one overshoot cuts once, like TCP;
- the in-flight level that failed is not tried again before ``probe_interval`` and each
  failed probe there doubles the wait, so a converged fleet stops drawing 429s, while a
  level passed without congestion forgets the old ceiling and grows normally again;
- a rate 429 (the provider names requests or tokens) cuts the rate factor instead, which
  stretches every window's emission interval;
- an optional ``latency_target``: when more than 1% of recent calls take longer (the p99
  is over it), that counts as congestion.

Example::

    app.conf.fleet_limits = {
        "openai": {"max_in_flight": 32, "adaptive": True, "min_in_flight": 2,
                   "increase": 1, "decrease": 0.9, "latency_target": 20.0},
    }
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .checks import number, positive_int
from .errors import ConfigError

__all__ = ["AdaptiveConfig", "parse_adaptive", "ADAPTIVE_KEYS"]

ADAPTIVE_KEYS = frozenset(
    {
        "adaptive",
        "min_in_flight",
        "initial_in_flight",
        "increase",
        "decrease",
        "latency_target",
        "probe_interval",
    }
)


@dataclass(frozen=True)
class AdaptiveConfig:
    """AIMD parameters of one limit (bounds: ``min_in_flight`` .. the declared max)."""

    min_in_flight: int
    initial_in_flight: int
    increase: float
    decrease: float
    latency_target_s: float | None
    probe_interval_s: float


def parse_adaptive(
    spec: Mapping[str, Any], setting: str, max_in_flight: int | None
) -> AdaptiveConfig | None:
    """The AdaptiveConfig of a limit's options, or None when ``adaptive`` is not set."""
    enabled = spec.get("adaptive", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{setting}['adaptive'] must be True or False, got {enabled!r}")
    extra = sorted(k for k in ADAPTIVE_KEYS - {"adaptive"} if k in spec)
    if not enabled:
        if extra:
            raise ConfigError(f"{setting} sets {extra} but not adaptive=True")
        return None
    if max_in_flight is None:
        raise ConfigError(f"{setting}: adaptive=True needs max_in_flight (the upper bound)")
    low = positive_int(spec.get("min_in_flight", 1), f"{setting}['min_in_flight']")
    if low > max_in_flight:
        raise ConfigError(
            f"{setting}['min_in_flight'] = {low} is above max_in_flight = {max_in_flight}"
        )
    initial = positive_int(
        spec.get("initial_in_flight", max(low, max_in_flight // 2)),
        f"{setting}['initial_in_flight']",
    )
    if not low <= initial <= max_in_flight:
        raise ConfigError(
            f"{setting}['initial_in_flight'] must be between min_in_flight and max_in_flight"
        )
    target = spec.get("latency_target")
    return AdaptiveConfig(
        min_in_flight=low,
        initial_in_flight=initial,
        increase=number(spec.get("increase", 1.0), f"{setting}['increase']", lo_open=0.0),
        decrease=number(
            spec.get("decrease", 0.9), f"{setting}['decrease']", lo_open=0.0, hi_open=1.0
        ),
        latency_target_s=None
        if target is None
        else number(target, f"{setting}['latency_target']", lo_open=0.0),
        probe_interval_s=number(
            spec.get("probe_interval", 5.0), f"{setting}['probe_interval']", lo_open=0.0
        ),
    )
