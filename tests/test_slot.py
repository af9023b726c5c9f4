"""fleet.slot(): waiting, Throttled, lease renewal and crash safety, with real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest

from celery_fleet import ConfigError, Fleet, FleetError, Throttled

MakeFleet = Callable[..., Fleet]


class FakeClock:
    """Monotonic time that only moves when the code sleeps; sleeps are recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        time.sleep(seconds)  # Redis TIME moves too: the limiter must see the wait


def test_slot_waits_the_returned_wait_then_enters(make_fleet: MakeFleet) -> None:
    clock = FakeClock()
    fleet = make_fleet({"llm": {"rpm": 600, "burst": 0.01}}, clock=clock)
    for _ in range(6):
        assert fleet.try_acquire("llm")
    with fleet.slot("llm", max_wait=5) as slot:
        assert slot.lease_id
    assert slot.attempts >= 2
    # each sleep is the script's wait (<= 100 ms) plus at most a small forward jitter
    assert clock.sleeps and all(0 < s <= 0.1 + 0.011 for s in clock.sleeps)
    assert fleet.admission.in_flight("llm") == 6  # the try_acquire leases; the slot's is back


def test_slot_raises_throttled_when_wait_exceeds_max_wait(make_fleet: MakeFleet) -> None:
    clock = FakeClock()
    fleet = make_fleet({"llm": {"requests": "1/minute"}}, clock=clock)
    assert fleet.try_acquire("llm")
    with pytest.raises(Throttled) as info:
        with fleet.slot("llm", max_wait=30):
            pytest.fail("must not enter")
    assert info.value.limit == "llm"
    assert 59_000 < info.value.wait_ms <= 60_000
    assert clock.sleeps == []  # no point sleeping 30 s for a 60 s wait


def test_slot_releases_on_exception_and_is_not_reentrant(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 1}})
    slot = fleet.slot("tool")
    with pytest.raises(RuntimeError):
        with slot:
            with pytest.raises(FleetError, match="not reentrant"):
                slot.acquire()
            raise RuntimeError("boom")
    assert fleet.admission.in_flight("tool") == 0


def test_slot_validates_arguments_before_redis(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"tpm": 1000}})
    with pytest.raises(ConfigError, match="can never be admitted"):
        fleet.slot("llm", tokens=5000)
    with pytest.raises(ConfigError, match="max_wait"):
        fleet.slot("llm", max_wait=-1)
    with pytest.raises(FleetError, match="not held"):
        fleet.slot("llm", tokens=10).settle(5)


def test_settle_through_the_slot(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"tpm": 6000, "burst": 1000 / 6000}})
    with fleet.slot("llm", tokens=1000) as slot:
        assert slot.settle(200) == -800
        assert slot.settle(200) == 0
        assert slot.tokens == 200
    assert fleet.try_acquire("llm", tokens=800)


def test_a_held_slot_outlives_its_lease_ttl(make_fleet: MakeFleet) -> None:
    """The keeper thread renews the lease: a call longer than the TTL keeps its slot."""
    fleet = make_fleet({"tool": {"max_in_flight": 1, "lease": 1}})
    with fleet.slot("tool") as slot:
        time.sleep(2.5)
        assert not fleet.try_acquire("tool"), "the slot leaked to somebody else"
        assert not slot.lost
    assert not slot.lost
    assert fleet.try_acquire("tool")


HOLDER = textwrap.dedent(
    """
    import sys, time
    from celery_fleet import Fleet
    fleet = Fleet(redis_url=sys.argv[1], namespace=sys.argv[2],
                  limits={"tool": {"max_in_flight": 3, "lease": 2}})
    a = fleet.slot("tool").acquire()
    b = fleet.slot("tool").acquire()
    print("held", flush=True)
    time.sleep(600)
    """
)


def test_sigkilled_holder_gives_slots_back_within_lease_ttl(
    make_fleet: MakeFleet, redis_url: str, namespace: str
) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 3, "lease": 2}})
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_url, namespace], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        time.sleep(2.5)  # longer than the TTL: only renewal keeps them
        assert fleet.admission.in_flight("tool") == 2, "a live holder lost its leases"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.monotonic()
        assert fleet.try_acquire("tool")  # the one free slot
        assert not fleet.try_acquire("tool")
        while not fleet.try_acquire("tool"):
            assert time.monotonic() - killed_at < 2.0 + 0.5, "slots leaked past the lease TTL"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_release_wakes_a_waiter_at_once(make_fleet: MakeFleet, rclient) -> None:  # type: ignore[no-untyped-def]
    """Waiting for the in-flight cap blocks on the release signal, not on a timer."""
    fleet = make_fleet({"tool": {"max_in_flight": 1}})
    holder = fleet.try_acquire("tool")
    # A long mean hold time makes the polling hint 2 s: only a wake-up can beat it.
    rclient.hset(fleet.admission.keys("tool").ctl, "hold_ms", 60_000)
    released: list[float] = []

    def release_later() -> None:
        time.sleep(0.3)
        released.append(fleet.release(holder).at_ms)

    threading.Thread(target=release_later).start()
    with fleet.slot("tool", max_wait=10) as slot:
        assert slot.decision is not None
        handoff_ms = slot.decision.at_ms - released[0]
    assert slot.attempts == 2
    assert 0 <= handoff_ms < 1_000, f"waiter entered {handoff_ms} ms after the release"


def test_full_semaphore_waits_out_max_wait_before_throttling(
    make_fleet: MakeFleet, rclient
) -> None:  # type: ignore[no-untyped-def]
    """The in-flight wait is a guess, so a long hint does not make the slot give up early."""
    fleet = make_fleet({"tool": {"max_in_flight": 1}})
    assert fleet.try_acquire("tool")
    rclient.hset(fleet.admission.keys("tool").ctl, "hold_ms", 60_000)
    slot = fleet.slot("tool", max_wait=0.4)
    with pytest.raises(Throttled) as info:
        slot.acquire()
    assert info.value.reason == "in_flight"
    assert slot.attempts >= 2 and slot.waited_s >= 0.4
