"""The lean release (issue 26): release_lean.lua for a limit with nothing to learn from a
release, and release.lua for everything else. Real Redis: the wake-ups are decided inside
the scripts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import Fleet
from celery_fleet.admission.core import Decision
from celery_fleet.admission.decision import lean_release, read_release
from celery_fleet.admission.line import WAKE_GRACE_MS

MakeFleet = Callable[..., Fleet]


def _unsampled(fleet: Fleet, limit: str, **kwargs: Any) -> Decision:
    """An admitted decision whose release would not sample the hold time (release.lua
    samples leases acquired at a microsecond divisible by 32: 1 in 32)."""
    for _ in range(20):
        decision = fleet.try_acquire(limit, **kwargs)
        assert decision and decision.lease_id
        if lean_release(decision.lease_id, 0, b"0", False):
            return decision
        fleet.release(decision)
    raise AssertionError("20 leases in a row acquired at a µs divisible by 32")


def _send(fleet: Fleet, limit: str, lease_id: str, **kwargs: Any) -> tuple[str, bool]:
    """Release through the command a posted release sends: (its script, released)."""
    script, packed = fleet.admission.release_command(limit, lease_id, **kwargs)
    (reply,) = fleet.store.send((script, packed))
    return script, fleet.admission.released(limit, reply).released


def test_only_a_release_with_nothing_else_to_do_goes_lean(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(
        {
            "plain": {"max_in_flight": 4, "tpm": 10**9},
            "breaker": {"max_in_flight": 4, "breaker": True},
            "adaptive": {"max_in_flight": 4, "adaptive": True},
            "discover": {"rpm": 600, "discover": {"up_to": 2.0}},
        }
    )
    adm = fleet.admission
    d = _unsampled(fleet, "plain", tokens=10)
    lease = d.lease_id
    assert lease is not None
    assert adm.release_command("plain", lease)[0] == "release_lean"
    # the caller waits for the clock, the provider asked for a pause: release.lua
    assert adm.release_command("plain", lease, clock=True)[0] == "release"
    assert adm.release_command("plain", lease, retry_after_ms=500)[0] == "release"
    # a lease acquired at a µs divisible by 32: its hold time is sampled into ctl
    head, rest = lease.split(".", 1)
    sampled = f"{int(head) // 32 * 32}.{rest}"
    assert adm.release_command("plain", sampled)[0] == "release"
    # a settled lease: its record is dropped with the release (once)
    fleet.settle(d, 5)
    assert adm.release_command("plain", lease)[0] == "release"
    assert adm.release_command("plain", lease)[0] == "release_lean"
    for name in ("breaker", "adaptive", "discover"):
        other = _unsampled(fleet, name)
        assert other.lease_id is not None
        assert adm.release_command(name, other.lease_id)[0] == "release"
        fleet.release(other)
    assert _send(fleet, "plain", lease) == ("release_lean", True)
    assert _send(fleet, "plain", lease) == ("release_lean", False)  # idempotent
    assert adm.in_flight("plain") == 0


@pytest.mark.parametrize("lean", [True, False], ids=["release_lean", "release"])
def test_a_release_wakes_exactly_the_first_in_line_either_way(
    make_fleet: MakeFleet, rclient: redis.Redis, lean: bool
) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    held = _unsampled(fleet, "m")
    for t in ("1", "2"):
        assert not fleet.admission.try_acquire("m", lease_id=t * 24, join=True)
    keys = fleet.admission.keys("m")
    assert held.lease_id is not None
    script, released = _send(fleet, "m", held.lease_id, clock=not lean)
    assert (script, released) == ("release_lean" if lean else "release", True)
    assert rclient.lrange(keys.wake + "1" * 8, 0, -1) == [b"1" * 24]
    assert not rclient.exists(keys.wake + "2" * 8)
    # the woken ticket's place now lasts the wake grace only: one that does not ask again
    # is taken for gone; the other keeps its ticket TTL
    now_ms = float(fleet.admission.try_acquire("m", lease_id="3" * 24).at_ms)
    woken, other = rclient.zscore(keys.waiting, "1" * 24), rclient.zscore(keys.waiting, "2" * 24)
    assert woken is not None and other is not None
    assert woken <= now_ms + WAKE_GRACE_MS < other
    assert fleet.admission.try_acquire("m", lease_id="1" * 24, join=True)  # its turn
    assert [t for t, _ in fleet.line("m")] == ["2" * 24]


def test_a_lean_release_sweeps_dead_tickets_before_it_wakes_the_first(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 2}})
    held = [_unsampled(fleet, "m") for _ in range(2)]
    keys = fleet.admission.keys("m")
    for t in ("1", "2"):
        assert not fleet.admission.try_acquire("m", lease_id=t * 24, join=True)
    rclient.zadd(keys.waiting, {"1" * 24: 1})  # ticket 1's holder stopped asking long ago
    assert held[0].lease_id is not None
    assert _send(fleet, "m", held[0].lease_id) == ("release_lean", True)
    # ticket 1 swept from both zsets; ticket 2 woken (one slot free)
    assert [t for t, _ in fleet.line("m")] == ["2" * 24]
    assert rclient.zscore(keys.waiting, "1" * 24) is None
    assert rclient.lrange(keys.wake + "2" * 8, 0, -1) == [b"2" * 24]
    rclient.delete(keys.wake + "2" * 8)
    assert fleet.admission.try_acquire("m", lease_id="2" * 24, join=True)  # holds both again
    assert not fleet.admission.try_acquire("m", lease_id="4" * 24, join=True)
    assert held[1].lease_id is not None
    assert _send(fleet, "m", held[1].lease_id) == ("release_lean", True)
    assert rclient.lrange(keys.wake + "4" * 8, 0, -1) == [b"4" * 24]


def test_with_nobody_in_line_a_lean_release_only_removes_the_lease(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 3, "rpm": 6000}})
    keys = fleet.admission.keys("m")
    d = _unsampled(fleet, "m")
    before = rclient.hgetall(keys.ctl)
    assert d.lease_id is not None
    assert _send(fleet, "m", d.lease_id) == ("release_lean", True)
    assert not rclient.exists(keys.leases, keys.line, keys.waiting, keys.settled)
    assert rclient.hgetall(keys.ctl) == before  # no hold sample, no pause


def test_a_key_s_own_cap_is_given_back_by_release_lua_and_the_rest_by_the_lean_one(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet(
        {
            "capped": {"max_in_flight": 4, "keys": {"max_in_flight": 1}},
            "rated": {"max_in_flight": 4, "keys": {"rpm": 600}},
        }
    )
    adm = fleet.admission
    capped = _unsampled(fleet, "capped", key="acme")
    assert capped.lease_id is not None
    assert not fleet.try_acquire("capped", key="acme")  # the key's own cap
    assert _send(fleet, "capped", capped.lease_id) == ("release", True)
    assert fleet.try_acquire("capped", key="acme")  # the key's slot came back too
    rated = _unsampled(fleet, "rated", key="acme")
    assert rated.lease_id is not None
    assert _send(fleet, "rated", rated.lease_id) == ("release_lean", True)
    assert adm.in_flight("rated") == 0


def test_a_slot_s_posted_release_goes_lean(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    sent: list[str] = []
    combiner = fleet.store.combiner
    real = combiner._round_trip

    def spy(batch: list[Any], answered: list[Any]) -> Any:
        for c in batch:
            for name, packed in c.commands:
                # a lean release riding in the next acquire (issue 26): "0|<lease>"
                riding = name == "acquire" and (b"\r\n0|" in packed or b"\r\n1|" in packed)
                sent.append("release_lean" if riding else name)
                if riding:
                    sent.append("acquire")
        return real(batch, answered)

    combiner._round_trip = spy  # type: ignore[method-assign]
    sampled = 0  # leases whose hold time release.lua samples (1 in 32): never lean
    for _ in range(8):
        with fleet.slot("m") as slot:
            assert slot.lease_id is not None
            sampled += not lean_release(slot.lease_id, 0, b"0", False)
    fleet.store.drain()
    combiner._round_trip = real  # type: ignore[method-assign]
    assert sent.count("acquire") == 8, sent
    assert sent.count("release_lean") == 8 - sampled and sent.count("release") == sampled, sent
    assert fleet.admission.in_flight("m") == 0


def test_a_release_reply_reads_either_shape() -> None:
    assert read_release(1) == (1, 0, 0, "", 0)
    assert read_release(0).released == 0
    full = read_release([1, 1_700_000_000_000_000, 12, b"open", b"3.000"])
    assert (full.released, full.held_ms, full.transition) == (1, 12, b"open")
