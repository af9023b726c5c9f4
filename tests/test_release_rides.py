"""A slot's release rides in the next ask of its limit (issue 26): one script call for both.

acquire.lua runs the release first, as release_lean.lua would: the lease leaves the
semaphore, the line's first waiter is woken, and a lease that had already expired is
reported lost (the reply is then ``["lost", <the ask's reply>]``). Command counts come from
the test Redis's INFO commandstats deltas: exact, not timings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import Fleet, Throttled
from celery_fleet.admission import slot as slot_module
from celery_fleet.admission.decision import lean_release
from celery_fleet.admission.slot import Slot
from celery_fleet.store.specs import RELEASE_LEAN
from celery_fleet.testing.redis_server import RedisServer

MakeFleet = Callable[..., Fleet]


def _evalsha(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def _lean_slot(fleet: Fleet, limit: str, **kwargs: Any) -> Slot:
    """A held slot of ``limit`` whose release can go lean (one lease in 32 has its hold time
    sampled by release.lua, which never rides: such a one is given back, and again)."""
    for _ in range(100):
        slot = fleet.slot(limit, **kwargs).acquire()
        assert slot.lease_id is not None
        if lean_release(slot.lease_id, 0, b"0", False):
            return slot
        slot.release()
        fleet.store.drain()
    raise AssertionError("no lean lease in 100")


def _warm(fleet: Fleet, limit: str) -> None:
    """Slots of ``limit`` until the lean release has answered on the combiner's wire: only
    then is one held (a lease acquired at a µs divisible by 32 is released by release.lua
    instead, so one slot is not always enough)."""
    for _ in range(200):
        with fleet.slot(limit):
            pass
        fleet.store.drain()
        if RELEASE_LEAN.name in fleet.store.combiner._loaded:
            return
    raise AssertionError("the lean release never answered")


def _held_release(fleet: Fleet, limit: str) -> object:
    """A slot of ``limit`` acquired and released, its lean release held for the next call
    (a sampled lease's release is not lean: drained, and another slot taken)."""
    for _ in range(200):
        slot = fleet.slot(limit).acquire()
        slot.release()
        if limit in fleet.admission._riders:
            assert fleet.store.combiner._held, "the release should be held for the next call"
            return slot
        fleet.store.drain()
    raise AssertionError("no lean release was held")


def test_a_release_rides_in_the_next_ask_of_its_limit(private_redis: RedisServer) -> None:
    # a Redis of the module's own: the shared one's EVALSHA count moves with other tests'
    fleet = Fleet(
        redis_url=private_redis.url, namespace="rides", limits={"llm": {"max_in_flight": 1}}
    )
    rclient = redis.Redis.from_url(private_redis.url)
    _warm(fleet, "llm")  # scripts seen on this connection: later releases may be held
    fleet.store.combiner.flush_s = 60.0  # only a later call writes (or takes) it
    _held_release(fleet, "llm")
    before = _evalsha(rclient)
    slot = fleet.slot("llm").acquire()  # the cap is 1: admitted only once the release ran
    assert _evalsha(rclient) - before == 1  # one script call for the release and the ask
    assert not fleet.store.combiner._held
    slot.release()
    fleet.store.drain()
    assert rclient.zcard(fleet.admission.keys("llm").leases) == 0
    fleet.close()
    rclient.close()


def test_a_riding_release_of_an_expired_lease_reports_it_lost(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 2, "lease": 1}})
    _warm(fleet, "tool")
    fleet.store.combiner.flush_s = 60.0
    old = _lean_slot(fleet, "tool")
    fleet.keeper.untrack(old)  # as if the process froze: nobody renews it
    time.sleep(1.1)
    first = fleet.try_acquire("tool")
    second = fleet.try_acquire("tool")  # at the cap: the expired lease is swept
    assert first and second
    fleet.release(first)  # a free slot again
    old.release()  # held: its ZREM will find nothing
    new = fleet.slot("tool").acquire()  # admitted (the reply unwrapped from ["lost", lease])
    assert new.lease_id is not None
    assert old.lost  # the rider's share of the reply, handed over before the ask returned
    new.release()
    fleet.release(second)


