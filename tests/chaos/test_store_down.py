"""The fleet's Redis goes away: the store-down policy keeps admission going, and comes back.

Each test runs its own redis-server on a free port and stops it; 6379 is never touched.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis

from celery_fleet import ConfigError, Fleet, Throttled
from celery_fleet.admission.core import Admission
from celery_fleet.admission.decision import read_acquire
from celery_fleet.resilience.fallback import HANDOVER_S, RETRY_S, is_local_lease
from celery_fleet.resilience.presence import Presence
from celery_fleet.testing.redis_server import RedisServer

pytestmark = pytest.mark.slow


def fleet_on(server: RedisServer, limits: dict, **kw: object) -> Fleet:  # type: ignore[type-arg]
    return Fleet(redis_url=server.url, limits=limits, namespace="down", **kw)  # type: ignore[arg-type]


def admitted_in(fleet: Fleet, limit: str, seconds: float) -> int:
    """How many try_acquire calls are admitted (and released) in ``seconds``."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        d = fleet.try_acquire(limit)
        if d:
            n += 1
            fleet.release(d)
        else:
            time.sleep(min(d.wait_ms / 1000.0, 0.02))
    return n


def test_local_admits_a_fair_share_of_the_rate_then_returns_to_redis(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # 20/s fleet-wide, shared by 4 processes: 5/s here while Redis is away
    fleet = fleet_on(server, {"llm": {"requests": "20/second"}}, store_down="local")
    fleet.expected_processes = 4
    assert fleet.try_acquire("llm")  # Redis answers
    server.stop()
    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        n = admitted_in(fleet, "llm", 2.0)
    assert 8 <= n <= 11, n  # 2 s at 5/s (the bucket starts empty: no burst on top)
    outage_logs = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_logs) == 1 and "1/4" in outage_logs[0].getMessage()
    server.start()
    time.sleep(RETRY_S + 0.1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        first = fleet.try_acquire("llm")  # finds Redis back: still local until the hand-over
        assert not first or is_local_lease(first.lease_id)
        assert "answers again" in caplog.text and fleet.store_down.down
        if first:
            fleet.release(first)
        time.sleep(HANDOVER_S + 0.1)
        d = fleet.try_acquire("llm")
    assert d and not is_local_lease(d.lease_id)  # back on Redis, on its own
    assert "back on the fleet's Redis" in caplog.text and not fleet.store_down.down
    fleet.release(d)


def test_local_caps_in_flight_at_the_share_and_waiting_slots_get_through(
    server: RedisServer,
) -> None:
    fleet = fleet_on(server, {"tool": {"max_in_flight": 8}}, store_down="local")
    fleet.expected_processes = 4  # 2 at once in this process
    server.stop()
    inside, most, lock = [0], [0], threading.Lock()

    def call() -> None:
        with fleet.slot("tool", max_wait=30) as slot:
            assert is_local_lease(slot.lease_id)
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] == 2
    assert fleet.store_down.local.in_flight("tool") == 0  # every local lease given back


def test_open_admits_everything_and_closed_is_backpressure(server: RedisServer) -> None:
    opened = fleet_on(server, {"tool": {"max_in_flight": 1}}, store_down="open")
    closed = fleet_on(server, {"tool": {"max_in_flight": 1}}, store_down="closed")
    server.stop()
    held = [opened.slot("tool", max_wait=0).acquire() for _ in range(5)]
    assert all(s.lease_id and s.lease_id.startswith("open.") for s in held)
    for s in held:
        s.release()
    with pytest.raises(Throttled) as info:
        with closed.slot("tool"):
            pass
    assert info.value.reason == "store_down"


def test_a_slot_held_through_an_outage_never_raises_a_redis_error(server: RedisServer) -> None:
    fleet = fleet_on(server, {"llm": {"tpm": 60_000, "max_in_flight": 4, "lease": 1.5}})
    with fleet.slot("llm", tokens=100) as slot:
        lease = slot.lease_id
        assert lease and not is_local_lease(lease)
        server.stop()
        assert slot.settle(80) == 0  # not charged: nobody to charge
        assert slot.observe({"x-ratelimit-remaining-requests": "3"}) == 0
        slot.ensure_held()
        time.sleep(2.0)  # past the lease TTL, Redis away: stranded, not lost
        assert not slot.lost
        server.start()  # restarted empty: the keeper puts the lease back
        deadline = time.monotonic() + 5
        client = redis.Redis.from_url(server.url)
        while time.monotonic() < deadline and not client.zcard("{down:llm}:leases"):
            time.sleep(0.05)
        assert client.zrange("{down:llm}:leases", 0, -1) == [lease.encode()]
        assert not slot.lost
        client.close()
    assert not redis.Redis.from_url(server.url).zcard("{down:llm}:leases")


