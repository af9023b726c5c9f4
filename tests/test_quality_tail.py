"""The quality breaker's opening test on real Redis (``_lib/quality.lua``): garbage must be
unlikely at the baseline's rate by the exact binomial tail, not by a normal approximation
whose tail is far too thin over a few dozen calls."""

from __future__ import annotations

from importlib import resources
from math import comb

import pytest
import redis

LIB = resources.files("celery_fleet.store.scripts").joinpath("_lib/quality.lua").read_text()
DEGRADED = (
    LIB
    + """
return {q_degraded(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), 3.0, 0.05) and 1
        or 0, tostring(q_tail(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])))}"""
)


def binomial_tail(n: int, x: int, p: float) -> float:
    return sum(comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(x, n + 1))


@pytest.fixture
def ask(rclient: redis.Redis) -> object:
    def ask(calls: int, garbage: int, baseline: float) -> tuple[bool, float]:
        degraded, tail = rclient.eval(DEGRADED, 0, calls, garbage, baseline)
        return bool(degraded), float(tail)

    return ask


@pytest.mark.parametrize(
    ("calls", "garbage", "p"), [(10, 5, 0.02), (60, 8, 0.02), (500, 30, 0.02), (60, 3, 0.02)]
)
def test_the_tail_is_the_binomial_one(ask, calls: int, garbage: int, p: float) -> None:  # type: ignore[no-untyped-def]
    _, tail = ask(calls, garbage, p)
    assert tail == pytest.approx(binomial_tail(calls, garbage, p), rel=1e-6)


def test_a_steady_two_percent_over_a_few_dozen_calls_does_not_open(ask) -> None:  # type: ignore[no-untyped-def]
    # 6 of 60 at a 2% baseline comes by chance 1.5 times in a thousand windows: 4 normal
    # deviations (5.5) called it degraded, which opened a steady 2% about once an hour
    assert ask(60, 6, 0.02)[0] is False
    assert ask(60, 7, 0.02)[0] is False


def test_a_jump_to_half_garbage_opens_within_a_dozen_calls(ask) -> None:  # type: ignore[no-untyped-def]
    assert ask(10, 5, 0.02)[0] is True  # 2 calls/s: 5 s of traffic
    assert ask(400, 200, 0.02)[0] is True
    assert ask(8, 3, 0.02)[0] is False  # below ratio x baseline's chance: not yet
