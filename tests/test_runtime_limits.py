"""Limits changed at runtime (``fleet.set_limit``): two Fleets on a real Redis, as two
processes would be; the worker processes are in tests/integration/test_runtime_worker.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import Fleet
from celery_fleet.admission.runtime import POLL_S, config_key
from celery_fleet.errors import ConfigError
from celery_fleet.testing.redis_server import RedisServer

LIMITS = {"llm": {"rpm": 60, "max_in_flight": 1}, "other": {"max_in_flight": 2}}
#: A generous bound on "applied within one poll" (the target is one second).
APPLIED_WITHIN_S = 10.0


def wait_for(condition: Callable[[], bool], timeout_s: float = APPLIED_WITHIN_S) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s`` (a bound, not a speed)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not applied in time"
        time.sleep(0.02)


def test_a_change_in_one_fleet_is_applied_by_another(make_fleet: Callable[..., Fleet]) -> None:
    writer, other = make_fleet(LIMITS), make_fleet(LIMITS)
    held = other.try_acquire("llm")  # its first ask starts its poller
    assert held and not other.try_acquire("llm")  # cap 1
    version = writer.set_limit("llm", max_in_flight=3, rpm=600)
    assert writer.limits["llm"].max_in_flight == 3  # the writer at once
    wait_for(lambda: other.admission.runtime.applied("llm").version == version)
    assert other.limits["llm"].max_in_flight == 3
    assert other.admission.limit("llm").windows[0].declared == 600
    assert other.try_acquire("llm") and other.try_acquire("llm")  # the wider cap admits
    assert not other.try_acquire("llm")
    applied = other.admission.runtime.applied("llm")
    assert dict(applied.fields) == {"max_in_flight": 3, "rpm": 600}
    assert other.admission.runtime.applied("other").version == 0  # untouched


def test_changes_add_up_and_a_budget_replaces_its_dimension(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet({"llm": {"requests": "60/minute;1000/day", "tpm": 5000}})
    fleet.set_limit("llm", rpm=120)
    fleet.set_limit("llm", max_in_flight=4, tpm=None)
    cfg = fleet.limits["llm"]
    assert [w.describe() for w in cfg.windows] == ["120 requests/60s"]  # the day went too
    assert cfg.max_in_flight == 4
    assert dict(fleet.admission.runtime.applied("llm").fields) == {
        "rpm": 120,
        "max_in_flight": 4,
        "tpm": None,
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rpm": 0}, r"set_limit\('llm'\)\['rpm'\] must be a positive int, got 0"),
        ({"max_in_flight": "many"}, r"\['max_in_flight'\]"),
        ({"rpm": 60, "rate": "10/second"}, r"sets \['rpm', 'rate'\]"),
        ({"lease": 5}, r"cannot change \['lease'\] at runtime"),
        ({}, "changes nothing"),
    ],
)
def test_a_bad_value_changes_nothing_anywhere(
    make_fleet: Callable[..., Fleet],
    rclient: redis.Redis,
    namespace: str,
    fields: dict[str, Any],
    message: str,
) -> None:
    fleet, other = make_fleet(LIMITS), make_fleet(LIMITS)
    version = fleet.set_limit("llm", max_in_flight=2)
    before = rclient.hgetall(config_key(namespace))
    with pytest.raises(ConfigError, match=message):
        fleet.set_limit("llm", **fields)
    assert rclient.hgetall(config_key(namespace)) == before
    assert fleet.limits["llm"].max_in_flight == 2
    assert fleet.admission.runtime.applied("llm").version == version
    other.admission.runtime.sync()
    assert other.limits["llm"].max_in_flight == 2 and other.limits["llm"].windows[0].declared == 60


def test_an_unknown_limit_is_refused(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(LIMITS)
    with pytest.raises(ConfigError, match="unknown limit 'nope'"):
        fleet.set_limit("nope", rpm=5)
    with pytest.raises(ConfigError, match="unknown limit 'nope'"):
        fleet.reset_limit("nope")


def test_narrowing_the_cap_revokes_no_slot_and_admits_nobody_until_below(
    make_fleet: Callable[..., Fleet],
) -> None:
    limits = {"llm": {"max_in_flight": 3}}
    writer, other = make_fleet(limits), make_fleet(limits)
    held = [other.try_acquire("llm") for _ in range(3)]
    assert all(held)
    version = writer.set_limit("llm", max_in_flight=1)
    other.admission.runtime.sync()
    assert other.admission.runtime.applied("llm").version == version
    assert other.admission.in_flight("llm") == 3  # nothing revoked
    for decision in held[:2]:
        refused = other.try_acquire("llm")
        assert not refused and refused.reason == "in_flight"
        assert other.release(decision).released  # still held until given back
    assert not other.try_acquire("llm")  # 1 held, cap 1
    assert other.release(held[2]).released
    assert other.try_acquire("llm")  # below the new cap: admitted


def _drain(fleet: Fleet) -> int:
    """Ask until refused; how many were admitted."""
    n = 0
    while fleet.try_acquire("llm"):
        n += 1
        assert n < 10_000
    return n


@pytest.mark.parametrize(("before", "after"), [(60, 600), (600, 60)])
def test_a_new_rate_applies_from_the_next_ask_without_free_admissions_or_a_stall(
    make_fleet: Callable[..., Fleet], before: int, after: int
) -> None:
    # rpm 60: one request per 1000 ms, a bucket of 6; rpm 600: per 100 ms, a bucket of 60.
    # A drained bucket stays drained at the new rate (no burst of free admissions) and
    # refills at the new rate (the wait is one new emission interval, not the old debt
    # scaled: a narrowing from 600 to 60 must not stall for a minute).
    fleet = make_fleet({"llm": {"rpm": before}})
    assert _drain(fleet) >= before // 10
    fleet.set_limit("llm", rpm=after)
    refused = fleet.try_acquire("llm")
    assert not refused, "a drained bucket admitted after the change"
    interval_ms = 60_000 / after
    assert refused.wait_ms <= interval_ms + 50, refused  # Redis's figure, not a wall clock
    assert refused.reason == "requests/60s"


def test_reset_goes_back_to_the_configured_values_everywhere(
    make_fleet: Callable[..., Fleet], rclient: redis.Redis, namespace: str
) -> None:
    writer, other = make_fleet(LIMITS), make_fleet(LIMITS)
    other.try_acquire("other")
    set_version = writer.set_limit("llm", max_in_flight=5, rpm=6000)
    wait_for(lambda: other.limits["llm"].max_in_flight == 5)
    reset_version = writer.reset_limit("llm")
    assert reset_version > set_version
    assert writer.limits["llm"] == writer.admission.runtime.configured["llm"]
    wait_for(lambda: other.admission.runtime.applied("llm").version == reset_version)
    assert other.limits["llm"].max_in_flight == 1
    assert other.limits["llm"].windows[0].declared == 60
    assert dict(other.admission.runtime.applied("llm").fields) == {}
    assert rclient.hget(config_key(namespace), "limit:llm") is None  # the override is gone


def test_versions_never_go_backwards_after_the_config_is_lost(
    make_fleet: Callable[..., Fleet], rclient: redis.Redis, namespace: str
) -> None:
    writer, other = make_fleet(LIMITS), make_fleet(LIMITS)
    other.try_acquire("other")
    first = writer.set_limit("llm", max_in_flight=4)
    wait_for(lambda: other.admission.runtime.applied("llm").version == first)
    rclient.delete(config_key(namespace))  # a flush, a failover to an empty replica
    # The process that saw versions writes a higher one: back to the configured values,
    # together, and what the fleet shows keeps growing.
    wait_for(lambda: other.admission.runtime.applied("llm").version > first)
    assert other.limits["llm"].max_in_flight == 1
    assert int(rclient.hget(config_key(namespace), "version")) > first
    # A Redis clock behind the versions written (a failover to a host whose clock lags):
    # the next version still grows, past the stored one and past what the writer saw.
    ahead = other.admission.runtime.applied("llm").version + 10**12
    rclient.hset(config_key(namespace), mapping={"version": ahead, "version:llm": ahead})
    assert writer.set_limit("llm", rpm=120) == ahead + 1
    rclient.delete(config_key(namespace))
    assert writer.set_limit("llm", rpm=90) == ahead + 2  # the writer's own floor


def test_redis_down_keeps_the_last_applied_values_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with RedisServer() as server:
        fleet = Fleet(redis_url=server.url, namespace="down", limits=LIMITS)
        fleet.set_limit("llm", max_in_flight=7)
        reader = Fleet(redis_url=server.url, namespace="down", limits=LIMITS)
        reader.admission.runtime.sync()
        assert reader.limits["llm"].max_in_flight == 7
    caplog.set_level(logging.WARNING, "celery_fleet")
    for _ in range(3):
        reader.admission.runtime.poll_quietly()
    assert reader.limits["llm"].max_in_flight == 7
    warned = [r for r in caplog.records if "cannot read the runtime limits" in r.message]
    assert len(warned) == 1, caplog.text


def test_async_use_follows_changes(make_fleet: Callable[..., Fleet]) -> None:
    writer, other = make_fleet(LIMITS), make_fleet(LIMITS)

    async def main() -> None:
        async with other.aslot("llm"):  # the first ask starts the poller
            pass
        version = writer.set_limit("llm", max_in_flight=2)
        deadline = time.monotonic() + APPLIED_WITHIN_S
        while other.admission.runtime.applied("llm").version != version:
            assert time.monotonic() < deadline
            await asyncio.sleep(POLL_S / 5)
        async with other.aslot("llm"), other.aslot("llm", max_wait=0):
            pass  # two at once: the new cap
        await other.aclose()

    asyncio.run(main())


def test_status_shows_the_version_and_the_fields(make_fleet: Callable[..., Fleet]) -> None:
    from celery_fleet.observability.status import limit_status

    writer, reader = make_fleet(LIMITS), make_fleet(LIMITS)
    assert limit_status(reader, "llm").config_version == 0
    version = writer.set_limit("llm", max_in_flight=4)
    s = limit_status(reader, "llm")  # a process that never asked reads it for status
    assert (s.config_version, s.config_fields, s.cap) == (version, {"max_in_flight": 4}, 4)
    assert f"config v{version} (max_in_flight=4)" in s.summary()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_follows_changes_with_a_poller_of_its_own(
    make_fleet: Callable[..., Fleet],
) -> None:
    writer, reader = make_fleet(LIMITS), make_fleet(LIMITS)
    assert reader.try_acquire("other")  # the parent's poller runs; a child has no thread
    pid = os.fork()
    if pid == 0:  # the child: ask once, then see the parent's change arrive
        code = 1
        try:
            reader.try_acquire("other")
            deadline = time.monotonic() + APPLIED_WITHIN_S
            while time.monotonic() < deadline:
                if reader.limits["llm"].max_in_flight == 3:
                    code = 0
                    break
                time.sleep(0.02)
        finally:
            os._exit(code)
    writer.set_limit("llm", max_in_flight=3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child never applied the change"


@pytest.mark.parametrize(
    "spec",
    [
        {"rpm": 5, "tpm": 1000, "max_in_flight": 3},
        {"requests": "500/minute;10000/day", "headroom": 0.1, "burst": 0.2, "lease": 30},
        {"rate": "10/second", "tokens": "200000/minute;5000000/day"},
        {"max_in_flight": 8, "adaptive": True, "min_in_flight": 2, "latency_target": 1.5},
        {"rpm": 60, "burst": 1.0, "breaker": True},
    ],
)
def test_the_configured_limit_written_back_as_options_parses_to_itself(
    spec: dict[str, Any],
) -> None:
    # Every runtime change is merged with this: it must add nothing and lose nothing.
    from celery_fleet.admission.config import parse_limit
    from celery_fleet.admission.overrides import runtime_spec

    cfg = parse_limit("llm", spec, "fleet_limits['llm']")
    again = parse_limit("llm", runtime_spec(cfg), "again")
    assert again == dataclasses.replace(cfg, breaker=None, validate=None)


def test_a_wider_cap_admits_a_caller_waiting_in_line_without_a_release(
    make_fleet: Callable[..., Fleet],
) -> None:
    # The provider raised the quota: an agent already waiting goes now, not at the next
    # release (the holder here keeps its slot throughout).
    writer, other = make_fleet(LIMITS), make_fleet(LIMITS)
    holder = writer.try_acquire("llm")
    assert holder
    admitted = threading.Event()

    def wait_in_line() -> None:
        with other.slot("llm", max_wait=APPLIED_WITHIN_S * 2):
            admitted.set()

    thread = threading.Thread(target=wait_in_line, daemon=True)
    thread.start()
    wait_for(lambda: len(other.line("llm")) == 1)
    writer.set_limit("llm", max_in_flight=2)
    assert admitted.wait(APPLIED_WITHIN_S), "the waiter was not admitted under the wider cap"
    thread.join(APPLIED_WITHIN_S)
    assert writer.admission.in_flight("llm") == 1  # the holder's; the waiter's came and went


def test_a_change_wakes_the_callers_already_waiting_in_this_process(
    make_fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keyed, laned callers of another process wait in line behind a full cap; the change
    # must reach them when their process applies it, not at their next re-ask. The re-ask
    # interval is stretched past the bound so only the wake-up can admit them in time.
    from celery_fleet.admission import slot as slot_module

    monkeypatch.setattr(slot_module, "NEXT_IN_LINE_S", 120.0)
    monkeypatch.setattr(slot_module, "REFRESH_S", 120.0)
    limits = {
        "llm": {
            "max_in_flight": 1,
            "weights": {"acme": 3},
            "lanes": {"interactive": {"priority": 0}, "batch": {"priority": 1}},
        }
    }
    writer, other = make_fleet(limits), make_fleet(limits)
    holder = writer.try_acquire("llm", key="holder")
    assert holder
    admitted = threading.Semaphore(0)

    def wait_in_line(key: str, lane: str) -> None:
        with other.slot("llm", key=key, lane=lane, max_wait=APPLIED_WITHIN_S * 6):
            admitted.release()

    callers = [("acme", "interactive"), ("globex", "batch")]
    threads = [threading.Thread(target=wait_in_line, args=c, daemon=True) for c in callers]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(other.line("llm")) == 2)
    writer.set_limit("llm", max_in_flight=3)
    for _ in callers:
        assert admitted.acquire(timeout=APPLIED_WITHIN_S), "a waiter slept through the change"
    for thread in threads:
        thread.join(APPLIED_WITHIN_S)
    writer.release(holder)


def _change_between_ask_and_wait(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, **fields: Any
) -> tuple[list[int], list[bool]]:
    """Make ``fleet.set_limit("llm", **fields)`` land right after the first refused ask's
    reply and before its caller waits (the window an ask in flight leaves open), and
    record how each wait of the caller ended (True: woken; False: its timeout)."""
    from celery_fleet.admission import slot as slot_module

    # The re-ask timers stretched past the test's max_wait: only a wake-up admits in time.
    monkeypatch.setattr(slot_module, "NEXT_IN_LINE_S", 120.0)
    monkeypatch.setattr(slot_module, "REFRESH_S", 120.0)
    admission, versions, waits = fleet.admission, [], []
    remember, wait_turn, await_turn = (
        admission.remember_place, admission.wait_turn, admission.await_turn
    )  # fmt: skip

    def remember_then_change(name: str, run: Any, decision: Any) -> None:
        remember(name, run, decision)  # called after every ask of a slot, before any wait
        if not decision.allowed and not versions:
            versions.append(fleet.set_limit("llm", **fields))

    def spy(*args: Any) -> bool:
        waits.append(wait_turn(*args))
        return waits[-1]

    async def aspy(*args: Any) -> bool:
        waits.append(await await_turn(*args))
        return waits[-1]

    monkeypatch.setattr(admission, "remember_place", remember_then_change)
    monkeypatch.setattr(admission, "wait_turn", spy)
    monkeypatch.setattr(admission, "await_turn", aspy)
    return versions, waits


def test_a_change_landing_while_a_waiters_ask_is_in_flight_still_wakes_it(
    make_fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The change's wake-up goes to the waiters registered when it lands; this one was
    # between its refused ask and its wait. Before: it slept to its re-ask (here its whole
    # max_wait, the wait ending False); now it finds the limit's generation moved.
    fleet = make_fleet(LIMITS)
    holder = fleet.try_acquire("llm")
    assert holder
    versions, waits = _change_between_ask_and_wait(fleet, monkeypatch, max_in_flight=2)
    with fleet.slot("llm", max_wait=5) as slot:
        assert slot.attempts == 2  # refused under cap 1, admitted under cap 2
    assert versions and waits == [True]
    fleet.release(holder)


def test_the_same_window_is_closed_for_an_async_waiter(
    make_fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = make_fleet(LIMITS)
    holder = fleet.try_acquire("llm")
    assert holder
    versions, waits = _change_between_ask_and_wait(fleet, monkeypatch, max_in_flight=2)

    async def main() -> int:
        async with fleet.aslot("llm", max_wait=5) as slot:
            attempts = slot.slot.attempts
        await fleet.aclose()
        return attempts

    assert asyncio.run(main()) == 2
    assert versions and waits == [True]
    fleet.release(holder)
