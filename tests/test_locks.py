"""Lease locks on real Redis: fencing tokens, mutual exclusion, renewal, and a holder that
stalled past its lease (SIGSTOP) meeting its successor. Children are real processes."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import ConfigError, Fleet, FleetError, Lock, LockLost, LockNotAcquired

MakeFleet = Callable[..., Fleet]
SPAWN = mp.get_context("spawn")  # no fork of a threaded pytest process


def _fleet(url: str, namespace: str) -> Fleet:
    return Fleet(redis_url=url, namespace=namespace, limits={})


def _owner(rclient: redis.Redis, lock: Lock) -> bytes | None:
    return rclient.hget(lock.keys[0], "owner")  # type: ignore[return-value]


@pytest.mark.parametrize("ttl", [10**15, math.nan, math.inf, -1, 0, 0.01, "5", None, True])
def test_absurd_ttls_are_refused(make_fleet: MakeFleet, ttl: Any) -> None:
    with pytest.raises(ConfigError, match="ttl"):
        make_fleet({}).lock("a", ttl=ttl)


@pytest.mark.parametrize("name", ["", "a b", "a:b", "{a}", "x" * 101, None, 5, "a\n"])
def test_bad_names_are_refused(make_fleet: MakeFleet, name: Any) -> None:
    with pytest.raises(ConfigError, match="lock name"):
        make_fleet({}).lock(name)


def test_bad_acquire_arguments_are_refused_before_redis(make_fleet: MakeFleet) -> None:
    lock = make_fleet({}).lock("a", ttl=1)
    for timeout in (-1, math.nan, "1", 10**15):
        with pytest.raises(ConfigError, match="timeout"):
            lock.acquire(timeout=timeout)
    with pytest.raises(ConfigError, match="blocking"):
        lock.acquire(blocking="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout= needs blocking=True"):
        lock.acquire(blocking=False, timeout=1)
    assert lock.token is None and not lock.held


def test_acquire_release_and_tokens(make_fleet: MakeFleet, rclient: redis.Redis) -> None:
    fleet = make_fleet({})
    a, b = fleet.lock("job", ttl=5), fleet.lock("job", ttl=5)
    first = a.acquire()
    assert a.held and a.token == first and _owner(rclient, a) is not None
    with pytest.raises(LockNotAcquired) as busy:
        b.acquire(blocking=False)
    assert 4000 < busy.value.wait_ms <= 5000 and busy.value.name == "job"
    with pytest.raises(FleetError, match="not reentrant"):
        a.acquire(blocking=False)
    a.release()
    assert not a.held and _owner(rclient, a) is None
    with pytest.raises(FleetError, match="not held"):
        a.release()
    with b:
        assert b.held and (b.token or 0) > first
    assert not b.held


def test_a_held_lock_is_renewed_past_its_ttl(make_fleet: MakeFleet, rclient: redis.Redis) -> None:
    fleet = make_fleet({})
    with fleet.lock("long", ttl=0.5) as lock:
        time.sleep(1.6)
        assert lock.held
        assert rclient.pttl(lock.keys[0]) > 0
        with pytest.raises(LockNotAcquired):
            fleet.lock("long", ttl=0.5).acquire(blocking=False)
    assert rclient.exists(lock.keys[0]) == 0


def test_a_waiter_is_woken_by_the_release(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({})
    holder = fleet.lock("w", ttl=10)
    first = holder.acquire()
    threading.Timer(0.3, holder.release).start()
    start = time.monotonic()
    token = fleet.lock("w", ttl=10).acquire(timeout=5)
    waited = time.monotonic() - start
    assert token > first and 0.25 < waited < 3.0  # woken by the release: the lease had 9.7 s


def test_a_timeout_raises_after_about_that_long(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({})
    fleet.lock("t", ttl=10).acquire()
    start = time.monotonic()
    with pytest.raises(LockNotAcquired) as busy:
        fleet.lock("t", ttl=10).acquire(timeout=0.4)
    # after its timeout, and long before the holder's lease (10 s) would end
    assert 0.35 < time.monotonic() - start < 3.0 and busy.value.timeout_s == 0.4


def test_a_dropped_lock_is_not_renewed_forever(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({})
    fleet.lock("dropped", ttl=0.6).acquire()  # the Lock object is garbage at once
    start = time.monotonic()
    fleet.lock("dropped", ttl=0.6).acquire(timeout=3)
    assert time.monotonic() - start < 2.5  # it lapsed (renewed, the acquire would time out)


def test_a_stalled_holder_cannot_renew_or_release_its_successors_lock(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({})
    stale = fleet.lock("s", ttl=0.6)
    old = stale.acquire()
    assert stale._renewal is not None
    stale._renewal.stop()  # its renewal thread stalls (as if the process were frozen)
    time.sleep(0.7)
    assert not stale.held  # noticed without Redis: the lease may have lapsed
    fresh = fleet.lock("s", ttl=5)
    assert fresh.acquire(blocking=False) > old
    owner, ttl = _owner(rclient, fresh), rclient.pttl(fresh.keys[0])
    assert stale._hold is not None and stale._hold.renew() is False
    with pytest.raises(LockLost) as lost:
        stale.release()
    assert lost.value.token == old
    with pytest.raises(LockLost):
        stale.ensure_held()
    assert _owner(rclient, fresh) == owner and rclient.pttl(fresh.keys[0]) <= ttl
    assert fresh.held
    fresh.release()


def test_a_stolen_lock_is_noticed_within_one_renewal_period(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({})
    lock = fleet.lock("stolen", ttl=1.5)  # renewed every 0.5 s
    lock.acquire()
    rclient.delete(lock.keys[0])  # Redis forgot it (a failover); somebody else takes it
    thief = fleet.lock("stolen", ttl=5)
    thief.acquire(blocking=False)
    start = time.monotonic()
    while lock.held and time.monotonic() - start < 2:
        time.sleep(0.01)
    assert not lock.held and time.monotonic() - start < 0.5 + 0.2
    assert thief.held and (thief.token or 0) > (lock.token or 0)


def test_leaving_the_block_with_an_error_keeps_that_error(make_fleet: MakeFleet) -> None:
    lock = make_fleet({}).lock("e", ttl=0.6)
    with pytest.raises(KeyError):
        with lock:
            assert lock._renewal is not None
            lock._renewal.stop()
            time.sleep(0.7)
            make_fleet({}).lock("e", ttl=5).acquire(blocking=False)
            raise KeyError("the body's own error")  # the lost lock is logged, not raised


# -- many processes -------------------------------------------------------------------


def _contend(url: str, namespace: str, rounds: int, out: Any) -> None:
    """Acquire and release ``rounds`` times; inside, check nobody else is inside and note
    (the order of entry, the token)."""
    fleet = _fleet(url, namespace)
    client = redis.Redis.from_url(url)
    entries, overlaps = [], 0
    try:
        for _ in range(rounds):
            with fleet.lock("shared", ttl=2) as lock:
                if client.incr(f"{{{namespace}}}:inside") != 1:
                    overlaps += 1
                entries.append((client.incr(f"{{{namespace}}}:order"), lock.token))
                time.sleep(0.001)
                client.decr(f"{{{namespace}}}:inside")
    except Exception as exc:  # reported, so the test fails at once rather than times out
        out.put(repr(exc))
        return
    out.put((os.getpid(), entries, overlaps))


def test_tokens_strictly_increase_and_exclude_across_processes(
    redis_url: str, namespace: str
) -> None:
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=_contend, args=(redis_url, namespace, 40, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    assert all(isinstance(r, tuple) for r in results), results
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert sum(overlaps for _, _, overlaps in results) == 0
    entries = sorted(e for _, found, _ in results for e in found)
    assert [order for order, _ in entries] == list(range(1, 161))
    tokens = [token for _, token in entries]
    assert all(a < b for a, b in zip(tokens[:-1], tokens[1:], strict=True)), "out of order"
    assert len(set(tokens)) == 160


def _hold_then_release(url: str, namespace: str, out: Any, go: Any) -> None:
    lock = _fleet(url, namespace).lock("frozen", ttl=1)
    out.put(lock.acquire())
    go.wait(30)
    held = lock.held
    try:
        lock.release()
        out.put((held, "released"))
    except LockLost as exc:
        out.put((held, f"lost {exc.token}"))


def test_a_sigstopped_holder_meets_its_successor(
    redis_url: str, namespace: str, rclient: redis.Redis
) -> None:
    out, go = SPAWN.Queue(), SPAWN.Event()
    child = SPAWN.Process(target=_hold_then_release, args=(redis_url, namespace, out, go))
    child.start()
    try:
        token = out.get(timeout=60)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGSTOP)
        start = time.monotonic()
        successor = _fleet(redis_url, namespace).lock("frozen", ttl=5)
        assert successor.acquire(timeout=3) > token
        assert time.monotonic() - start < 1.0 + 0.3  # within the frozen holder's ttl
        owner = _owner(rclient, successor)
        os.kill(child.pid, signal.SIGCONT)
        time.sleep(0.5)  # its renewal thread wakes and finds the lock another's
        go.set()
        assert out.get(timeout=30) == (False, f"lost {token}")
        assert successor.held and _owner(rclient, successor) == owner
        successor.release()
    finally:
        if child.pid is not None:
            os.kill(child.pid, signal.SIGCONT)
        child.join(10)
    assert child.exitcode == 0
