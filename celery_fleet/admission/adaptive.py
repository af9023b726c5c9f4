"""Adaptive limits (AIMD): the fleet finds the provider's real capacity by itself.

A limit with ``adaptive=True`` keeps an effective in-flight cap (and a rate factor) in its
``ctl`` hash, where the admission script reads them at no extra round trip. The release
script updates them from how each call ended (see ``scripts/_lib/adaptive.lua``):

- additive increase: ``cap += increase / cap`` per success while the cap is in use
  (at least half of it was in flight when the call was admitted), up to ``max_in_flight``;
- multiplicative decrease: ``cap *= decrease`` on a 429, an overload (503/529) or a
  timeout, at most once per congestion event: only calls admitted after the last cut can
  cut again, so a burst of 429s from one overshoot cuts once, like TCP;
- a cut lands below the in-flight level that failed; that level is not tried again before
  ``probe_interval``, and each failed probe of it (a call admitted after the wait) doubles
  the wait, up to 8 intervals, so a converged fleet stops drawing 429s yet finds capacity
  that came back; a level passed without congestion forgets the old ceiling;
- a rate 429 (the provider names requests or tokens) cuts the rate factor instead, which
  stretches every window's emission interval;
- an optional ``latency_target``: when more than 1% of recent calls take longer (the p99
  is over it), that counts as congestion.

The cap and the level that failed always stay within ``[min_in_flight, max_in_flight]``,
whatever sequence of outcomes arrives (a property test drives random sequences).

The parameters are parsed into :class:`~celery_fleet.admission.config.AdaptiveConfig`; this module
reads and resets the fleet-wide state the scripts keep.

Example::

    app.conf.fleet_limits = {
        "openai": {"max_in_flight": 32, "adaptive": True, "min_in_flight": 2,
                   "increase": 1, "decrease": 0.9, "latency_target": 20.0},
    }
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Admission

__all__ = ["control_state", "reset_control"]


def control_state(admission: Admission, name: str) -> dict[str, float]:
    """The limit's fleet-wide control hash as floats: the adaptive ``cap``, ``rate_factor``,
    ``ceiling`` (the level that last failed), ``pause_until`` (ms), ``hold_ms``..."""
    raw = admission.store.call("HGETALL", admission.keys(name).ctl) or {}
    fields = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
    # The same hash holds the windows' arrival times ("r:60") and its own expiry: not control.
    return {k: v for k, v in fields.items() if ":" not in k and k != "exp"}


def reset_control(admission: Admission, name: str) -> None:
    """Forget what the fleet learned about ``name``: adaptive cap, rate factor, ceiling,
    the provider's header factor and any Retry-After pause."""
    # The hash also holds the buckets' arrival times, which stay: drop every other field.
    ctl = admission.keys(name).ctl
    found = admission.store.call("HKEYS", ctl) or []
    fields = [f.decode() if isinstance(f, bytes) else str(f) for f in found]
    control = [f for f in fields if ":" not in f and f != "exp"]
    if control:
        admission.store.call("HDEL", ctl, *control)
