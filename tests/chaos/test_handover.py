"""The edges of an outage under ``fleet_store_down="local"``: its start, its end, and a Redis
that never answered at all.

Several :class:`Fleet` instances stand for several processes (each has its own local
limiter, lease keeper and store-down state); each test runs its own redis-server on a free
port and stops it, 6379 is never touched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_fleet import ConfigError, Fleet, StoreUnavailable
from celery_fleet.resilience.fallback import (
    HANDOVER_S,
    RETRY_S,
    UNKNOWN_SHARE,
    handover_key,
    is_local_lease,
)
from celery_fleet.testing.redis_server import RedisServer, free_port

pytestmark = pytest.mark.slow


def fleets_on(server: RedisServer, n: int, limits: dict, **kw: object) -> list[Fleet]:  # type: ignore[type-arg]
    """``n`` fleets ("processes") of 4 expected ones, on one namespace."""
    out = []
    for _ in range(n):
        fleet = Fleet(redis_url=server.url, limits=limits, namespace="edge", **kw)  # type: ignore[arg-type]
        fleet.expected_processes = 4
        out.append(fleet)
    return out


def without_retries(url: str) -> Callable[[], redis.Redis]:
    """A client factory whose calls fail at once when Redis is away. redis-py's default
    retries block a failing call for seconds, and every process's blocked call is then
    answered in the same instant Redis returns: these processes find it back one by one,
    each at its own next ask, as processes that were not blocked on Redis do."""
    return lambda: redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))


def most_in_any(times_ms: list[float], span_ms: float) -> tuple[int, float]:
    """The most admissions in any span of ``span_ms``, and where that span starts."""
    times = sorted(times_ms)
    best, at, j = 0, 0.0, 0
    for i, t in enumerate(times):
        while times[j] < t - span_ms:
            j += 1
        if i - j + 1 > best:
            best, at = i - j + 1, times[j]
    return best, at


# -- the end of an outage (defect 7) -----------------------------------------------------


def test_processes_leaving_their_local_limiters_stay_within_the_budget(
    server: RedisServer,
) -> None:
    """4 processes ask as fast as 60/s lets them; Redis stops for 3 s (they notice it a
    quarter second apart, as processes that were busy elsewhere do) and restarts. Over
    every 2 s around the outage's end the fleet admits at most the budget plus the burst
    and one call per process: nobody admits the whole budget through Redis while the
    others still admit their local share."""
    rate, n = 60, 4
    limits = {"llm": {"requests": f"{rate}/second"}}
    fleets = [
        Fleet(redis_client=without_retries(server.url), limits=limits, namespace="edge")
        for _ in range(n)
    ]
    for fleet in fleets:
        fleet.expected_processes = n
    admitted: list[list[float]] = [[] for _ in fleets]
    stop_at: list[float] = []
    done = threading.Event()

    def drive(i: int, fleet: Fleet) -> None:
        paused = False
        while not done.is_set():
            if stop_at and not paused:
                paused = True  # notice the outage i quarter seconds after the others
                time.sleep(max(0.0, stop_at[0] + 0.5 + 0.25 * i - time.monotonic()))
            d = fleet.try_acquire("llm")
            if d:
                admitted[i].append(d.at_ms)
                fleet.release(d)
            else:
                time.sleep(min(d.wait_ms / 1000.0, 0.005))

    threads = [threading.Thread(target=drive, args=(i, f)) for i, f in enumerate(fleets)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        stop_at.append(time.monotonic())
        time.sleep(0.1)  # every driver pauses before its next ask
        server.stop()
        time.sleep(3.0)
        server.start()  # empty, as after a restart without persistence
        up_ms = time.time() * 1000.0
        time.sleep(RETRY_S + HANDOVER_S + 3.0)
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert all(not f.store_down.down for f in fleets)  # all back on Redis
    # each fleet's last calls were Redis's
    assert all(not is_local_lease(f.try_acquire("llm").lease_id or "") for f in fleets)
    around = [t for times in admitted for t in times if up_ms - 2000 <= t]
    most, at = most_in_any(around, 2000.0)
    print(f"most admitted in 2 s around the end: {most} (from {(at - up_ms) / 1000:+.2f} s)")
    burst = rate * 0.1
    assert most <= 2 * rate + burst + n, (most, at - up_ms)


def test_the_fleet_hands_over_at_one_moment_and_charges_its_local_calls(
    server: RedisServer,
) -> None:
    """The first process back sets the moment, the next one reads the same; at it each
    charges the shared window with the local calls it still remembers."""
    a, b = (f for f in fleets_on(server, 2, {"llm": {"rpm": 600}}))  # T = 100 ms, tau = 6 s
    for fleet in (a, b):
        fleet.expected_processes = 2  # locally: one call per 200 ms each
        assert fleet.try_acquire("llm")
    server.stop()
    for fleet in (a, b):
        assert is_local_lease(fleet.try_acquire("llm").lease_id or "local.")
    server.start()
    time.sleep(RETRY_S + 0.1)
    assert is_local_lease(a.try_acquire("llm").lease_id or "local.")  # sets the moment
    client = redis.Redis.from_url(server.url)
    moment = float(client.get(handover_key("edge")) or 0)
    time.sleep(0.5)
    assert is_local_lease(b.try_acquire("llm").lease_id or "local.")  # reads the same one
    assert float(client.get(handover_key("edge")) or 0) == moment
    switch_a, switch_b = a.store_down._switch_at, b.store_down._switch_at
    assert switch_a is not None and switch_b is not None
    assert abs(switch_a - switch_b) < 0.2  # one moment
    time.sleep(max(0.0, switch_a - 0.1 - time.monotonic()))
    burst = [a.try_acquire("llm") for _ in range(5)]  # just before it: still local
    assert all(d and is_local_lease(d.lease_id) for d in burst)
    time.sleep(max(0.0, switch_a + 0.02 - time.monotonic()))
    d = a.try_acquire("llm")
    assert d and not is_local_lease(d.lease_id)
    # The shared window holds a's 5 local calls (100 ms each in Redis, less half the time
    # since: they cost 200 ms each locally) and this call's 100 ms; uncharged, only 100.
    tat = float(client.hget("{edge:llm}:ctl", "r:60") or 0)
    assert tat - d.at_ms >= 250, tat - d.at_ms
    time.sleep(max(0.0, switch_b + 0.05 - time.monotonic()))
    d = b.try_acquire("llm")
    assert d and not is_local_lease(d.lease_id)
    client.close()


def test_local_slots_held_at_the_hand_over_count_in_redis_until_given_back(
    server: RedisServer,
) -> None:
    a, b = fleets_on(server, 2, {"tool": {"max_in_flight": 2}})  # 1 each while away
    server.stop()
    held = a.slot("tool", max_wait=0).acquire()
    assert is_local_lease(held.lease_id)
    server.start()
    time.sleep(RETRY_S + 0.1)
    assert not a.try_acquire("tool")  # finds Redis back; its local cap (1) is taken
    switch_at = a.store_down._switch_at
    assert switch_at is not None
    # a asks nothing more (busy with its slot): at the moment the slot enters Redis anyway
    time.sleep(max(0.0, switch_at + 1.0 - time.monotonic()))  # the timer may run late
    got = b.try_acquire("tool")
    assert got and not b.try_acquire("tool")  # 2 of 2: b's and a's local slot
    refused = a.try_acquire("tool")  # a's own switch: its slot is not entered twice
    assert not refused and refused.reason == "in_flight" and not a.store_down.down
    held.release()  # leaves Redis's semaphore too
    again = b.try_acquire("tool")
    assert again
    for x in (got, again):
        b.release(x)


def finish(switch: Any, call: Any, fleet: Fleet) -> None:
    """Drive a hand-over's switch (a generator of script calls) from ``call`` to its end."""
    try:
        while True:
            call = switch.send(fleet.store.run(call.script, call.keys, call.args))
    except StopIteration:
        pass


