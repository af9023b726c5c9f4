"""acquire.lua's short reply (issue 26): the common admission answers the lease alone, and
read_acquire reads from it what the eight-element array said. Real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from celery_fleet import Fleet
from celery_fleet.admission.decision import read_acquire

MakeFleet = Callable[..., Fleet]


def _raw(fleet: Fleet, limit: str, ticket: str, join: bool = False, tokens: int = 0) -> Any:
    command = fleet.admission.acquire_command(limit, tokens, ticket, 0, join)
    (reply,) = fleet.store.send(command)
    return reply


def test_a_common_admission_answers_the_lease_alone(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 5, "tpm": 10**9}})
    assert fleet.try_acquire("m", tokens=7)  # one in flight already
    before_us = int(rclient.time()[0]) * 1_000_000
    reply = _raw(fleet, "m", "a" * 24, tokens=300)
    assert isinstance(reply, bytes)  # one bulk string, not an array
    r = read_acquire(reply)
    assert (r.allowed, r.wait_ms, r.detail, r.probe, r.ahead, r.line) == (1, 0, reply, 0, 0, 0)
    assert r.in_flight == 2 == rclient.zcard(fleet.admission.keys("m").leases)
    assert before_us <= r.now_us <= before_us + 5_000_000
    assert reply.decode().split(".") == [str(r.now_us), "2", "300", "a" * 24]
    decision = fleet.admission.decision("m", 300, reply)
    assert decision.allowed and decision.lease_id == reply.decode()
    assert (decision.in_flight, decision.at_ms) == (2, r.now_us / 1000)
    # the lease's first field keeps its six µs digits (zero-padded, as before)
    for _ in range(20):
        lease = read_acquire(_raw(fleet, "m", "b" * 24)).detail.decode()
        assert len(lease.split(".")[0]) == 16
        fleet.release(fleet.admission.decision("m", 0, lease.encode()))


def test_an_admission_with_others_in_line_answers_the_array(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 2}})
    held = fleet.try_acquire("m")
    assert fleet.try_acquire("m")
    assert not fleet.admission.try_acquire("m", lease_id="1" * 24, join=True)
    assert not fleet.admission.try_acquire("m", lease_id="2" * 24, join=True)
    fleet.release(held)  # wakes ticket 1: its ask is admitted, ticket 2 still waits
    reply = _raw(fleet, "m", "1" * 24, join=True)
    assert isinstance(reply, list) and len(reply) == 8
    r = read_acquire(reply)
    assert r.allowed == 1 and r.line == 1 and r.detail.endswith(b"." + b"1" * 24)
    assert fleet.admission.decision("m", 0, reply).line == 1


def test_a_half_open_probe_answers_the_array(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"rpm": 6000, "breaker": {"min_calls": 1, "reset_timeout": 0.2}}})
    d = fleet.try_acquire("m")
    fleet.release(d, outcome="fail")  # opens
    assert not fleet.try_acquire("m")
    time.sleep(0.3)
    reply = _raw(fleet, "m", "p" * 24)
    assert isinstance(reply, list) and read_acquire(reply).probe == 1
    assert fleet.admission.decision("m", 0, reply).probe


def test_a_refusal_is_the_array_as_before(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    assert fleet.try_acquire("m")
    reply = _raw(fleet, "m", "r" * 24)
    assert isinstance(reply, list) and len(reply) == 8
    r = read_acquire(reply)
    assert (r.allowed, r.detail, r.in_flight) == (0, b"in_flight", 1)


def test_a_decoding_client_reads_the_short_reply_too() -> None:
    r = read_acquire("1700000000123456.3.10.abc.def")
    assert (r.allowed, r.in_flight, r.now_us, r.detail) == (
        1,
        3,
        1700000000123456,
        "1700000000123456.3.10.abc.def",
    )
