"""Jitter for waits and reschedules, so that refused callers do not wake up as a herd.

Formulas from AWS's "Exponential Backoff And Jitter": a wait told by the limiter is
exact, so it gets a small forward-only spread; a backoff with no wait hint gets full
jitter, ``rand(0, min(cap, base * 2**attempt))``.
"""

from __future__ import annotations

import random

__all__ = ["spread", "full_jitter"]


def spread(
    wait_s: float, fraction: float = 0.1, floor_s: float = 0.005, rng: random.Random | None = None
) -> float:
    """``wait_s`` plus a forward-only random spread of up to ``max(floor_s, fraction*wait_s)``.

    Never earlier than ``wait_s``: the limiter said the request cannot pass before then.
    """
    r = rng or random
    return wait_s + r.uniform(0.0, max(floor_s, fraction * wait_s))


def full_jitter(
    attempt: int, base_s: float = 0.5, cap_s: float = 30.0, rng: random.Random | None = None
) -> float:
    """AWS full jitter: a uniform draw in ``[0, min(cap_s, base_s * 2**attempt)]``."""
    r = rng or random
    return r.uniform(0.0, min(cap_s, base_s * (2 ** max(0, attempt))))