def leases_in_redis(server: RedisServer, limit: str) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        return int(client.zcard(f"{{edge:{limit}}}:leases"))
    finally:
        client.close()


def test_the_timer_entering_as_the_switch_starts_enters_nothing_twice(
    server: RedisServer,
) -> None:
    """The moment's timer passed its check just before an ask began the switch: both look
    for local slots not entered yet, and each slot must be entered once (twice, it would
    hold two units of the cap until its lease TTL)."""
    (a,) = fleets_on(server, 1, {"tool": {"max_in_flight": 4, "lease": 30}})
    a.expected_processes = 1
    server.stop()
    held = [a.slot("tool", max_wait=0).acquire() for _ in range(2)]
    server.start()
    switch = a.store_down._switch(a.admission)
    call = next(switch)  # the switch's charge, with both slots, not sent yet
    a.store_down._enter_at_moment(a.admission)  # the timer, past its check
    finish(switch, call, a)
    assert leases_in_redis(server, "tool") == 2  # not 4
    for slot in held:
        slot.release()


def test_a_slot_taken_locally_during_the_switch_enters_redis_too(
    server: RedisServer,
) -> None:
    """A slot another thread takes locally while the switch's charge is on its way (asks
    still go by the policy until the switch is done) must enter Redis too, or the cap is
    exceeded by it; the timer, finding the switch under way, enters nothing."""
    (a,) = fleets_on(server, 1, {"tool": {"max_in_flight": 4, "lease": 30}})
    a.expected_processes = 1
    server.stop()
    held = [a.slot("tool", max_wait=0).acquire() for _ in range(2)]
    assert all(is_local_lease(s.lease_id) for s in held)
    server.start()
    down = a.store_down
    down._switching = True  # as back_steps sets it for the ask that switches
    switch = down._switch(a.admission)
    call = next(switch)  # the charge, with both slots, not sent yet
    assert call.script == "charge"
    down._enter_at_moment(a.admission)  # the timer, meanwhile
    # another thread's ask meanwhile: still answered locally (the switch is not done)
    held.append(a.slot("tool", max_wait=0).acquire())
    assert is_local_lease(held[-1].lease_id)
    finish(switch, call, a)
    # each local slot once: not 4 (entered twice), not 2 (the last one left out)
    assert leases_in_redis(server, "tool") == 3
    for slot in held:
        slot.release()