def test_a_killed_connection_is_retried_without_charging_twice(server: RedisServer) -> None:
    fleet = fleet_on(server, {"tool": {"max_in_flight": 5}, "llm": {"rpm": 600}})
    admin = redis.Redis.from_url(server.url)
    assert fleet.try_acquire("tool")
    admin.client_kill_filter(_type="normal", skipme=True)  # every fleet connection dropped
    d = fleet.try_acquire("tool")
    assert d and not is_local_lease(d.lease_id)
    assert fleet.store_down.outages == 0  # one resend, no outage
    admin.client_kill_filter(_type="normal", skipme=True)
    assert fleet.admission.in_flight("tool") == 2  # a plain command, resent too
    # An acquire that ran but whose reply was lost: the resend answers with its lease.
    send = fleet.store.send
    first = fleet.admission.acquire_command("tool", 0, "lost-reply-1")
    (reply,) = send(first)
    (again,) = send(fleet.admission.acquire_command("tool", 0, "lost-reply-1", retry=True))
    assert read_acquire(again).detail == read_acquire(reply).detail
    assert fleet.admission.in_flight("tool") == 3
    # ...and the same for a rate window: one unit charged, not two
    (ask,) = send(fleet.admission.acquire_command("llm", 0, "lost-reply-2"))
    tat = float(admin.hget("{down:llm}:ctl", "r:60") or 0)
    (resent,) = send(fleet.admission.acquire_command("llm", 0, "lost-reply-2", retry=True))
    assert read_acquire(resent).detail == read_acquire(ask).detail
    assert float(admin.hget("{down:llm}:ctl", "r:60") or 0) == tat
    admin.close()


def test_the_live_count_is_the_share(server: RedisServer) -> None:
    fleet = fleet_on(server, {"llm": {"rpm": 60}})
    others = [Presence(fleet.store, "down") for _ in range(2)]
    for p in others:
        p._pid, p._id = 0, f"other-{id(p)}"  # two other processes
        p.renew()
    assert fleet.presence.renew() == 3
    assert fleet.share_of_budgets() == 3
    fleet.expected_processes = 7
    assert fleet.share_of_budgets() == 7  # fleet_expected_processes wins


def test_the_core_admission_without_a_policy_still_raises(server: RedisServer) -> None:
    fleet = fleet_on(server, {"llm": {"rpm": 60}})
    server.stop()
    from celery_fleet import StoreUnavailable

    with pytest.raises(StoreUnavailable):
        Admission(fleet.store, fleet.limits).try_acquire("llm")


