"""The fleet-wide circuit breaker, against a real Redis and several processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from celery_fleet import CircuitOpen, ConfigError, Fleet, Throttled
from celery_fleet.admission.config import parse_limits

MakeFleet = Callable[..., Fleet]
REQ = httpx.Request("POST", "http://sim/v1/chat/completions")
BREAKER = {
    "max_in_flight": 50,
    "breaker": {"failure_rate": 0.5, "min_calls": 10, "window": 30, "reset_timeout": 0.5},
}


def server_error(status: int = 500) -> Exception:
    return openai.InternalServerError(
        "boom", response=httpx.Response(status, request=REQ), body=None
    )


def calls(fleet: Fleet, pattern: str) -> None:
    """One call per letter: S succeeds, F fails with a 500."""
    for letter in pattern:
        try:
            with fleet.slot("llm"):
                if letter == "F":
                    raise server_error()
        except openai.InternalServerError:
            pass


def trip(fleet: Fleet) -> None:
    calls(fleet, "F" * 10)
    assert fleet.breaker("llm").state().state == "open"


def test_trips_on_failure_rate_not_on_consecutive_failures(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": BREAKER})
    calls(fleet, "SSFSFSFSSFSS")  # 33% failures: stays closed
    assert fleet.breaker("llm").state().state == "closed"
    fleet.breaker("llm").reset()
    calls(fleet, "FFFFSFFFFSF")  # 82% failures, never 5 in a row: opens on the 11th
    state = fleet.breaker("llm").state()
    assert state.state == "open" and 0 < state.retry_in_ms <= 500
    with pytest.raises(CircuitOpen) as info:
        with fleet.slot("llm"):
            pytest.fail("an open breaker admitted a call")
    assert 0 < info.value.wait_ms <= 500


def test_rate_limits_do_not_trip_unless_configured(make_fleet: MakeFleet, namespace: str) -> None:
    def rate_limited() -> None:
        resp = httpx.Response(429, headers={"retry-after-ms": "1"}, request=REQ)
        raise openai.RateLimitError("slow down", response=resp, body={"type": "requests"})

    for count, expected in ((False, "closed"), (True, "open")):
        fleet = make_fleet(
            {"llm": {**BREAKER, "breaker": {**BREAKER["breaker"], "count_rate_limits": count}}},
            namespace=f"{namespace}-rl-{count}",  # cleaned up with the test's namespace
        )
        for _ in range(12):
            time.sleep(0.002)  # past the 1 ms pause the 429 asked for
            with pytest.raises((Throttled, CircuitOpen)):
                with fleet.slot("llm", max_wait=1):
                    rate_limited()
        assert fleet.breaker("llm").state().state == expected
        fleet.breaker("llm").reset()


def test_validate_hook_turns_garbage_into_failures(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {**BREAKER, "validate": lambda text: bool(text.strip())}})
    for _ in range(10):
        with fleet.slot("llm") as slot:
            assert not slot.validate("   ")  # a 200 with empty output
    assert fleet.breaker("llm").state().state == "open"


def test_probe_success_closes_and_failure_reopens(make_fleet: MakeFleet) -> None:
    seen: list[tuple[str, str]] = []
    fleet = make_fleet({"llm": BREAKER})
    fleet.on_breaker_change(lambda limit, state: seen.append((limit, state)))
    trip(fleet)
    time.sleep(0.55)
    assert fleet.breaker("llm").state().state == "half_open"
    calls(fleet, "F")  # the probe fails: open again, for a new reset_timeout
    assert fleet.breaker("llm").state().state == "open"
    time.sleep(0.55)
    probe = fleet.try_acquire("llm")
    assert probe and probe.probe
    assert not fleet.try_acquire("llm")  # only one probe
    assert fleet.release(probe, "ok").transition == "closed"
    assert fleet.try_acquire("llm") and fleet.breaker("llm").state().state == "closed"
    assert seen == [
        ("llm", "open"),
        ("llm", "half_open"),
        ("llm", "open"),
        ("llm", "half_open"),
        ("llm", "closed"),
    ]


def test_a_crashed_probe_lets_another_probe_after_its_lease(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {**BREAKER, "lease": 1}})
    trip(fleet)
    time.sleep(0.55)
    assert fleet.try_acquire("llm").probe  # never released: the prober died
    refused = fleet.try_acquire("llm")
    assert not refused and refused.reason == "circuit_open"
    time.sleep(1.05)
    assert fleet.try_acquire("llm").probe


def test_manual_overrides(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": BREAKER})
    breaker = fleet.breaker("llm")
    assert breaker.force_open().state == "open"
    assert fleet.try_acquire("llm").reason == "circuit_open"
    assert breaker.force_closed().forced == "closed"
    calls(fleet, "F" * 20)
    assert fleet.try_acquire("llm")  # forced closed never trips
    assert breaker.unforce().forced is None
    assert breaker.reset().state == "closed"
    with pytest.raises(ConfigError, match="has no breaker"):
        make_fleet({"x": {"rpm": 10}}).breaker("x")


PROBER = textwrap.dedent(
    """
    import json, sys, time
    from celery_fleet import Fleet
    url, ns, limits, start = sys.argv[1:5]
    fleet = Fleet(redis_url=url, namespace=ns, limits=json.loads(limits))
    fleet.store.ping()
    time.sleep(max(0.0, float(start) - time.time()))
    d = fleet.try_acquire("llm")
    print(json.dumps([d.allowed, d.probe, d.reason]))
    """
)


def test_sixteen_processes_after_reset_timeout_make_exactly_one_probe(
    make_fleet: MakeFleet, redis_url: str, namespace: str
) -> None:
    fleet = make_fleet({"llm": BREAKER})
    trip(fleet)
    start = time.time() + 2.0  # all 16 ask at the same instant, past the reset timeout
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PROBER,
                redis_url,
                namespace,
                json.dumps({"llm": BREAKER}),
                str(start),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(16)
    ]
    answers = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(allowed for allowed, _, _ in answers) == 1
    assert [probe for allowed, probe, _ in answers if allowed] == [True]
    assert sorted(reason for allowed, _, reason in answers if not allowed) == ["circuit_open"] * 15


@pytest.mark.fast
def test_breaker_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        parse_limits({"llm": {"rpm": 1, "breaker": {"failure_rat": 0.5}}})
    with pytest.raises(ConfigError, match="failure_rate"):
        parse_limits({"llm": {"rpm": 1, "breaker": {"failure_rate": 2}}})
    with pytest.raises(ConfigError, match="validate.*must be a callable"):
        parse_limits({"llm": {"rpm": 1, "validate": 42}})
    with pytest.raises(ConfigError, match="cannot import 'os.no_such_check'"):
        parse_limits({"llm": {"rpm": 1, "validate": "os.no_such_check"}})
    assert parse_limits({"llm": {"rpm": 1, "validate": "os.path:isabs"}})["llm"].validate("/")


def test_a_slow_but_healthy_probe_closes_the_breaker(make_fleet: MakeFleet, rclient) -> None:  # type: ignore[no-untyped-def]
    """The latency target teaches AIMD; the breaker judges the call itself."""
    fleet = make_fleet({"llm": {**BREAKER, "adaptive": True, "latency_target": 0.001}})
    trip(fleet)
    time.sleep(0.55)
    probe = fleet.try_acquire("llm")
    # this slow call completes a block of 100 with 5% slow calls: congestion for AIMD
    rclient.hset(fleet.admission.keys("llm").ctl, mapping={"lat_n": 99, "lat_slow": 4})
    time.sleep(0.01)
    assert fleet.release(probe, "ok").transition == "closed"
    assert "ceiling" in fleet.adaptive_state("llm")


def test_slot_fail_counts_a_silent_failure(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": BREAKER})
    for _ in range(10):
        with fleet.slot("llm") as slot:
            slot.fail("the tool answered 200 with an error page")
    assert fleet.breaker("llm").state().state == "open"


def test_every_key_a_limit_writes_expires_but_an_override(
    make_fleet: MakeFleet, rclient, namespace: str
) -> None:  # type: ignore[no-untyped-def]
    """ctl and breaker hashes used to live for ever: 2,000 namespaces left 4,002 keys."""
    fleet = make_fleet(
        {"llm": {**BREAKER, "rpm": 600, "tpm": 60_000, "max_in_flight": 4, "adaptive": True}},
    )
    for outcome in ("ok", "overload", "fail", "rate", "ok"):
        time.sleep(0.01)  # past the 5 ms pause the last release asked for
        d = fleet.try_acquire("llm", tokens=10)
        fleet.settle(d, 20)
        fleet.admission.release("llm", d.lease_id, outcome, retry_after_ms=5)
    with fleet.slot("llm") as slot:
        slot.observe({"x-ratelimit-limit-requests": "300", "x-ratelimit-remaining-requests": "1"})
    keys = list(rclient.scan_iter(match=f"{{{namespace}:*"))
    assert {k.decode().rsplit(":", 1)[1] for k in keys} >= {"ctl", "breaker"}
    ttls = {k.decode(): rclient.pttl(k) for k in keys}
    # a day past the last use, and past the furthest bucket arrival time (here < 2 min)
    assert all(0 < ttl <= 86_400_000 + 120_000 for ttl in ttls.values()), ttls
    breaker_key = fleet.admission.keys("llm").breaker
    fleet.breaker("llm").force_open()
    assert rclient.pttl(breaker_key) == -1  # an operator's override lasts until lifted
    fleet.breaker("llm").unforce()
    assert 0 < rclient.pttl(breaker_key) <= 86_400_000


def test_breaker_repr_says_what_it_is(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": BREAKER})
    text = repr(fleet.breaker("llm"))
    assert text.startswith("<Breaker 'llm' failure_rate=") and "reset_timeout=" in text


def test_a_breaker_change_is_sent_as_a_fleet_breaker_event(redis_url: str, namespace: str) -> None:
    """The README's promise: an event receiver (as Flower or `celery events` run) sees it."""
    from celery import Celery

    from benchmarks.harness.herd import BreakerEvents, close_app
    from celery_fleet.celery.signals import breaker_state_changed

    app = Celery("events-test", broker=redis_url, set_as_current=False)
    app.conf.fleet_limits = {"llm": BREAKER}
    app.conf.fleet_namespace = namespace
    fleet = Fleet(app)
    signalled: list[str] = []

    def on_change(sender: object, limit: str, state: str, **_: object) -> None:
        signalled.append(state)

    breaker_state_changed.connect(on_change, weak=False)
    events = BreakerEvents(app)
    try:
        time.sleep(0.5)  # the receiver's queue is bound
        trip(fleet)
        deadline = time.monotonic() + 5
        while not events.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [(limit, state) for _, limit, state in events.seen] == [("llm", "open")]
        assert signalled == ["open"]
    finally:
        breaker_state_changed.disconnect(on_change)
        events.stop()
        close_app(app)