def test_a_riding_release_of_an_expired_lease_unwraps_a_refusal_too(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 1, "lease": 1}})
    _warm(fleet, "tool")
    fleet.store.combiner.flush_s = 60.0
    old = _lean_slot(fleet, "tool")
    fleet.keeper.untrack(old)
    time.sleep(1.1)
    other = fleet.try_acquire("tool")  # the cap is reached: the expired lease is swept
    assert other
    old.release()  # held: its ZREM will find nothing
    with pytest.raises(Throttled) as refused:
        fleet.slot("tool", max_wait=0).acquire()
    assert refused.value.reason == "in_flight"  # the refusal read from inside ["lost", ...]
    assert old.lost
    fleet.release(other)


def test_a_riding_release_wakes_the_first_waiter_in_line(
    make_fleet: MakeFleet, rclient: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first in line asks again every NEXT_IN_LINE_S by itself: make that a minute, so
    # only a wake-up lets it in sooner
    monkeypatch.setattr(slot_module, "NEXT_IN_LINE_S", 60.0)
    limits = {"llm": {"max_in_flight": 1, "lease": 30, "tpm": 1000, "burst": 1.0}}
    fleet, waiter_fleet = make_fleet(limits), make_fleet(limits)
    _warm(fleet, "llm")
    fleet.store.combiner.flush_s = 60.0
    holder = _lean_slot(fleet, "llm", tokens=400)
    # the waiter's own estimate of when to ask again: as long as the lease, so only the
    # wake-up of the release can let it in before then
    rclient.hset(fleet.admission.keys("llm").ctl, "hold_ms", 60_000)
    admitted: list[float] = []

    def wait() -> None:
        with waiter_fleet.slot("llm", tokens=1, max_wait=60):
            admitted.append(time.monotonic())

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    line = fleet.admission.keys("llm").line
    deadline = time.monotonic() + 10
    while not rclient.zcard(line) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rclient.zcard(line) == 1  # the waiter holds a ticket
    holder.release()  # held for this process's next call
    released_at = time.monotonic()
    with pytest.raises(Throttled) as refused:
        # carries the release; refused by the tokens window, so its own ask wakes nobody
        fleet.slot("llm", tokens=900, max_wait=0).acquire()
    # (behind the waiter, its wait the window's: "queued")
    assert refused.value.reason == "queued" and refused.value.wait_ms > 10_000
    thread.join(20)
    assert admitted, "the waiter was never admitted"
    # woken by the release, not by its own minute (a bound for a lost wake-up)
    assert admitted[0] - released_at < 10


def test_a_rider_is_held_again_when_its_ask_is_broken_off(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch, rclient: redis.Redis
) -> None:
    # An interrupt (a gevent Timeout while queued for the wire, Celery's soft time limit,
    # ^C) breaks off the ask a release rides in, maybe before it was written. Held, that
    # release would have gone with the next call: it must still, not be dropped (the
    # slot would stay taken for the lease's whole TTL).
    fleet = make_fleet({"llm": {"max_in_flight": 1, "lease": 600}})
    _warm(fleet, "llm")
    combiner = fleet.store.combiner
    combiner.flush_s = 60.0
    _held_release(fleet, "llm")

    class Interrupted(BaseException):
        pass

    round_trip = combiner._round_trip

    def broken_off(*args: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return round_trip(*args)  # a background call of the fleet's: not this ask
        monkeypatch.setattr(combiner, "_round_trip", round_trip)  # once
        raise Interrupted

    monkeypatch.setattr(combiner, "_round_trip", broken_off)
    with pytest.raises(Interrupted):
        fleet.slot("llm").acquire()
    # held again: the next call writes it (the slot's own clean-up may already have)
    slot = fleet.slot("llm", max_wait=0).acquire()  # cap 1: only once it ran
    slot.release()
    fleet.store.drain()
    assert rclient.zcard(fleet.admission.keys("llm").leases) == 0


def test_the_flusher_finding_its_held_release_taken_back_writes_nothing(
    make_fleet: MakeFleet,
) -> None:
    # The flusher saw a release held, then took the wire; an ask took the release back
    # in between (take() needs no wire). Carrying nothing must not fail (it raised
    # ValueError out of max() on no calls, cutting the flusher's run short).
    fleet = make_fleet({"llm": {"max_in_flight": 1}})
    _warm(fleet, "llm")
    combiner = fleet.store.combiner
    combiner.flush_s = 60.0
    _held_release(fleet, "llm")
    (held,) = combiner._held
    assert combiner.take(held)
    with combiner._lock:  # the flusher takes the wire, as _flush_held does
        combiner._busy = True
    combiner._carry([])
    assert not combiner._busy  # the wire is free again
