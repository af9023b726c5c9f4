"""Jitter for waits, reschedules, schedules and fan-outs, so that callers do not move as a herd.

Formulas from AWS's "Exponential Backoff And Jitter" (see ``docs`` and the providers notes):

- :func:`spread`: a wait told by the limiter is exact, so it gets a small forward-only spread.
- :func:`full_jitter`: ``uniform(0, min(cap, base * 2**attempt))``, for waits that are only
  a guess (the n-th refusal of a caller that keeps being refused). With many contending
  callers it halves the calls of plain exponential backoff.
- :func:`decorrelated_jitter`: ``min(cap, uniform(base, 3 * previous))``, its variant that
  grows from the previous sleep instead of the attempt count.
- :func:`offset`: a *deterministic* offset in ``[0, max_delay)`` from a key and a time, so
  a restarted scheduler computes the same shift again (no re-roll, no double run).
- :func:`stagger_offsets`: ``n`` countdowns spread evenly over a window, with jitter
  inside each one's share (stratified), so a fan-out arrives at a steady rate.

Everything here is pure: no Redis, no Celery.
"""

from __future__ import annotations

import hashlib
import math
import random

__all__ = ["spread", "full_jitter", "decorrelated_jitter", "offset", "stagger_offsets"]

#: Attempts beyond this count no more: 2**60 seconds is past any cap, and larger exponents
#: would overflow a float.
_MAX_EXPONENT = 60


def spread(
    wait_s: float, fraction: float = 0.1, floor_s: float = 0.005, rng: random.Random | None = None
) -> float:
    """``wait_s`` plus a forward-only random spread of up to ``max(floor_s, fraction*wait_s)``.

    Never earlier than ``wait_s``: the limiter said the request cannot pass before then.
    """
    r = rng or random
    return wait_s + r.uniform(0.0, max(floor_s, fraction * wait_s))


def full_jitter(
    attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Capped exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**attempt))``.

    ``attempt`` counts from 0 (the first backoff). Always in ``[0, cap_s]``, for any
    attempt count, however large.
    """
    r = rng or random
    ceiling = min(cap_s, base_s * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))
    return r.uniform(0.0, max(0.0, ceiling))


def decorrelated_jitter(
    previous_s: float, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Decorrelated jitter: ``min(cap, uniform(base, 3 * previous))``, in ``[0, cap_s]``.

    ``previous_s`` is the last sleep (``base_s`` for the first).
    """
    r = rng or random
    hi = max(base_s, 3.0 * max(previous_s, base_s))
    return max(0.0, min(cap_s, r.uniform(base_s, hi)))


def offset(key: str, at: float, max_delay_s: float) -> float:
    """A deterministic offset in ``[0, max_delay_s)`` for ``key`` at time ``at`` (seconds).

    The same key and time give the same offset in every process and after every restart;
    different keys (two entries on the same crontab) or times give independent, uniformly
    distributed offsets. ``at`` is rounded to the millisecond so float noise in how a
    caller computed it does not change the result.
    """
    if max_delay_s <= 0:
        return 0.0
    digest = hashlib.sha256(f"{key}\x00{round(at * 1000)}".encode()).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64  # in [0, 1)
    return unit * max_delay_s


def stagger_offsets(n: int, over_s: float, rng: random.Random | None = None) -> list[float]:
    """``n`` countdowns in ``[0, over_s)``, one per equal share of the window, each at a
    uniformly random point of its share (stratified sampling): in order, never two shares
    in one, so the arrival rate over the window stays close to ``n / over_s``.
    """
    if n <= 0:
        return []
    r = rng or random
    width = over_s / n
    return [min(math.nextafter(over_s, 0.0), (i + r.random()) * width) for i in range(n)]
