"""The admission script's semantics, against a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from celery_fleet import ConfigError, Fleet, StoreUnavailable
from celery_fleet.admission.core import Admission
from celery_fleet.testing.redis_server import free_port

MakeFleet = Callable[..., Fleet]


def test_admits_up_to_burst_then_refuses_with_exact_wait(make_fleet: MakeFleet) -> None:
    # 600/min: one request every 100 ms; burst 0.01 -> 6 at once.
    fleet = make_fleet({"llm": {"rpm": 600, "burst": 0.01}})
    admitted = [fleet.try_acquire("llm") for _ in range(6)]
    assert all(admitted)
    refused = fleet.try_acquire("llm")
    assert not refused and refused.reason == "requests/60s"
    assert 0 < refused.wait_ms <= 100
    # The wait is exact: retried after wait_ms it is admitted...
    time.sleep(refused.wait_ms / 1000.0)
    assert fleet.try_acquire("llm")
    # ...and retried 30 ms early it is not (the wait does not over-promise).
    again = fleet.try_acquire("llm")
    assert not again and again.wait_ms > 70
    time.sleep((again.wait_ms - 30) / 1000.0)
    early = fleet.try_acquire("llm")
    assert not early
    assert early.wait_ms <= 30 + 10
    time.sleep(early.wait_ms / 1000.0)
    assert fleet.try_acquire("llm")


def test_refusal_consumes_nothing_in_any_dimension(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": {"rpm": 100, "tpm": 1000, "max_in_flight": 5, "burst": 1.0}})
    first = fleet.try_acquire("llm", tokens=800)
    assert first
    keys = fleet.admission.keys("llm")
    before = rclient.hgetall(keys.ctl)
    refused = fleet.try_acquire("llm", tokens=500)  # RPM and in-flight allow it, TPM does not
    assert not refused and refused.reason == "tokens/60s"
    assert rclient.hgetall(keys.ctl) == before
    assert rclient.zcard(keys.leases) == 1
    # 200 tokens still fit: the refused call did not take the requests budget either.
    assert fleet.try_acquire("llm", tokens=200)


def test_wait_is_the_max_over_refusing_dimensions(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"rpm": 60, "tpm": 600, "burst": 0.1}})  # 6 req / 60 tokens burst
    assert fleet.try_acquire("llm", tokens=60)
    refused = fleet.try_acquire("llm", tokens=60)
    # requests: fine (5 left); tokens: 60 more need 60 * 100 ms = 6 s
    assert refused.reason == "tokens/60s"
    assert 5_900 <= refused.wait_ms <= 6_000


def test_all_windows_of_a_dimension_are_checked(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"requests": "100/minute;3/day", "burst": 1.0}})
    assert all(fleet.try_acquire("llm") for _ in range(3))
    refused = fleet.try_acquire("llm")
    assert not refused and refused.reason == "requests/86400s"
    assert refused.wait_ms == pytest.approx(86_400_000 / 3, rel=0.001)


def test_headroom_leaves_part_of_the_budget(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"rpm": 10, "headroom": 0.5, "burst": 1.0}})
    results = [bool(fleet.try_acquire("llm")) for _ in range(7)]
    assert results == [True] * 5 + [False] * 2


def test_in_flight_cap_and_release(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 2}})
    a, b = fleet.try_acquire("tool"), fleet.try_acquire("tool")
    assert a and b and b.in_flight == 2
    refused = fleet.try_acquire("tool")
    assert not refused and refused.reason == "in_flight" and refused.wait_ms >= 1
    assert fleet.release(a).released
    assert fleet.try_acquire("tool")
    assert not fleet.release(a).released  # releasing twice is harmless and reported


def test_settle_refunds_and_charges_without_double_counting(make_fleet: MakeFleet) -> None:
    # 6000 tokens/min = 10 ms per token; bucket of 1000 tokens.
    fleet = make_fleet({"llm": {"tpm": 6000, "burst": 1000 / 6000}})
    d = fleet.try_acquire("llm", tokens=1000)
    assert d and not fleet.try_acquire("llm", tokens=100)
    assert fleet.settle(d, 400) == -600  # refund 600
    assert fleet.settle(d, 400) == 0  # the same settle again changes nothing
    e = fleet.try_acquire("llm", tokens=500)
    assert e
    assert not fleet.try_acquire("llm", tokens=200)  # only ~100 left
    assert fleet.settle(e, 900) == 400  # used more than estimated: charged
    refused = fleet.try_acquire("llm", tokens=1)
    # 400 + 900 = 1300 tokens spent against a 1000 bucket: 300 + 1 tokens of debt
    assert not refused and refused.wait_ms == pytest.approx(3010, abs=60)


def test_refund_never_overfills_the_bucket(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"tpm": 6000, "burst": 1000 / 6000}})
    d = fleet.try_acquire("llm", tokens=100)
    fleet.settle(d, 0)
    fleet.settle(d, 0)
    assert fleet.try_acquire("llm", tokens=1000)
    assert not fleet.try_acquire("llm", tokens=10)


def test_settle_after_the_lease_expired_still_charges(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": {"tpm": 6000, "burst": 1000 / 6000}})
    d = fleet.try_acquire("llm", tokens=100)
    rclient.delete(fleet.admission.keys("llm").leases)  # as if the lease expired
    assert fleet.settle(d, 1000) == 900
    assert not fleet.try_acquire("llm", tokens=100)


def test_expired_leases_free_their_slots(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 1, "lease": 1}})
    held = fleet.try_acquire("tool")
    assert held and not fleet.try_acquire("tool")
    time.sleep(1.05)
    assert fleet.try_acquire("tool")
    assert not fleet.release(held).released


def test_renew_extends_live_leases_and_reports_lost_ones(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 2, "lease": 1}})
    a, b = fleet.try_acquire("tool"), fleet.try_acquire("tool")
    time.sleep(0.6)
    assert fleet.admission.renew("tool", [(a.lease_id, 0)]) == ([], [])
    time.sleep(0.6)  # b has expired, a was renewed
    assert fleet.admission.renew("tool", [(a.lease_id, 0), (b.lease_id, 0)]) == ([b.lease_id], [])
    assert fleet.admission.in_flight("tool") == 1


def test_pause_and_cap_in_ctl_are_honoured(make_fleet: MakeFleet, rclient: redis.Redis) -> None:
    """The per-limit control hash is read by the same script (adaptive limits write it)."""
    fleet = make_fleet({"llm": {"rpm": 600, "max_in_flight": 10, "adaptive": True}})
    ctl = fleet.admission.keys("llm").ctl
    now_s, now_us = rclient.time()
    rclient.hset(ctl, "pause_until", now_s * 1000 + now_us / 1000 + 2_000)
    paused = fleet.try_acquire("llm")
    assert not paused and paused.reason == "paused" and 1_900 < paused.wait_ms <= 2_000
    rclient.hdel(ctl, "pause_until")
    rclient.hset(ctl, "cap", 2)
    assert fleet.try_acquire("llm") and fleet.try_acquire("llm")
    assert fleet.try_acquire("llm").reason == "in_flight"


def test_scripts_survive_script_flush(make_fleet: MakeFleet, rclient: redis.Redis) -> None:
    fleet = make_fleet({"llm": {"rpm": 600}})
    assert fleet.try_acquire("llm")
    rclient.script_flush()
    assert fleet.try_acquire("llm")


def test_unknown_limit_lists_known_ones(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"openai": {"rpm": 10}, "search": {"rpm": 10}})
    with pytest.raises(ConfigError, match="unknown limit 'opneai'; known limits: openai, search"):
        fleet.try_acquire("opneai")
    with pytest.raises(ConfigError, match="unknown limit"):
        fleet.slot("opneai")


def test_unreachable_redis_names_the_url() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    fleet = Fleet(redis_url=url, limits={"llm": {"rpm": 10}})
    with pytest.raises(StoreUnavailable) as info:  # the core raises; Fleet applies a policy
        Admission(fleet.store, fleet.limits).try_acquire("llm")
    assert f"127.0.0.1:{info.value.url.rsplit(':', 1)[1]}" in str(info.value)
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    with pytest.raises(StoreUnavailable):
        fleet.check()


def test_an_absurd_settle_blocks_a_window_for_at_most_one_period(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    """settle(10**15) on a 100k tpm limit used to refuse every process for ~19,000 years."""
    fleet = make_fleet({"llm": {"tpm": 100_000}})
    with fleet.slot("llm", tokens=100) as slot:
        slot.settle(10**15)
    refused = fleet.try_acquire("llm", tokens=100)
    assert not refused and refused.reason == "tokens/60s"
    # at most one whole period of debt (plus the call's own cost)
    assert 55_000 <= refused.wait_ms <= 60_000 + 100
    keys = fleet.admission.keys("llm")
    tat = float(rclient.hget(keys.ctl, "t:60"))  # type: ignore[arg-type]
    assert tat <= refused.at_ms + 60_000 + 6_000 + 1  # one period of debt + the burst
    assert 0 < rclient.pttl(keys.ctl) <= 86_400_000 + 60_000 + 6_000 + 1_000
    fleet.reset_buckets("llm")  # the operator's way out
    assert fleet.try_acquire("llm", tokens=100)


def test_a_settle_beyond_lua_precision_is_refused_before_any_write(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    """settle(10**18) used to fail in PEXPIRE after the window HSETs had landed."""
    fleet = make_fleet({"llm": {"tpm": 100_000}})
    keys = fleet.admission.keys("llm")
    with fleet.slot("llm", tokens=100) as slot:
        before = rclient.hgetall(keys.ctl)
        with pytest.raises(ConfigError, match="not a plausible token count"):
            slot.settle(10**18)
        assert rclient.hgetall(keys.ctl) == before
        assert slot.settle(100) == 0  # nothing was half-done: the reservation is intact
    assert fleet.try_acquire("llm", tokens=100)


def test_a_wait_beyond_any_int_is_clamped_not_an_overflow(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    """A TAT or pause far in the future (written by an older version, or by hand) gives a
    long but finite wait_ms; slot() raises Throttled, not OverflowError."""
    from celery_fleet import Throttled
    from celery_fleet.admission.decision import MAX_WAIT_MS

    fleet = make_fleet({"llm": {"tpm": 100_000}})
    rclient.hset(fleet.admission.keys("llm").ctl, "t:60", "1e300")
    refused = fleet.try_acquire("llm", tokens=100)
    assert not refused and refused.wait_ms == MAX_WAIT_MS
    with pytest.raises(Throttled) as info:
        with fleet.slot("llm", tokens=100, max_wait=0.1):
            pass
    assert info.value.wait_ms == MAX_WAIT_MS


def test_a_huge_retry_after_pauses_ten_minutes_at_most(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"rpm": 600}})
    d = fleet.try_acquire("llm")
    fleet.admission.release("llm", d.lease_id, "neutral", retry_after_ms=10**18)
    refused = fleet.try_acquire("llm")
    assert refused.reason == "paused" and 590_000 <= refused.wait_ms <= 600_000


def test_absurd_provider_headers_cannot_block_for_long(make_fleet: MakeFleet) -> None:
    from celery_fleet.admission.providers import Observation

    fleet = make_fleet({"llm": {"rpm": 600, "tpm": 60_000}})
    obs = Observation(
        requests_remaining=-(10**30), tokens_remaining=-5, requests_limit=1e-300, tokens_limit=1
    )
    d = fleet.try_acquire("llm")
    fleet.admission.observe("llm", obs, d.lease_id)
    fleet.release(d)
    refused = fleet.try_acquire("llm")
    # an empty bucket at a twentieth of the rate: 100 ms x 20, not years
    assert not refused and refused.wait_ms <= 2_000 + 10


def test_default_burst_keeps_a_sliding_window_near_its_budget(make_fleet: MakeFleet) -> None:
    """From idle, a limit with the default burst admits at most (1 + 0.1) x budget in any
    span of one period (a full bucket of 1.0 let through 2x: 119 of rpm=60)."""
    fleet = make_fleet({"llm": {"rate": "60/2 second"}})  # 60 per 2 s: 30 per s
    admitted: list[float] = []
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        d = fleet.try_acquire("llm")
        if d:
            admitted.append(d.at_ms)
        else:
            time.sleep(min(d.wait_ms, 5) / 1000)
    first = admitted[0]
    in_first_period = sum(1 for t in admitted if t < first + 2_000)
    assert 60 <= in_first_period <= 66 + 1
