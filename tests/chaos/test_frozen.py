"""A frozen or slow fleet Redis (SIGSTOP, DEBUG SLEEP) is an outage like a dead one.

Each test runs its own redis-server on a free port, freezes it with SIGSTOP (or keeps it
busy with DEBUG SLEEP), thaws it with SIGCONT and stops it; 6379 is never touched. Bounds
are generous (a loaded 2-core CI box): they tell seconds from the socket timeout's 5-10 s,
not milliseconds.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from celery_fleet import Fleet, Slot, StoreUnavailable, Throttled
from celery_fleet.admission.decision import new_lease_id, read_acquire
from celery_fleet.resilience.fallback import HANDOVER_S, RETRY_S, is_local_lease
from celery_fleet.store.sync import HEALTH_S
from celery_fleet.testing.redis_server import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    thaw(srv)
    srv.stop()


def freeze(server: RedisServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    if server.proc is not None:
        os.kill(server.proc.pid, signal.SIGCONT)


def fleet_on(server: RedisServer, limits: dict, policy: str) -> Fleet:  # type: ignore[type-arg]
    fleet = Fleet(redis_url=server.url, limits=limits, namespace="frz", store_down=policy)
    fleet.expected_processes = 1
    return fleet


def leases(server: RedisServer, limit: str) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        return int(client.zcard(f"{{frz:{limit}}}:leases"))
    finally:
        client.close()


@pytest.mark.parametrize("policy", ["local", "closed"])
def test_a_slot_under_sigstop_ends_within_its_max_wait(server: RedisServer, policy: str) -> None:
    fleet = fleet_on(server, {"tool": {"max_in_flight": 2}}, policy)
    with fleet.slot("tool", max_wait=2):  # connected, scripts loaded
        pass
    freeze(server)
    started = time.monotonic()
    try:
        with fleet.slot("tool", max_wait=2) as slot:
            assert policy == "local" and is_local_lease(slot.lease_id)
    except Throttled as exc:
        assert policy == "closed" and exc.reason == "store_down"
    took = time.monotonic() - started
    # The ask waits HEALTH_S at most, the way out (leaving the line) costs no Redis call
    # (1.5 s more if it did; before, 5 s for the ask and 5 s more for the leave).
    assert took < HEALTH_S + 0.9, took
    assert fleet.store_down.down


def test_local_admits_at_once_while_redis_is_frozen(server: RedisServer) -> None:
    """Eight threads enter at the same moment: the ones queued behind the ask that timed
    out fail with it (no second wait on the frozen server), and all are admitted locally."""
    fleet = fleet_on(server, {"tool": {"max_in_flight": 16}}, "local")
    with fleet.slot("tool"):
        pass
    freeze(server)
    took: list[float] = []
    local: list[bool] = []
    start = threading.Barrier(8)

    def enter() -> None:
        start.wait()
        began = time.monotonic()
        with fleet.slot("tool", max_wait=5) as slot:
            local.append(is_local_lease(slot.lease_id))
        took.append(time.monotonic() - began)

    threads = [threading.Thread(target=enter) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(took) == 8 and all(local), local
    assert max(took) < HEALTH_S + 1.5, took  # one health deadline, not one per batch


def test_debug_sleep_is_an_outage_and_local_keeps_admitting() -> None:
    with RedisServer(args=["--enable-debug-command", "yes"]) as server:
        assert slept_through(server) >= 20  # ~60; before, 0


def slept_through(server: RedisServer) -> int:
    """Slots admitted locally in 3 s of a 4 s DEBUG SLEEP."""
    fleet = fleet_on(server, {"llm": {"requests": "40/second"}}, "local")
    assert fleet.try_acquire("llm")
    admin = redis.Redis.from_url(server.url, socket_timeout=30)
    sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", "4"))
    sleeper.start()
    time.sleep(0.2)  # Redis is asleep now
    local, end = 0, time.monotonic() + 3.0
    while time.monotonic() < end:
        try:
            with fleet.slot("llm", max_wait=1) as slot:
                local += is_local_lease(slot.lease_id)
        except Throttled:  # a window's wait the slot cannot sit out: next one
            time.sleep(0.01)
    sleeper.join(10)
    admin.close()
    # 40/s here (a share of 1), the first 1.5 s lost to the health deadline: about 60.
    # Before, the first ask waited out the whole sleep and nothing was admitted locally.
    return local


def test_an_ask_that_timed_out_is_released_when_redis_thaws(server: RedisServer) -> None:
    """The frozen Redis runs the timed-out ask when it thaws: a lease nobody holds, which
    the process looks up and releases as soon as Redis answers, not at its TTL (30 s)."""
    fleet = fleet_on(server, {"tool": {"max_in_flight": 4, "lease": 30}}, "local")
    with fleet.slot("tool"):
        pass
    freeze(server)
    with fleet.slot("tool", max_wait=2) as slot:
        assert is_local_lease(slot.lease_id)  # the ask to Redis timed out
    thaw(server)
    time.sleep(RETRY_S + 0.1)
    deadline, held = time.monotonic() + RETRY_S + HANDOVER_S + 5.0, -1
    while time.monotonic() < deadline:
        with fleet.slot("tool", max_wait=2) as slot:  # traffic goes on after the thaw
            # local only until the fleet's hand-over, 2 s after Redis first answers
            assert not is_local_lease(slot.lease_id) or fleet.store_down.down
        held = leases(server, "tool")
        if held == 0:
            break
        time.sleep(0.1)
    assert held == 0, f"{held} lease(s) held by nobody after the thaw"


def test_releases_made_during_the_outage_are_replayed_when_it_answers(
    server: RedisServer,
) -> None:
    fleet = fleet_on(server, {"tool": {"max_in_flight": 2, "lease": 30}}, "local")
    first = fleet.slot("tool").acquire()
    second = fleet.slot("tool").acquire()
    freeze(server)
    with pytest.raises(Throttled):  # local share 2, both held through Redis: full
        fleet.slot("tool", max_wait=2).acquire()
    assert fleet.store_down.down
    began = time.monotonic()
    first.release()
    second.release()
    assert time.monotonic() - began < 1.0  # known outage: no Redis call (HEALTH_S each) out
    thaw(server)
    assert leases(server, "tool") == 2  # Redis never heard of the releases
    thawed = time.monotonic()
    time.sleep(RETRY_S + 0.1)
    while fleet.store_down.down and time.monotonic() - thawed < 15.0:
        fleet.slot("tool", max_wait=2).acquire().release()  # local until the hand-over
        time.sleep(0.1)
    a = fleet.slot("tool", max_wait=5).acquire()
    b = fleet.slot("tool", max_wait=5).acquire()
    try:
        # Both through Redis, at once: the cap freed when Redis answered (and the fleet
        # handed over), not at the lease TTL (30 s).
        assert not is_local_lease(a.lease_id) and not is_local_lease(b.lease_id)
        assert time.monotonic() - thawed < RETRY_S + HANDOVER_S + 5.0
        assert leases(server, "tool") == 2
    finally:
        a.release()
        b.release()


def test_the_first_in_line_is_admitted_soon_after_a_lease_nobody_releases_expires(
    server: RedisServer,
) -> None:
    """A lease whose holder is gone (its release lost) frees only by expiry, which wakes
    nobody: the first in line asks again every 2.5 s, not every 5-10 s."""
    fleet = fleet_on(server, {"tool": {"max_in_flight": 1, "lease": 1.5}}, "local")
    orphan = fleet.try_acquire("tool")  # never released, never renewed
    assert orphan
    with fleet.slot("tool", max_wait=20) as slot:
        assert not is_local_lease(slot.lease_id)
    assert slot.waited_s < 1.5 + 2.5 + 1.0, slot.waited_s


def test_an_async_slot_under_sigstop_ends_within_its_max_wait(server: RedisServer) -> None:
    import asyncio

    fleet = fleet_on(server, {"tool": {"max_in_flight": 2}}, "local")

    async def main() -> tuple[bool, float]:
        async with fleet.aslot("tool", max_wait=2):
            pass
        freeze(server)
        began = time.monotonic()
        async with fleet.aslot("tool", max_wait=2) as slot:
            local = is_local_lease(slot.lease_id)
        took = time.monotonic() - began
        await fleet.aclose()  # the loop's connections, before asyncio.run closes it
        return local, took

    local, took = asyncio.run(main())
    assert local and took < 2 + 1.5, took


def test_a_blocking_pop_on_a_frozen_redis_ends_after_its_block_and_the_health_deadline(
    server: RedisServer,
) -> None:
    from celery_fleet import StoreUnavailable

    fleet = fleet_on(server, {"tool": {"max_in_flight": 2}}, "local")
    assert fleet.store.blpop("{frz}:nothing", 0.2) is False  # Redis answers: the block ends
    freeze(server)
    began = time.monotonic()
    with pytest.raises(StoreUnavailable):
        fleet.store.blpop("{frz}:nothing", 0.5)  # locks and elections wait like this
    took = time.monotonic() - began
    assert took < 0.5 + HEALTH_S + 1.0, took  # before: the 15 s socket timeout


def test_calls_queued_behind_a_timed_out_call_are_not_sent_to_the_frozen_redis(
    server: RedisServer,
) -> None:
    from celery_fleet import StoreUnavailable

    fleet = fleet_on(server, {"tool": {"max_in_flight": 8}}, "local")
    fleet.store.health_s = 3.0
    assert fleet.try_acquire("tool")  # connected, scripts loaded
    fleet.release(fleet.try_acquire("tool"))
    freeze(server)
    took: dict[str, float] = {}

    def ask(ticket: str, deadline_s: float) -> None:
        began = time.monotonic()
        with fleet.store.deadline(deadline_s), pytest.raises(StoreUnavailable):
            fleet.store.send(fleet.admission.acquire_command("tool", 0, ticket))
        took[ticket] = time.monotonic() - began

    first = threading.Thread(target=ask, args=("first-ask-0001", 1.0))
    behind = threading.Thread(target=ask, args=("queued-ask-002", 10.0))
    first.start()
    time.sleep(0.3)  # the first carries its call; the second queues behind it
    behind.start()
    first.join(10)
    behind.join(10)
    thaw(server)
    assert took["first-ask-0001"] < 2.0, took
    assert took["queued-ask-002"] < 2.5, took  # failed with the first, not 3 s after it
    client = redis.Redis.from_url(server.url)
    held = [x.decode() for x in client.zrange("{frz:tool}:leases", 0, -1)]
    client.close()
    assert not any(x.endswith("queued-ask-002") for x in held), held  # never written


def test_slots_refused_by_the_policy_owe_redis_nothing(server: RedisServer) -> None:
    """Only the ask that met the outage may be in Redis (its lease and its place in line);
    the many asks the policy answered meanwhile never reached Redis: nothing to replay."""
    fleet = fleet_on(server, {"tool": {"max_in_flight": 2}}, "closed")
    with fleet.slot("tool"):
        pass
    freeze(server)
    for _ in range(20):
        with pytest.raises(Throttled):
            fleet.slot("tool", max_wait=2).acquire()
    owed = sorted(item.kind for item in fleet.admission.replays.take())
    assert owed == ["ask", "leave"], owed


def test_a_plain_command_on_a_frozen_redis_waits_the_health_deadline_not_the_socket_timeout(
    server: RedisServer,
) -> None:
    """Status reads and the INFO a hand-over reads (did Redis restart?) are plain commands:
    on a frozen Redis they used to wait the 5 s socket timeout, past any caller's max_wait
    (the chaos suite saw a slot wait 3.7 s with max_wait 2, held by that INFO)."""
    fleet = fleet_on(server, {"tool": {"max_in_flight": 2}}, "local")
    assert fleet.store.call("TIME")  # connected; parsed as redis-py parses it
    assert isinstance(fleet.store.call("INFO", "server"), dict)
    freeze(server)
    for command in (("TIME",), ("INFO", "server")):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            fleet.store.call(*command)
        assert time.monotonic() - started < HEALTH_S + 0.9, command
    started = time.monotonic()
    with pytest.raises(StoreUnavailable), fleet.store.deadline(0.3):
        fleet.store.call("TIME")
    assert time.monotonic() - started < 0.3 + 0.9  # the caller's deadline, when nearer


def test_a_process_whose_first_call_meets_a_frozen_redis_waits_no_longer(
    server: RedisServer,
) -> None:
    """A new process (a prefork child's first task) creates its client then; reading the
    eviction policy (CONFIG GET) on the caller's path cost the socket timeout (chaos suite:
    a slot waited 3.7 s with max_wait 2, until the thaw)."""
    fleet = fleet_on(server, {"tool": {"max_in_flight": 2}}, "local")
    freeze(server)
    started = time.monotonic()
    with fleet.slot("tool", max_wait=2) as slot:
        assert is_local_lease(slot.lease_id)
    assert time.monotonic() - started < HEALTH_S + 0.9


def test_a_local_slot_entered_at_the_hand_over_is_not_released_by_the_replay(
    server: RedisServer,
) -> None:
    """Asks that met the frozen Redis are admitted locally as ``local.<ticket>``; at the
    hand-over those slots, still held, enter Redis's semaphore as leases ending in
    ``.local.<ticket>``. The replay then looks up each ask's own lease by its ticket: it
    must not take the entered lease for it and release a slot that is still held (the cap
    would be exceeded by every such slot: Sentinel failovers ran 7-8 calls against 4)."""
    cap = 4
    fleet = fleet_on(server, {"tool": {"max_in_flight": cap, "lease": 30}}, "local")
    fleet.release(fleet.try_acquire("tool"))  # connected; the last count seen: 1 of 4
    freeze(server)
    held: list[Slot] = []
    start = threading.Barrier(3)

    def enter() -> None:
        start.wait()  # one ask carries the round trip; the others queue behind it
        held.append(fleet.slot("tool", max_wait=5).acquire())

    threads = [threading.Thread(target=enter) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(held) == 3 and all(is_local_lease(s.lease_id) for s in held), held
    thaw(server)
    # Asks go on until the fleet has handed over and the replay has sent what it owed.
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if not fleet.store_down.down and not len(fleet.admission.replays):
            break
        decision = fleet.try_acquire("tool")
        if decision:
            fleet.release(decision)
        time.sleep(0.1)
    assert not fleet.store_down.down and not len(fleet.admission.replays)
    admitted = []
    for _ in range(cap):  # as many as Redis lets through next to the 3 still held
        decision = fleet.try_acquire("tool")
        if decision:
            admitted.append(decision)
    in_redis = leases(server, "tool")
    for decision in admitted:
        fleet.release(decision)
    for slot in held:
        slot.release()
    assert len(admitted) + len(held) <= cap, f"{len(admitted)} admitted next to 3 held"
    assert in_redis == len(admitted) + len(held), in_redis  # each held slot counts, once


def test_an_asks_look_up_and_resend_find_only_its_own_lease(server: RedisServer) -> None:
    """The look-up (and the resend after a dropped connection) of ticket T answers with
    the lease T's ask made, not with a local slot ``local.T`` entered at a hand-over."""
    fleet = fleet_on(server, {"tool": {"max_in_flight": 4}}, "local")
    keys = fleet.admission.keys("tool")
    ticket = new_lease_id()
    # the local slot of T's caller, entered into the semaphore as charge.lua does it
    fleet.store.run("charge", [keys.ctl, keys.leases], [0, 30_000, f"local.{ticket}", 0])
    (gone,) = fleet.store.send(fleet.admission.lookup_command("tool", ticket))
    assert gone[0] == 0 and gone[2] == b"gone", gone
    ask = fleet.admission.acquire_command("tool", 0, ticket, retry=True)
    (admitted,) = fleet.store.send(ask)
    got = read_acquire(admitted)  # a plain admission answers with the lease alone
    lease = got.detail.decode()
    assert got.allowed == 1 and lease.endswith(f".0.{ticket}"), admitted  # a new one
    (found,) = fleet.store.send(fleet.admission.lookup_command("tool", ticket))
    got = read_acquire(found)
    assert got.allowed == 1 and got.detail.decode() == lease, found
    assert leases(server, "tool") == 2