def test_a_slot_taken_locally_after_the_switch_is_done_enters_redis_too(
    server: RedisServer,
) -> None:
    """An ask whose turn back_steps gave to the policy (the switch under way) reaches the
    local limiter only once another thread's switch is done (descheduled in between, as
    under load): its slot must enter Redis too. Left out, Redis admits one more than the
    cap for as long as it is held (test_ha's pause-held-slow: the cap exceeded by 1 for a
    3.5 s hold after the failover)."""
    (a,) = fleets_on(server, 1, {"tool": {"max_in_flight": 4, "lease": 30}})
    a.expected_processes = 1
    server.stop()
    held = [a.slot("tool", max_wait=0).acquire() for _ in range(2)]
    server.start()
    down = a.store_down
    down._switching = True  # as back_steps sets it for the ask that switches
    switch = down._switch(a.admission)
    finish(switch, next(switch), a)  # the switch is done: the outage has ended
    assert not down.down
    # the other thread's ask, told to use the policy before that, reaches it now
    late = down.admit(a.limits["tool"], 0, "late")
    assert late and is_local_lease(late.lease_id)
    assert leases_in_redis(server, "tool") == 3  # the two held, and the late one
    assert down.release("tool", late.lease_id or "")
    assert leases_in_redis(server, "tool") == 2  # it leaves Redis with its release
    for slot in held:
        slot.release()


def test_a_process_that_does_not_ask_learns_the_moment_from_its_presence_record(
    server: RedisServer,
) -> None:
    """Its only caller is busy with a local slot: the background renewal of its presence
    record finds Redis back, learns the moment, and the slot enters Redis at it."""
    a, b = fleets_on(server, 2, {"tool": {"max_in_flight": 2}})
    server.stop()
    held = a.slot("tool", max_wait=0).acquire()
    assert is_local_lease(held.lease_id)
    server.start()
    a.presence.renew()  # what the counters thread does every 2 s
    switch_at = a.store_down._switch_at
    assert switch_at is not None
    time.sleep(max(0.0, switch_at + 0.3 - time.monotonic()))
    got = b.try_acquire("tool")
    assert got and not b.try_acquire("tool")  # a's local slot is in Redis's semaphore
    held.release()
    b.release(got)


def test_closed_and_open_go_back_to_redis_without_waiting_for_the_moment(
    server: RedisServer,
) -> None:
    closed, opened = (
        Fleet(redis_url=server.url, limits={"llm": {"rpm": 600}}, namespace="edge", store_down=p)
        for p in ("closed", "open")
    )
    server.stop()
    assert closed.try_acquire("llm").reason == "store_down"
    assert (opened.try_acquire("llm").lease_id or "").startswith("open.")
    server.start()
    time.sleep(RETRY_S + 0.1)
    for fleet in (closed, opened):
        d = fleet.try_acquire("llm")
        assert d and not is_local_lease(d.lease_id) and not fleet.store_down.down


def test_a_moment_left_from_an_earlier_outage_is_not_reused(server: RedisServer) -> None:
    (fleet,) = fleets_on(server, 1, {"llm": {"rpm": 600}})
    client = redis.Redis.from_url(server.url)
    key = handover_key("edge")
    old = float(client.time()[0]) * 1000.0 - 10_000  # an outage that ended 10 s ago
    client.set(key, int(old), px=60_000)
    moment, now = fleet.store.run("handover", [key], [5_000, 2_000, 60_000])
    assert now + 1_000 <= moment <= now + 2_000  # a new one: this outage began 5 s ago
    again, _ = fleet.store.run("handover", [key], [5_000, 2_000, 60_000])
    assert again == moment  # the others read it
    client.close()