@pytest.mark.parametrize(
    "setting, value",
    [
        ("fleet_store_down", "maybe"),
        ("fleet_store_down", None),
        ("fleet_expected_processes", 0),
        ("fleet_expected_processes", -1),
        ("fleet_expected_processes", 10**15),
        ("fleet_expected_processes", 10**400),
        ("fleet_expected_processes", float("nan")),
        ("fleet_expected_processes", "5"),
        ("fleet_expected_processes", 2.5),
    ],
)
def test_bad_store_down_settings_are_config_errors(setting: str, value: object) -> None:
    from celery import Celery

    app = Celery("down", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf[setting] = value
    with pytest.raises(ConfigError, match=setting):
        Fleet(app, limits={"llm": {"rpm": 60}})


def test_a_local_slot_held_through_the_outage_does_not_end_it(server: RedisServer) -> None:
    """The renewal thread renews nothing for a local lease: that is not Redis answering."""
    fleet = fleet_on(server, {"tool": {"max_in_flight": 4, "lease": 1}}, store_down="local")
    fleet.expected_processes = 2
    server.stop()
    with fleet.slot("tool") as slot:
        assert is_local_lease(slot.lease_id)
        time.sleep(2.0)  # several renewal periods (a third of 1 s)
        assert fleet.store_down.down and fleet.store_down.outages == 1


def test_a_new_lease_is_not_born_lost(server: RedisServer) -> None:
    fleet = fleet_on(server, {"tool": {"max_in_flight": 4}})
    with fleet.slot("tool") as slot:
        slot.lost = True  # e.g. the last release answered "already gone"
        slot.next()
        assert not slot.lost and slot.lease_id


def test_a_reschedule_whose_deferral_failed_runs_once_from_its_fallback(
    server: RedisServer,
) -> None:
    from celery import Celery
    from celery.exceptions import Ignore

    from celery_fleet import FleetTask, Run, StoreUnavailable, fleet_task

    app = Celery("fb", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(fleet_redis_url=server.url, fleet_namespace="down",
                    fleet_limits={"tool": {"max_in_flight": 1}})  # fmt: skip
    fleet = Fleet(app)

    @fleet_task(app=app, shared=False, bind=True)
    def agent(self: FleetTask) -> str:
        return "ran"

    published: list[dict[str, object]] = []
    agent.apply_async = lambda *a, **kw: published.append(kw)  # type: ignore[method-assign]

    def lost_reply(*args: object) -> float:
        raise StoreUnavailable(server.url, "reply lost", dropped=False)

    fleet.deferred.add = lost_reply  # type: ignore[method-assign]
    agent.push_request(id="t-f", args=[], kwargs={}, retries=0, delivery_info={},
                       called_directly=False)  # fmt: skip
    try:
        with pytest.raises(Ignore):
            agent._on_backpressure(Throttled("tool", 2000, "in_flight"), Run())
    finally:
        agent.pop_request()
    (fallback,) = published  # one message, not a copy and a countdown copy
    headers = fallback["headers"]
    assert headers["fleet_backup_fallback"] is True and headers["fleet_backup"] == "t-f:1"  # type: ignore[index]
    # Delivered while Redis cannot be asked: a fallback runs (a backup would wait)
    server.stop()
    agent.push_request(id="t-f", args=[], kwargs={}, retries=0, delivery_info={},
                       called_directly=False, headers=headers)  # fmt: skip
    try:
        agent._drop_needless_backup()  # returns: it runs
        headers2 = {**headers, "fleet_backup_fallback": False}  # type: ignore[dict-item]
        agent.request.headers = headers2
        with pytest.raises(Ignore):
            agent._drop_needless_backup()  # a plain backup asks again later
    finally:
        agent.pop_request()


def test_two_fleets_on_one_redis_share_one_wake_listener(server: RedisServer) -> None:
    from celery_fleet.admission.decision import process_tag
    from celery_fleet.store.wakeups import listener_for

    a, b = (fleet_on(server, {"tool": {"max_in_flight": 1}}) for _ in range(2))
    prefix = a.admission.keys("tool").wake
    assert listener_for(a.store, prefix, process_tag()) is listener_for(
        b.store, prefix, process_tag()
    )


@pytest.mark.parametrize("seed", range(5))
def test_the_local_limiter_holds_its_share_over_random_sequences(seed: int) -> None:
    """Random asks and releases, with time moving at random: a process's local
    limiter never holds more than its cap, and never admits more than its share of a
    window's budget plus one unit per window of time (it starts empty)."""
    import random

    from celery_fleet.admission.config import parse_limits
    from celery_fleet.resilience.fallback import LocalLimiter

    rnd = random.Random(seed)
    limits = parse_limits({"llm": {"max_in_flight": 12, "rpm": 600}})  # the rate binds
    cfg = limits["llm"]
    share = rnd.choice([2, 3, 4, 7])
    local = LocalLimiter(limits, share)
    now, held, admitted = 1_000_000.0, [], []
    for _ in range(3000):
        op = rnd.random()
        if op < 0.5:
            tokens = 0
            d = local.acquire(cfg, tokens, f"t{rnd.random()}", now)
            if d:
                held.append((d.lease_id, tokens))
                admitted.append(now)
            else:
                assert d.wait_ms > 0 and d.reason in ("in_flight", "requests/60s")
        elif op < 0.75 and held:
            lease, _tokens = held.pop(rnd.randrange(len(held)))
            assert local.release("llm", lease)
        now += rnd.expovariate(1 / 2.0)  # ms: asks far faster than the share allows
        assert local.in_flight("llm") <= local.cap(cfg) == max(1, 12 // share)
    # the requests window: 600/min shared -> one per 100 * share ms, burst at least one
    span = now - 1_000_000.0
    most = span / (100.0 * share) + max(1.0, 60.0 / share) + 1
    assert len(admitted) <= most, (len(admitted), most)
