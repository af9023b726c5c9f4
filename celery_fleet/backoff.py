"""Jitter for waits and reschedules, so that refused callers do not wake up as a herd.

Formulas from AWS's "Exponential Backoff And Jitter": a wait told by the limiter is
exact, so it gets a small forward-only spread. (Full jitter for waits with no hint comes
with the jittered schedules on the roadmap.)
"""

from __future__ import annotations

import random

__all__ = ["spread"]


def spread(
    wait_s: float, fraction: float = 0.1, floor_s: float = 0.005, rng: random.Random | None = None
) -> float:
    """``wait_s`` plus a forward-only random spread of up to ``max(floor_s, fraction*wait_s)``.

    Never earlier than ``wait_s``: the limiter said the request cannot pass before then.
    """
    r = rng or random
    return wait_s + r.uniform(0.0, max(floor_s, fraction * wait_s))