def test_a_redis_restarted_empty_is_told_from_one_that_was_only_away(
    server: RedisServer,
) -> None:
    """Redis's run_id tells a restart (its windows are lost: they start empty at the
    hand-over) from a pause. redis-py parses INFO into a dict, which the reader once took
    for text: no restart was ever seen, and a restarted Redis granted full buckets."""
    (fleet,) = fleets_on(server, 1, {"llm": {"rpm": 600}})
    assert fleet.presence.renew() is not None  # records this process, and Redis's run_id
    assert fleet.presence.run_id
    assert not fleet.presence.redis_restarted()
    server.stop()
    server.start()  # the same port, empty
    assert fleet.presence.redis_restarted()
    assert not fleet.presence.redis_restarted()  # the new one is remembered


# -- the start of an outage (defect 12, part) ----------------------------------------------


def test_processes_holding_the_whole_cap_admit_nothing_more_while_it_is_held(
    server: RedisServer,
) -> None:
    """Cap 4 over 4 processes: two hold 2 slots each through Redis, two were refused.
    Redis goes away: none of them admits over the cap while those slots are held (a
    plain share, 1 each, let the two empty-handed ones in: 6 of 4)."""
    a, b, c, d = fleets_on(server, 4, {"tool": {"max_in_flight": 4, "lease": 30}})
    for f in (a, b, c, d, a, b, c, d):
        f.presence.renew()  # each knows its rank among the 4 live processes
    held = [f.slot("tool", max_wait=0).acquire() for f in (a, a, b, b)]
    for f in (a, b, c, d):
        assert not f.try_acquire("tool")  # refused: the cap is full (8 callers, cap 4)
    server.stop()
    holders = len(held)
    for f in (a, b, c, d):
        for _ in range(3):
            got = f.try_acquire("tool")
            if got:
                holders += 1
    assert holders <= 4, holders
    # a's slots end: a admits again up to what it held, the fleet stays at its cap
    for s in held[:2]:
        s.release()
    again = [a.try_acquire("tool") for _ in range(3)]
    assert sum(1 for x in again if x) == 2
    assert not c.try_acquire("tool") and not d.try_acquire("tool")


def test_free_slots_that_do_not_divide_evenly_go_to_the_lowest_ranks(
    server: RedisServer,
) -> None:
    """Cap 3 over 4 processes, one slot held: the 2 free slots divide as 0 each, and the
    remainder goes by rank, so the fleet keeps using its cap, and never more."""
    fleets = fleets_on(server, 4, {"tool": {"max_in_flight": 3, "lease": 30}})
    for f in fleets + fleets:  # twice: the first ones renewed before the others existed
        f.presence.renew()
    ranks = sorted(f.presence.rank for f in fleets if f.presence.rank is not None)
    assert ranks == [0, 1, 2, 3]
    holder = fleets[0].slot("tool", max_wait=0).acquire()
    for f in fleets[1:]:
        d = f.try_acquire("tool")  # the fleet at 2 of 3: this one's own is given back
        assert d
        f.release(d)
    server.stop()
    admitted = sum(1 for f in fleets for _ in range(3) if f.try_acquire("tool"))
    assert 1 <= admitted and 1 + admitted <= 3, admitted  # the holder's slot, free ones
    holder.release()


def test_with_allotments_the_rate_is_shared_by_at_most_cap_processes() -> None:
    """Only the processes with a slot can use a capped limit's rate while Redis is away
    (the allotments sum to the cap): it is divided among min(processes, cap) of them, so
    16 processes with a cap of 8 keep the whole rate, not half of it."""
    from celery_fleet.admission.config import parse_limits
    from celery_fleet.resilience.fallback import LocalLimiter

    limits = parse_limits({"llm": {"rpm": 600, "max_in_flight": 8}, "free": {"rpm": 600}})
    local = LocalLimiter(limits, 16, allotted={"llm": 1})
    assert local.rate_share("llm") == 8 and local.rate_share("free") == 16
    assert LocalLimiter(limits, 16).rate_share("llm") == 16  # no allotment: every process
    now, admitted = 1_000_000.0, 0
    for _ in range(2000):  # 20 s of asks every 10 ms, one slot at a time
        d = local.acquire(limits["llm"], 0, f"x{now}", now)
        if d:
            admitted += 1
            local.release("llm", d.lease_id or "")
        now += 10.0
    assert 20 * 10 / 8 - 2 <= admitted <= 20 * 10 / 8 + 4, admitted  # 1/8 of 10/s


