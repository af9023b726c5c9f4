"""The quality breaker's recovery at low call rates (issue 25), on a real Redis and a
simulated clock: the shipped scripts with ``q_now()`` reading the time each call gives
(``benchmarks/harness/quality_clock.py``), so hours of traffic at 1 judged call a second
take seconds and every timeline is exact.

What used to keep it open 28-34 s after the garbage ended at <= 5 calls/s: 20 probes
whatever the rate (20 s at 1 call/s, after the 10 s open), and a window that opened it
on garbage of an incident already over (at low rates the evidence crosses the line late,
tipped by a base-rate garbage call after the incident). The half-open now tells the
probes apart from the incident's rate by the exact binomial tail (the mirror of the
opening test), and the breaker does not open when the calls after the incident in the
window are already clean against it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import pytest
import redis

from benchmarks.harness.quality_clock import ClockedBreaker, recovery_run
from celery_fleet.quality.config import QualityConfig

SLOW = QualityConfig(window_s=60.0)  # 1 call/s: 60 calls a window (min_calls 50)


@pytest.fixture
def key(rclient: redis.Redis, namespace: str) -> Iterator[str]:
    yield f"{{{namespace}:llm}}:quality"


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def warm(breaker: ClockedBreaker, seconds: int) -> int:
    """One call a second at exactly 2% garbage (the 25th of every 50); the next second."""
    for t in range(seconds):
        reply = breaker.count(t * 1000.0, garbage=t % 50 == 25)
        assert text(reply.transition) == ""
    return seconds


def until_open(breaker: ClockedBreaker, t: int, garbage_every: int = 2) -> int:
    """Garbage every ``garbage_every`` calls, one a second, until it opens; when."""
    for i in range(120):
        if text(breaker.count((t + i) * 1000.0, garbage=i % garbage_every == 0).state) == "open":
            return t + i
    raise AssertionError("never opened")


def probe(breaker: ClockedBreaker, start: int, pattern: list[bool]) -> list[tuple[int, str]]:
    """Reads until it half-opens, then one probe a second (``pattern``: garbage or not);
    the transitions with the second they came at."""
    seen, t = [], start
    while text(breaker.read(t * 1000.0).state) == "open":
        t += 1
    for i, garbage in enumerate(pattern):
        transition = text(breaker.count((t + i) * 1000.0, garbage).transition)
        if transition:
            seen.append((t + i, transition))
            if transition in ("closed", "open"):
                break
    return seen


def test_ten_clean_probes_close_it_after_a_fifty_percent_incident(
    rclient: redis.Redis, key: str
) -> None:
    """20 probes at 1 call/s were 20 s: 10 clean calls already tell 2% from 50% (a 50%
    incident gives 10 clean calls in a row less than once in a thousand)."""
    breaker = ClockedBreaker(rclient, key, SLOW)
    opened = until_open(breaker, warm(breaker, 200))
    seen = probe(breaker, opened + 1, [False] * 30)
    half_open_at = opened + 10
    assert seen[-1][1] == "closed"
    assert seen[-1][0] - half_open_at <= 10, seen  # 10 probes, not 20
    assert seen[-1][0] - opened <= 20


def test_probes_still_at_a_degraded_rate_do_not_close_it(rclient: redis.Redis, key: str) -> None:
    """A 50% incident easing to 25%: 20 probes with 5 garbage are not degraded enough to
    open it against 2% at one in a million, but 25% is no recovery either; it used to
    close (some 70% of half-opens during a 25% incident), now the probes go on until the
    garbage opens it again."""
    breaker = ClockedBreaker(rclient, key, SLOW)
    opened = until_open(breaker, warm(breaker, 200))
    seen = probe(breaker, opened + 1, [i % 4 == 0 for i in range(80)])
    assert [s for _, s in seen] == ["open"], seen


def test_an_incident_already_over_does_not_open_it_on_what_the_window_remembers(
    rclient: redis.Redis, key: str
) -> None:
    """8 garbage in 16 calls, then 15 clean ones: not enough to open while it lasted; one
    base-rate garbage call later the window (still holding the incident) crossed the
    line and opened it 16 s after the garbage had ended, to stay open 10 s more."""
    breaker = ClockedBreaker(rclient, key, SLOW)
    t = warm(breaker, 200)
    for i in range(16):
        assert text(breaker.count((t + i) * 1000.0, garbage=i % 2 == 0).state) == "closed"
    t += 16
    for i in range(15):
        breaker.count((t + i) * 1000.0, garbage=False)
    t += 15
    reply = breaker.count(t * 1000.0, garbage=True)
    assert int(reply.garbage) == 10 and int(reply.calls) == 60  # what used to open it
    assert text(reply.state) == "closed"
    # the same garbage still going on does open it
    assert until_open(breaker, t + 1) - t <= 10


@pytest.mark.parametrize("rate", [1, 2, 5, 10])
def test_recovery_within_twenty_seconds_down_to_one_call_a_second(
    rclient: redis.Redis, namespace: str, rate: int
) -> None:
    """Poisson calls at ``rate`` judged calls/s (``pause``: refused while open), 2% garbage,
    30 s at 50%, back to 2%: seconds from the return to 2% to closed, over 15 runs."""
    cfg = QualityConfig(window_s=max(30.0, 60.0 / rate))
    closed, opened = [], []
    for seed in range(15):
        key = f"{{{namespace}:r{rate}s{seed}}}:quality"
        run = recovery_run(
            rclient, key, cfg, rate, seed=seed, warm_s=2 * cfg.window_s + 70, burst_s=30
        )
        if run.closed_after_s is not None:
            closed.append(run.closed_after_s)
            assert run.opened_after_s is not None
            opened.append(run.opened_after_s)
    assert len(closed) >= 14  # (at 1 call/s one 30 s burst of 50% may not be told apart)
    assert statistics.median(closed) <= (15 if rate == 1 else 12), sorted(closed)
    if rate >= 2:
        assert max(closed) <= 20, sorted(closed)
    if rate >= 10:
        assert statistics.median(opened) <= 5, sorted(opened)


@pytest.mark.parametrize("rate", [1, 2, 10])
def test_a_steady_two_percent_never_opens_over_two_hours(
    rclient: redis.Redis, namespace: str, rate: int
) -> None:
    """No false opens (the gate at opening only ever holds it closed): two simulated hours
    of Poisson calls at 2% garbage, default options (window 60 s at 1 call/s)."""
    cfg = QualityConfig(window_s=max(30.0, 60.0 / rate))
    hours = 2 if rate < 10 else 0.5
    run = recovery_run(
        rclient, f"{{{namespace}:steady}}:quality", cfg, rate, seed=rate,
        warm_s=hours * 3600, burst_s=0, after_s=0,
    )  # fmt: skip
    assert run.calls > hours * 3600 * rate * 0.95
    assert run.transitions == []


@pytest.mark.fast
def test_the_recovery_table_and_its_options() -> None:
    from benchmarks.harness.quality import recovery_table
    from tests.test_quality_bench import bench

    row = {
        "rate": 1, "burst_s": 30.0, "window_s": 60.0, "runs": 40, "opened": 38,
        "open_median_s": 15.7, "closed_median_s": 14.6, "closed_p90_s": 23.3,
        "closed_max_s": 37.4, "within_20s": 0.84,
    }  # fmt: skip
    table = recovery_table({"after": [row], "before": [{**row, "closed_median_s": None}]})
    assert "| after | 30 s | 1 | 60 s | 38/40 | 15.7 s | 14.6 s | 23.3 s | 37.4 s | 84% |" in table
    assert "| before | 30 s | 1 | 60 s | 38/40 | 15.7 s | - |" in table
    module = bench()
    assert module.parse_args(["--quick"]).seeds == 5
    assert module.parse_args([]).seeds == 40 and "recovery" in module.parse_args([]).parts
    with pytest.raises(SystemExit):
        module.parse_args(["--seeds", "0"])
