"""Leader election on real Redis: one leader among 8 processes, re-election after SIGKILL,
a frozen leader (SIGSTOP) that wakes up deposed, clean step-down, lost leases noticed."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import ConfigError, Fleet, FleetError

MakeFleet = Callable[..., Fleet]
SPAWN = mp.get_context("spawn")
LEASE_S = 1.0
PERIOD_S = LEASE_S / 3


@pytest.mark.parametrize("lease", [10**15, math.nan, -1, 0, "5", None])
def test_absurd_leases_are_refused(make_fleet: MakeFleet, lease: Any) -> None:
    with pytest.raises(ConfigError, match="lease"):
        make_fleet({}).leader("a", lease=lease)


def test_bad_names_and_callbacks_are_refused(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({})
    with pytest.raises(ConfigError, match="leader name"):
        fleet.leader("a:b")
    with pytest.raises(ConfigError, match="on_lost must be callable"):
        fleet.leader("a", on_lost="print")  # type: ignore[arg-type]


def test_clean_step_down_hands_over_at_once(make_fleet: MakeFleet) -> None:
    events: list[tuple[str, str, int]] = []

    def note(who: str, what: str) -> Callable[[int], None]:
        return lambda token: events.append((who, what, token))

    a = make_fleet({}).leader("s", lease=3, on_elected=note("a", "in"), on_lost=note("a", "out"))
    b = make_fleet({}).leader("s", lease=3, on_elected=note("b", "in"), on_lost=note("b", "out"))
    with a:
        assert a.is_leader and a.token is not None
        first = a.token
        b.start()
        assert not b.is_leader and b.token is None
        time.sleep(0.1)  # b is waiting for the lease to be given up
        with pytest.raises(FleetError, match="already started"):
            a.start()
    start = time.monotonic()  # a stepped down on leaving the block
    assert b.wait(2)
    assert time.monotonic() - start < 0.5  # not a renewal period (1 s), not a lease (3 s)
    second = b.token
    assert not a.is_leader and second is not None and second > first
    b.stop()
    assert events == [
        ("a", "in", first),
        ("a", "out", first),
        ("b", "in", second),
        ("b", "out", second),
    ]


def test_lost_leadership_is_noticed_within_one_renewal_period_then_retaken(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    lost: list[int] = []
    leader = make_fleet({}).leader("l", lease=1.5, on_lost=lost.append).start()
    first = leader.token
    assert leader.is_leader and first is not None
    # Redis forgot the lease (a failover) and an intruder took it for a while.
    rclient.hset(leader.keys[0], mapping={"owner": "intruder", "token": 99})
    rclient.pexpire(leader.keys[0], 1000)
    start = time.monotonic()
    while leader.is_leader and time.monotonic() - start < 3:
        time.sleep(0.01)
    assert not leader.is_leader and time.monotonic() - start < 0.5 + 0.2
    assert lost == [first]
    assert leader.wait(3)  # the intruder's lease lapsed: a candidate retries every period
    assert time.monotonic() - start < 1.0 + 0.3 and (leader.token or 0) > first
    leader.stop()


def test_a_dead_leaders_lease_is_retaken_as_soon_as_it_lapses(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({})
    keys = fleet.leader("dead", lease=1.5).keys
    rclient.hset(keys[0], mapping={"owner": "a-dead-process", "token": 1})
    rclient.pexpire(keys[0], 700)  # its last renewal was 0.8 s ago
    start = time.monotonic()
    candidate = fleet.leader("dead", lease=1.5).start()  # tries every 0.5 s
    assert candidate.wait(3)
    assert 0.65 < time.monotonic() - start < 0.7 + 0.15  # at the lapse, not at 1.0 s
    candidate.stop()


def test_a_dropped_leader_lets_its_lease_lapse(make_fleet: MakeFleet) -> None:
    make_fleet({}).leader("d", lease=0.6).start()  # garbage at once, never stopped
    start = time.monotonic()
    other = make_fleet({}).leader("d", lease=0.6).start()
    assert other.wait(3) and time.monotonic() - start < 2.5  # lapsed, never renewed
    other.stop()


# -- 8 processes ----------------------------------------------------------------------


def _candidate(
    url: str, namespace: str, i: int, flags: Any, tokens: Any, losses: Any, stop: Any
) -> None:
    """Campaign; every few ms publish (leading?, term token) in slot ``i``."""

    def lost(_token: int) -> None:
        losses[i] += 1

    fleet = Fleet(redis_url=url, namespace=namespace, limits={})
    leader = fleet.leader("boss", lease=LEASE_S, on_lost=lost).start()
    while not stop.is_set():
        leading = leader.is_leader
        tokens[i] = (leader.token or 0) if leading else 0
        flags[i] = leading
        time.sleep(0.005)
    leader.stop()
    flags[i] = False


def _leaders(flags: Any, among: set[int]) -> list[int]:
    return [i for i in among if flags[i]]


def _sample(flags: Any, among: set[int], seconds: float) -> list[list[int]]:
    found, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        found.append(_leaders(flags, among))
        time.sleep(0.01)
    return found


def _until_one(flags: Any, among: set[int], limit_s: float) -> tuple[int, float]:
    """Sample until exactly one of ``among`` leads; never two meanwhile."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        now = _leaders(flags, among)
        assert len(now) <= 1, f"two leaders at once: {now}"
        if now:
            return now[0], time.monotonic() - start
        time.sleep(0.005)
    raise AssertionError(f"no leader within {limit_s} s")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_leader_among_8_processes_through_kill_and_freeze(
    redis_url: str, namespace: str
) -> None:
    flags, tokens, losses = SPAWN.Array("b", 8), SPAWN.Array("q", 8), SPAWN.Array("i", 8)
    stop = SPAWN.Event()
    procs = [
        SPAWN.Process(
            target=_candidate, args=(redis_url, namespace, i, flags, tokens, losses, stop)
        )
        for i in range(8)
    ]
    for p in procs:
        p.start()
    alive = set(range(8))
    try:
        first, _ = _until_one(flags, alive, 60)
        # Steady state: the same single leader at every sample (renewals keep it).
        assert all(now == [first] for now in _sample(flags, alive, 2.0))
        terms = [tokens[first]]

        # SIGKILL the leader: another is elected within one lease (it lapses; nobody
        # steps down), and never two at once.
        os.kill(procs[first].pid or 0, signal.SIGKILL)
        alive.discard(first)
        second, took = _until_one(flags, alive, 5)
        # the lease lapses, a candidate's next try (every PERIOD_S) takes it; trying only
        # every lease would take up to 2 x LEASE_S
        assert took < LEASE_S + PERIOD_S + 0.5
        assert all(now == [second] for now in _sample(flags, alive, 1.0))
        terms.append(tokens[second])

        # SIGSTOP the leader past its lease: another is elected; woken, the frozen one
        # knows at once that it no longer leads, and its renewal confirms the loss.
        os.kill(procs[second].pid or 0, signal.SIGSTOP)
        alive.discard(second)
        third, took = _until_one(flags, alive, 5)
        assert took < LEASE_S + PERIOD_S + 0.5
        terms.append(tokens[third])
        os.kill(procs[second].pid or 0, signal.SIGCONT)
        alive.add(second)
        time.sleep(0.05)  # its publishing loop runs again (its flag was stale)
        for now in _sample(flags, alive, PERIOD_S + 0.2):
            assert now == [third]
        assert losses[second] == 1
        assert terms == sorted(set(terms)) and terms[0] >= 1, terms
    finally:
        stop.set()
        for i, p in enumerate(procs):
            if i != first:
                os.kill(p.pid or 0, signal.SIGCONT)
            p.join(20)
    assert [p.exitcode for i, p in enumerate(procs) if i != first] == [0] * 7