def test_slots_given_back_below_the_cap_are_not_counted_twice(server: RedisServer) -> None:
    """Cap 2 over 4 processes that each made a call and gave its slot back (the fleet
    never full): none keeps a claim on the slot it gave back, the free ones are shared."""
    fleets = fleets_on(server, 4, {"tool": {"max_in_flight": 2}})
    for f in fleets:
        d = f.try_acquire("tool")
        assert d
        f.release(d)
    server.stop()
    admitted = sum(1 for f in fleets for _ in range(2) if f.try_acquire("tool"))
    assert admitted <= 2, admitted


def test_a_reply_read_after_a_newer_one_does_not_size_the_allotment(
    server: RedisServer,
) -> None:
    """Threads read their replies in any order: one made when 3 of the cap of 4 were held
    is read after the one that filled the cap. Redis then goes away with the 4 slots
    held: the allotment comes from the newest count (the cap full: nothing more), not
    from the last one read (3: one slot free, so 5 in flight, as in test_ha's
    pause-held-slow, where the cap was exceeded by 1 for a 3.5 s hold)."""
    (a,) = fleets_on(server, 1, {"tool": {"max_in_flight": 4, "lease": 30}})
    a.expected_processes = 1
    held = [a.slot("tool", max_wait=0).acquire() for _ in range(3)]
    # a reply Redis made at 3 in flight (a look-up changes nothing), read later
    (older,) = a.store.send(a.admission.lookup_command("tool", "another"))
    held.append(a.slot("tool", max_wait=0).acquire())  # 4 of 4, read at once
    assert not a.admission.decision("tool", 0, older)  # read now: 3 in flight
    assert a.store_down._seen["tool"][0] == 4  # the newest count is kept
    server.stop()
    late = a.try_acquire("tool")
    assert not late, late  # 4 held through Redis: no local slot
    assert a.store_down.local.allotted["tool"] == 4
    for slot in held:
        slot.release()


# -- a Redis that never answered (defect 8) -------------------------------------------------


def test_a_fleet_whose_redis_never_answered_admits_a_conservative_share(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens: a wrong URL
    limits = {"llm": {"requests": "80/second"}, "tool": {"max_in_flight": 16}}
    fleet = Fleet(redis_url=url, limits=limits)
    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        held = [fleet.try_acquire("tool") for _ in range(5)]
    assert sum(1 for d in held if d) == 16 // UNKNOWN_SHARE  # 2 at once, not 16
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "127.0.0.1" in errors[0].getMessage()
    assert "has not answered" in errors[0].getMessage()
    assert "s3cret" not in caplog.text
    for d in held:
        if d:
            fleet.release(d)
    # the rate too: 80/s divided by 8 is 10/s, not 80/s
    n, end = 0, time.monotonic() + 1.0
    while time.monotonic() < end:
        d = fleet.try_acquire("llm")
        if d:
            n += 1
            fleet.release(d)
        else:
            time.sleep(min(d.wait_ms / 1000.0, 0.01))
    assert n <= 80 / UNKNOWN_SHARE + 2, n


def test_check_reports_a_redis_that_answers_and_names_one_that_does_not(
    server: RedisServer,
) -> None:
    (fleet,) = fleets_on(server, 1, {"llm": {"rpm": 60}})
    report = fleet.check()
    assert report["url"] == server.url and report["scripts"] > 10
    assert report["redis_version"] and report["store_down"] == "local"
    port = free_port()
    wrong = Fleet(redis_url=f"redis://:s3cret@127.0.0.1:{port}/0", limits={"llm": {"rpm": 60}})
    with pytest.raises(StoreUnavailable) as info:
        wrong.check(timeout=0.5)
    assert f"127.0.0.1:{port}" in str(info.value) and "s3cret" not in str(info.value)
    # a Redis that answers but refuses scripts (an ACL): a ConfigError naming the URL
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser("noscript", enabled=True, passwords=["+s3cret"], keys=["*"],
                      commands=["+@all", "-script", "-evalsha", "-eval"])  # fmt: skip
    admin.close()
    acl_url = server.url.replace("redis://", "redis://noscript:s3cret@")
    limited = Fleet(redis_url=acl_url, limits={"llm": {"rpm": 60}})
    with pytest.raises(ConfigError) as refused:
        limited.check()
    assert "noscript:***@127.0.0.1" in str(refused.value) and "s3cret" not in str(refused.value)
