"""The local limiter (a process's share of every budget while Redis is away), in memory.

Time is the ``now_ms`` each call is given, so a minute of traffic runs in milliseconds and
no test waits. The limiter's one random draw (where its empty bucket's first unit falls)
is pinned where a test needs an exact answer.
"""

from __future__ import annotations

import pytest

from celery_fleet.admission.config import parse_limits
from celery_fleet.resilience import local_limiter
from celery_fleet.resilience.local_limiter import (
    LOCAL_POLL_MS,
    LocalLimiter,
    allotment,
    fleet_cap,
)

pytestmark = pytest.mark.fast

T0 = 1_700_000_000_000.0


def admitted_in(limiter: LocalLimiter, name: str, seconds: int, every_ms: int = 10) -> int:
    """How many asks of one request each pass in ``seconds`` of asking every ``every_ms``
    (each admitted lease given back at once, so only the rate limits)."""
    cfg = limiter.limits[name]
    count = 0
    for i in range(seconds * 1000 // every_ms):
        decision = limiter.acquire(cfg, 0, f"lease{i}", T0 + i * every_ms)
        if decision:
            count += 1
            assert decision.lease_id is not None
            limiter.release(name, decision.lease_id)
    return count


@pytest.mark.parametrize("share", [1, 4, 10])
def test_each_process_admits_its_share_of_the_rate(share: int) -> None:
    limits = parse_limits({"llm": {"rpm": 600, "burst": 0.1}})  # budget 540/min after headroom
    budget = limits["llm"].windows[0].budget
    count = admitted_in(LocalLimiter(limits, share), "llm", 60)
    # a minute at 1/share of the budget, plus at most the (divided) burst and one unit
    assert budget / share - 1 <= count <= budget / share + budget * 0.1 / share + 1


def test_the_bucket_starts_empty_its_first_unit_a_random_part_of_an_interval_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limits = parse_limits({"llm": {"rpm": 600, "burst": 1.0}})
    cfg, emission = limits["llm"], limits["llm"].windows[0].emission_ms * 4
    monkeypatch.setattr(local_limiter.random, "random", lambda: 0.5)
    late = LocalLimiter(limits, 4).acquire(cfg, 0, "a", T0)
    assert not late and late.wait_ms == pytest.approx(emission / 2, abs=1)
    assert late.reason == "requests/60s"
    monkeypatch.setattr(local_limiter.random, "random", lambda: 0.0)
    limiter = LocalLimiter(limits, 4)
    assert limiter.acquire(cfg, 0, "b", T0)
    # no burst the outage did not earn: the next unit is one (local) interval later
    second = limiter.acquire(cfg, 0, "c", T0)
    assert not second and second.wait_ms == pytest.approx(emission, abs=1)
    assert limiter.acquire(cfg, 0, "c", T0 + emission)


def test_the_in_flight_cap_is_the_share_of_the_cap_and_at_least_one() -> None:
    limits = parse_limits({"a": {"max_in_flight": 8}, "b": {"max_in_flight": 2}, "c": {"rpm": 60}})
    limiter = LocalLimiter(limits, 4)
    assert limiter.cap(limits["a"]) == 2
    assert limiter.cap(limits["b"]) == 1  # 2 // 4, but one each or nobody could work
    assert limiter.cap(limits["c"]) is None
    assert LocalLimiter(limits, 4, allotted={"a": 0}).cap(limits["a"]) == 0


def test_a_full_cap_refuses_briefly_until_a_lease_is_given_back() -> None:
    limits = parse_limits({"llm": {"max_in_flight": 4}})
    cfg = limits["llm"]
    limiter = LocalLimiter(limits, 2)
    leases = [limiter.acquire(cfg, 0, f"l{i}", T0).lease_id for i in range(2)]
    assert leases == ["local.l0", "local.l1"] and limiter.in_flight("llm") == 2
    full = limiter.acquire(cfg, 0, "l2", T0)
    assert (full.allowed, full.reason, full.wait_ms) == (False, "in_flight", LOCAL_POLL_MS)
    assert limiter.release("llm", "local.l0")
    assert not limiter.release("llm", "local.l0")  # once only
    assert limiter.acquire(cfg, 0, "l2", T0)


def test_slots_held_through_redis_count_against_the_local_cap() -> None:
    limits = parse_limits({"llm": {"max_in_flight": 4}})
    limiter = LocalLimiter(limits, 2, held=lambda _limit: 2)
    refused = limiter.acquire(limits["llm"], 0, "x", T0)
    assert not refused and refused.reason == "in_flight" and refused.in_flight == 2


def test_tokens_are_charged_on_ask_and_settled_to_the_actual_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local_limiter.random, "random", lambda: 0.0)
    limits = parse_limits({"llm": {"tpm": 60_000, "burst": 1.0}})
    cfg = limits["llm"]
    limiter = LocalLimiter(limits, 1)
    emission = cfg.windows[0].emission_ms
    assert not limiter.acquire(cfg, 1000, "x", T0)  # an empty bucket: 1000 tokens not earned
    lease = limiter.acquire(cfg, 1000, "x", T0 + 1000 * emission).lease_id
    assert lease is not None
    assert limiter.settle(cfg, lease, 1500) == 500
    assert limiter.settle(cfg, lease, 1500) == 0  # settled twice: charged once
    assert limiter.settle(cfg, "local.unknown", 10) == 0
    assert limiter.leases("llm") == [(lease, 1500)]


def test_owed_is_what_the_shared_bucket_still_remembers_of_local_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local_limiter.random, "random", lambda: 0.0)
    limits = parse_limits({"llm": {"rpm": 600, "burst": 1.0}, "idle": {"rpm": 60}})
    cfg, emission = limits["llm"], limits["llm"].windows[0].emission_ms
    limiter = LocalLimiter(limits, 4)
    assert limiter.owed(T0) == {}
    for i in range(3):
        assert limiter.acquire(cfg, 0, f"l{i}", T0 + i * 4 * emission)
    # three calls, one shared interval each, none of it forgotten yet at T0
    field, ms = limiter.owed(T0)["llm"]
    assert field == "r:60" and float(ms) == pytest.approx(3 * emission)
    assert "idle" not in limiter.owed(T0)
    assert limiter.owed(T0 + 3 * 4 * emission) == {}  # all of it leaked away


def test_allotments_never_sum_above_the_cap() -> None:
    for cap in (1, 5, 16):
        for processes in (1, 3, 8, 20):
            for in_flight in range(cap + 1):
                held = [1 if i < min(in_flight, processes) else 0 for i in range(processes)]
                total = sum(
                    allotment(cap, in_flight, held[rank], processes, rank)
                    for rank in range(processes)
                )
                assert sum(held) <= total <= max(cap, sum(held))


def test_fleet_cap_is_the_max_in_flight_and_zero_without_one() -> None:
    limits = parse_limits(
        {
            "fixed": {"max_in_flight": 7},
            "adaptive": {"adaptive": True, "initial_in_flight": 3, "max_in_flight": 9},
            "rate": {"rpm": 60},
        }
    )
    assert [fleet_cap(limits[n]) for n in ("fixed", "adaptive", "rate")] == [7, 9, 0]
