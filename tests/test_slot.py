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
            assert time.monotonic() - killed_at < 2 * 2.0, "slots leaked past the lease TTL"
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


def test_settle_and_observe_raise_lease_lost_after_counting(make_fleet: MakeFleet, rclient) -> None:  # type: ignore[no-untyped-def]
    from celery_fleet import LeaseLost

    fleet = make_fleet({"llm": {"tpm": 6000, "burst": 1.0, "max_in_flight": 2}})
    keys = fleet.admission.keys("llm")
    with fleet.slot("llm", tokens=100) as slot:
        rclient.zrem(keys.leases, slot.lease_id)  # the fleet gave the slot away
        with pytest.raises(LeaseLost) as info:
            slot.settle(5000)
        assert info.value.limit == "llm" and info.value.lease_id
        with pytest.raises(LeaseLost):
            slot.observe({"x-ratelimit-remaining-tokens": "0"})
        with pytest.raises(LeaseLost):
            slot.ensure_held()
        assert slot.lost
    # the 5000 tokens were charged all the same, and observe's "0 remaining" applied
    refused = fleet.try_acquire("llm", tokens=100)
    assert not refused and refused.reason == "tokens/60s"


def test_ensure_held_passes_and_renews_while_held(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 1, "lease": 1}})
    with fleet.slot("tool") as slot:
        for _ in range(3):
            time.sleep(0.6)
            slot.ensure_held()  # renews: 1.8 s in all on a 1 s lease
        assert fleet.admission.in_flight("tool") == 1


FROZEN = textwrap.dedent(
    """
    import sys
    from celery_fleet import Fleet, LeaseLost
    url, ns = sys.argv[1:3]
    fleet = Fleet(redis_url=url, namespace=ns,
                  limits={"llm": {"tpm": 60000, "max_in_flight": 1, "lease": 1}})
    with fleet.slot("llm", tokens=10) as slot:
        print("held", flush=True)
        sys.stdin.readline()  # frozen (SIGSTOP) meanwhile; woken and told to go on
        for step in (slot.ensure_held, lambda: slot.settle(20),
                     lambda: slot.observe({"x-ratelimit-remaining-tokens": "100"})):
            try:
                step()
                print("held", flush=True)
            except LeaseLost:
                print("lost", flush=True)
    """
)


@pytest.mark.slow
def test_a_frozen_holder_learns_it_lost_its_slot(
    make_fleet: MakeFleet, redis_url: str, namespace: str
) -> None:
    """SIGSTOP past the lease: another process takes the slot; the holder, woken, is told
    (LeaseLost) by ensure_held, settle and observe instead of carrying on unaware."""
    fleet = make_fleet({"llm": {"tpm": 60000, "max_in_flight": 1, "lease": 1}})
    proc = subprocess.Popen(
        [sys.executable, "-c", FROZEN, redis_url, namespace],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "held"
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(1.3)
        taken = fleet.try_acquire("llm", tokens=10)
        assert taken, "the frozen holder's lease should have expired"
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        answers = [proc.stdout.readline().strip() for _ in range(3)]
        assert answers == ["lost", "lost", "lost"]
        assert proc.wait(10) == 0
        assert fleet.admission.in_flight("llm") == 1  # still only the new holder's
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_a_nested_slot_of_the_same_full_limit_with_no_deadline_raises(
    make_fleet: MakeFleet,
) -> None:
    """It used to wait for ever: the only unit that could free was the one this thread held."""
    from celery_fleet import FOREVER

    fleet = make_fleet({"tool": {"max_in_flight": 1}})
    seen: list[BaseException] = []

    def nested() -> None:
        with fleet.slot("tool"):
            try:
                with fleet.slot("tool", max_wait=FOREVER):
                    pass
            except FleetError as exc:
                seen.append(exc)

    thread = threading.Thread(target=nested, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the nested slot deadlocked"
    assert seen and "nested slot of limit 'tool'" in str(seen[0])
    with fleet.slot("tool"):
        with pytest.raises(Throttled):  # with a deadline it is an ordinary wait
            with fleet.slot("tool", max_wait=0.2):
                pass
    with fleet.slot("tool", max_wait=FOREVER):  # not nested: fine
        pass


def test_a_slot_released_by_another_thread_no_longer_counts_as_held(
    make_fleet: MakeFleet,
) -> None:
    """The nested-slot check must not see a slot this thread took but another released."""
    from celery_fleet import FOREVER

    fleet = make_fleet({"tool": {"max_in_flight": 1}})
    mine = fleet.slot("tool").acquire()
    releaser = threading.Thread(target=mine.release)
    releaser.start()
    releaser.join()
    other = fleet.try_acquire("tool")  # the cap is full, held by somebody else
    threading.Timer(0.3, fleet.release, args=(other,)).start()
    with fleet.slot("tool", max_wait=FOREVER) as slot:  # waits, does not raise
        assert slot.attempts >= 2
