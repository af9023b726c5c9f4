"""The lean hot path (issue 9): few Redis commands per decision, coalesced round trips,
leases that carry their own record, a keeper thread that outlives one slot, slot.next().

Command counts come from INFO commandstats of a private redis-server (nobody else's calls
in it), so they are exact, not timings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import Fleet
from celery_fleet.admission import keeper
from celery_fleet.admission.core import Admission
from celery_fleet.admission.decision import read_acquire
from celery_fleet.errors import ConfigError, FleetError, StoreUnavailable
from celery_fleet.store.combiner import Combiner, Packed
from celery_fleet.testing.redis_server import RedisServer

MakeFleet = Callable[..., Fleet]

BENCH = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}


def _commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _per_decision(
    server: RedisServer, fleet: Fleet, n: int, tokens: int = 100, slot: bool = False
) -> dict[str, float]:
    """Redis commands per decision: try_acquire + release, or a ``with fleet.slot()``."""
    client = redis.Redis.from_url(server.url)

    def cycle() -> None:
        if slot:
            with fleet.slot("llm", tokens=tokens):
                pass
        else:
            decision = fleet.try_acquire("llm", tokens=tokens)
            assert decision
            fleet.release(decision)

    for _ in range(20):  # scripts loaded, keys created
        cycle()
    # release.lua loaded too: a slot's release may have gone lean (release_lean.lua) every
    # time, and one NOSCRIPT in the count would be an EVALSHA more
    fleet.release(fleet.try_acquire("llm", tokens=tokens))
    holder = fleet.try_acquire("llm", tokens=tokens)  # at saturation: the cap is in use
    fleet.store.drain()
    # the metrics counters flush every 2 s from their own thread (a pipeline of HINCRBYs and
    # a PEXPIRE per limit): on a slow machine one flush would land inside the window and
    # count as the scripts' own; they are not part of a decision
    fleet.counters.flush()
    fleet.counters._background.stop()
    before = _commands(client)
    for _ in range(n):
        cycle()
    fleet.store.drain()
    after = _commands(client)
    fleet.release(holder)
    client.close()
    return {
        k: (after[k] - before.get(k, 0)) / n
        for k in after
        if k != "info" and after[k] != before.get(k, 0)
    }


def _unsampled(per: dict[str, float]) -> float:
    """Commands per decision without the hold-time sample: a release whose lease was acquired
    at a microsecond divisible by 32 also reads and writes ``hold_ms`` (one HMGET + one HSET).
    The share of such leases follows the clock, so it is checked for rarity, not an exact rate.
    """
    sampled = per.get("hmget", 0) - 1  # the acquire's own read of ctl is the 1
    assert per.get("hset", 0) - 1 == pytest.approx(sampled), per  # every sampled read writes
    assert 0 <= sampled < 0.12, per  # ~1 in 32, with room for an uneven clock
    return sum(per.values()) - 2 * sampled


def test_a_decision_costs_at_most_ten_redis_commands(private_redis: RedisServer) -> None:
    fleet = Fleet(redis_url=private_redis.url, namespace="hot", limits={"llm": BENCH})
    per = _per_decision(private_redis, fleet, 800, slot=True)
    # + at most a rare PEXPIRE: the keys' TTLs are refreshed when under half a day is left
    assert _unsampled(per) <= 10.02, per
    # the shape of it: one EVALSHA (the release rides in the next acquire; a release whose
    # hold time is sampled, ~1 in 32, goes alone), one clock, one read and write of state
    assert 1 <= per["evalsha"] < 1.12 and per["time"] < 1.1, per
    assert "pttl" not in per and "hdel" not in per and per.get("pexpire", 0) < 0.01, per
    # a release whose caller waits for its reply also reads the clock (exact at_ms)
    per = _per_decision(private_redis, fleet, 800)
    assert _unsampled(per) <= 10.02 and per["time"] == 2, per


def test_a_breaker_and_adaptive_limit_pays_only_for_what_it_uses(
    private_redis: RedisServer,
) -> None:
    limits = {"llm": {**BENCH, "max_in_flight": 1000, "adaptive": True, "breaker": True}}
    fleet = Fleet(redis_url=private_redis.url, namespace="hot-full", limits=limits)
    per = _per_decision(private_redis, fleet, 400)
    # + the breaker read and its window count, + the AIMD read and write: still bounded
    assert sum(per.values()) <= 16.0, per
    assert per.get("exists", 0) == 0 and per.get("pexpire", 0) < 0.01, per


def test_a_lease_carries_its_record_and_settled_records_go_with_the_release(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": {"tpm": 60_000, "max_in_flight": 4}})
    keys = fleet.admission.keys("llm")
    d = fleet.try_acquire("llm", tokens=300)
    acquired, in_flight, tokens, ticket = d.lease_id.split(".", 3)  # type: ignore[union-attr]
    assert len(ticket) == 24 and tokens == "300" and in_flight == "1"
    assert abs(int(acquired) / 1000 - d.at_ms) < 0.001
    assert fleet.settle(d, 500) == 200
    assert rclient.hget(keys.settled, d.lease_id) == b"500"  # type: ignore[arg-type]
    assert fleet.settle(d, 500) == 0  # the record wins: never counted twice
    fleet.release(d)
    assert not rclient.exists(keys.settled) and not rclient.exists(keys.leases)


def test_the_sweep_of_expired_leases_drops_their_settled_records(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 1, "lease": 1, "tpm": 60_000}})
    keys = fleet.admission.keys("tool")
    dead = fleet.try_acquire("tool", tokens=10)
    fleet.settle(dead, 20)  # then its holder dies: never released
    assert rclient.hexists(keys.settled, dead.lease_id)  # type: ignore[arg-type]
    time.sleep(1.05)
    assert fleet.try_acquire("tool", tokens=10)  # the cap was reached: the sweep ran
    assert not rclient.hexists(keys.settled, dead.lease_id)  # type: ignore[arg-type]


def test_state_ttls_are_set_when_due_not_on_every_call(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": {"rpm": 6000, "max_in_flight": 4}})
    keys = fleet.admission.keys("llm")
    d = fleet.try_acquire("llm")
    day = 86_400_000
    assert day - 5_000 < rclient.pttl(keys.ctl) <= day + 1_000
    assert day - 5_000 < rclient.pttl(keys.leases) <= day
    rclient.pexpire(keys.ctl, 60_000)  # as if set long ago: the "exp" field still says fine
    fleet.release(fleet.try_acquire("llm"))
    assert rclient.pttl(keys.ctl) <= 60_000  # not refreshed: nothing was due
    rclient.hset(keys.ctl, "exp", 0)  # now it is due
    fleet.release(fleet.try_acquire("llm"))
    assert rclient.pttl(keys.ctl) > day - 5_000
    fleet.release(d)


# -- coalescing -----------------------------------------------------------------------------


class _Gate:
    """Holds the first round trip on the wire until released, so others queue behind it."""

    def __init__(self, combiner: Combiner) -> None:
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.go = threading.Event()
        real = combiner._round_trip

        def round_trip(batch: list[Any], answered: list[Any]) -> Any:
            self.sizes.append(sum(len(c.commands) for c in batch))
            if len(self.sizes) == 1:
                self.entered.set()
                self.go.wait(10)
            return real(batch, answered)

        combiner._round_trip = round_trip  # type: ignore[method-assign]


def test_calls_made_while_the_wire_is_busy_share_one_round_trip(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": BENCH})
    fleet.release(fleet.try_acquire("llm"))
    gate = _Gate(fleet.store.combiner)
    results: list[Any] = []

    def ask() -> None:
        results.append(fleet.try_acquire("llm", tokens=1))

    first = threading.Thread(target=ask)
    first.start()
    assert gate.entered.wait(5)
    others = [threading.Thread(target=ask) for _ in range(15)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 5
    while len(fleet.store.combiner._queue) < 15 and time.monotonic() < deadline:
        time.sleep(0.005)
    gate.go.set()
    for t in [first, *others]:
        t.join(10)
    assert gate.sizes == [1, 15]  # sixteen decisions, two round trips
    assert len(results) == 16 and all(results)
    assert len({d.lease_id for d in results}) == 16  # each caller got its own answer
    for d in results:
        fleet.release(d)


def test_an_error_answers_only_its_own_caller(make_fleet: MakeFleet, redis_url: str) -> None:
    fleet = make_fleet({"llm": BENCH})
    store = fleet.store
    good = fleet.admission.acquire_command("llm", 1, "a" * 24)
    bad = ("acquire", Packed("acquire", "0" * 40, ["k"], 0, []).pack())  # unknown script
    with pytest.raises(FleetError):
        store.send(good, bad)
    replies = store.combiner.send([good, bad])
    assert isinstance(replies[1], redis.ResponseError)
    assert read_acquire(replies[0]).allowed == 1  # admitted, whatever happened to the other


def test_scripts_lost_by_redis_are_loaded_again_within_the_batch(
    private_redis: RedisServer,
) -> None:
    fleet = Fleet(redis_url=private_redis.url, namespace="flush", limits={"llm": BENCH})
    fleet.release(fleet.try_acquire("llm"))
    redis.Redis.from_url(private_redis.url).script_flush()
    d = fleet.try_acquire("llm")
    assert d
    fleet.release(d)


def test_a_dead_redis_fails_every_call_of_the_round_trip_cleanly() -> None:
    from celery_fleet.testing.redis_server import free_port

    fleet = Fleet(redis_url=f"redis://127.0.0.1:{free_port()}/0", limits={"llm": BENCH})
    with pytest.raises(StoreUnavailable):
        Admission(fleet.store, fleet.limits).try_acquire("llm")
    with pytest.raises(StoreUnavailable):
        fleet.store.send(fleet.admission.acquire_command("llm", 1, "b" * 24))


# -- keeper and next() ----------------------------------------------------------------------


def test_the_keeper_thread_outlives_a_short_slot(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = make_fleet({"llm": BENCH})
    with fleet.slot("llm"):
        pass
    background = fleet.keeper._background
    thread = background.thread
    assert thread is not None and thread.is_alive()
    for _ in range(20):
        with fleet.slot("llm"):
            pass
    assert background.thread is thread  # no new thread per slot
    monkeypatch.setattr(keeper, "IDLE_EXIT_S", 0.0)
    background.wake()
    thread.join(5)
    assert not thread.is_alive() and background.thread is None


def test_next_releases_and_acquires_in_one_round_trip(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": {"tpm": 60_000, "max_in_flight": 2}})
    sizes: list[int] = []
    combiner = fleet.store.combiner
    real = combiner._round_trip

    def counting(batch: list[Any], answered: list[Any]) -> Any:
        scripts = [script for c in batch for script, _packed in c.commands]
        ours = [s for s in scripts if s in ("acquire", "release", "release_lean")]
        if ours:  # not the background presence record (which may share a round trip)
            sizes.append(len(ours))
        return real(batch, answered)

    combiner._round_trip = counting  # type: ignore[method-assign]
    with fleet.slot("llm", tokens=100) as slot:
        first = slot.lease_id
        assert slot.next(tokens=300) is slot
        assert slot.lease_id != first and slot.tokens == 300
        assert sizes == [1, 2]  # enter; then release + acquire together
        leases = rclient.zrange(fleet.admission.keys("llm").leases, 0, -1)
        assert leases == [slot.lease_id.encode()]  # type: ignore[union-attr]
    assert fleet.admission.in_flight("llm") == 0


def test_next_waits_its_turn_when_the_next_admission_is_refused(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"rpm": 600, "burst": 1 / 600, "max_in_flight": 1}})
    with fleet.slot("llm", max_wait=5) as slot:
        assert slot.attempts == 1
        slot.next()  # the one-call burst is spent: refused for ~100 ms, then admitted
        assert slot.attempts == 2 and slot.waited_s > 0.05
        assert fleet.admission.in_flight("llm") == 1
    assert fleet.admission.in_flight("llm") == 0
    with fleet.slot("llm", max_wait=5) as slot, pytest.raises(FleetError, match="held slot"):
        slot.release()
        slot.next()


def _lose_pairs(fleet: Fleet, run: bool) -> list[list[Any]]:
    """Make the store's sends of two commands (``Slot.next``'s release + ask) fail as if the
    connection dropped: after Redis ran them (``run``: their replies are lost, the error is
    ``dropped``) or before (an outage). Returns the lost replies, one list per loss."""
    store, real = fleet.store, fleet.store.send
    lost: list[list[Any]] = []

    def send(*commands: tuple[str, bytes]) -> list[Any]:
        if len(commands) == 2 and not lost:
            lost.append(real(*commands) if run else [])
            raise StoreUnavailable(store.safe_url, "connection dropped", dropped=run)
        return real(*commands)

    store.send = send  # type: ignore[method-assign]
    return lost


def test_next_whose_reply_a_dropped_connection_lost_is_not_charged_twice(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    """The release and the ask went through, the reply did not: the resend of both (the ask
    flagged) answers with the lease the first ask made, and charges nothing again."""
    fleet = make_fleet({"llm": {"max_in_flight": 4}})
    with fleet.slot("llm") as slot:
        first = slot.lease_id
        lost = _lose_pairs(fleet, run=True)
        slot.next()
        assert lost, "next() did not send its release and ask together"
        (_released, answer) = lost[0]
        assert slot.lease_id == read_acquire(answer).detail.decode() != first
        leases = rclient.zrange(fleet.admission.keys("llm").leases, 0, -1)
        assert leases == [slot.lease_id.encode()]  # type: ignore[union-attr]
        assert not fleet.admission.replays  # nothing owed: Redis answered the resend
    assert fleet.admission.in_flight("llm") == 0


def test_next_meeting_an_outage_owes_both_and_asks_the_policy_afresh(
    make_fleet: MakeFleet,
) -> None:
    """Redis does not answer next()'s round trip: the release and the ask are owed to it
    (replay.py), and the store-down policy admits a fresh ask, with a new ticket."""
    fleet = make_fleet({"llm": {"max_in_flight": 4}}, store_down="local")
    fleet.expected_processes = 1
    with fleet.slot("llm") as slot:
        first = slot.lease_id
        _lose_pairs(fleet, run=False)
        slot.next()
        owed = [(o.kind, o.key) for o in fleet.admission.replays.take()]
        assert [kind for kind, _key in owed] == ["release", "ask"] and owed[0][1] == first
        assert fleet.store_down.down and fleet.store_down.owns(slot.lease_id)
        assert slot.lease_id and not slot.lease_id.endswith(owed[1][1])  # a new ticket


def test_next_without_a_store_down_policy_raises_what_redis_did_not_answer(
    make_fleet: MakeFleet,
) -> None:
    """An Admission made without a policy (RedisOnly) lets the outage reach the caller,
    after owing Redis the release and the ask."""
    from celery_fleet.resilience.strategy import RedisOnly

    fleet = make_fleet({"llm": {"max_in_flight": 4}})
    fleet.admission.store_down = RedisOnly()
    with fleet.slot("llm") as slot:
        _lose_pairs(fleet, run=False)
        with pytest.raises(StoreUnavailable):
            slot.next()
        assert [o.kind for o in fleet.admission.replays.take()] == ["release", "ask"]
        assert slot.lease_id is None


# -- posted releases ------------------------------------------------------------------------


def test_a_slot_costs_one_write_its_release_rides_with_the_next(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": {"max_in_flight": 4}})
    with fleet.slot("llm"):
        pass  # the first release of a process is sent and read (scripts not yet seen)
    combiner = fleet.store.combiner
    combiner.flush_s = 60.0  # nothing but the next call writes a release here
    # A call that carries that first release, if the flusher (armed at 1 ms) has not yet:
    # on a busy box its write could land after the counting below starts.
    fleet.admission.in_flight("llm")
    real = combiner._round_trip
    trips: list[tuple[int, list[str]]] = []  # per write: posted calls, scripts waited for

    def counting(batch: list[Any], answered: list[Any]) -> Any:
        posted = sum(1 for c in batch if c.callback is not None)
        waited = [s for c in batch if c.callback is None for s, _p in c.commands]
        trips.append((posted, waited))
        return real(batch, answered)

    combiner._round_trip = counting  # type: ignore[method-assign]
    for _ in range(10):
        with fleet.slot("llm"):
            pass
    # ten decisions, ten writes: each release rode in a later call (folded into the next
    # acquire, or carried ahead of a background call of the fleet's), never in a write of
    # its own
    assert all(waited for _posted, waited in trips), trips
    assert sum(waited.count("acquire") for _p, waited in trips) == 10
    # folded: at most one release went as a posted call of its own (a background call of
    # the fleet's, e.g. the runtime limits' poll, may carry one it finds held)
    assert sum(posted for posted, _w in trips) <= 1, trips
    # the last release waits for the next call (unless a background call took it)...
    assert len(combiner._held) <= 1
    leases = fleet.admission.keys("llm").leases
    assert rclient.zcard(leases) == len(combiner._held)  # what is held is all that is left
    fleet.admission.in_flight("llm")  # ...any call of this process, which goes after it
    assert not combiner._held
    assert rclient.zcard(leases) == 0


def test_a_release_nothing_follows_is_written_by_the_flusher(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": {"max_in_flight": 4}})
    with fleet.slot("llm"):
        pass
    combiner = fleet.store.combiner
    leases = fleet.admission.keys("llm").leases
    for _ in range(3):
        with fleet.slot("llm"):
            pass
        deadline = time.monotonic() + 5  # a bound for a hung test, not a speed assert
        while rclient.zcard(leases) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert rclient.zcard(leases) == 0 and not combiner._held
    assert combiner._unread  # written, its reply left for the next call to read
    flusher = combiner._flusher
    assert flusher is not None and flusher.daemon and flusher.is_alive()


def test_a_posted_release_reports_a_lost_lease_once_read(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 1, "lease": 1}})
    with fleet.slot("tool"):
        pass
    slot = fleet.slot("tool").acquire()
    fleet.keeper.untrack(slot)  # as if the process froze: nobody renews it
    time.sleep(1.1)
    other = fleet.try_acquire("tool")  # the cap is reached: the expired lease is swept
    slot.release()  # posted: its reply is read by whichever call goes next
    # (no "not lost yet" check: on a busy box the keeper may read it first, by design)
    fleet.admission.in_flight("tool")  # any other call reads posted replies first
    assert slot.lost
    fleet.release(other)


def test_the_keeper_reads_replies_an_idle_process_left(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keeper, "POSTED_READ_AFTER_S", 0.0)
    fleet = make_fleet({"tool": {"max_in_flight": 1, "lease": 1}})
    fleet.keeper.tick_s = 0.05
    with fleet.slot("tool"):
        pass
    slot = fleet.slot("tool").acquire()
    fleet.keeper.untrack(slot)
    time.sleep(1.1)
    other = fleet.try_acquire("tool")
    slot.release()
    deadline = time.monotonic() + 5
    while not slot.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slot.lost and not fleet.store.combiner._unread
    fleet.release(other)


def test_a_posted_release_that_meets_noscript_is_sent_again(private_redis: RedisServer) -> None:
    fleet = Fleet(
        redis_url=private_redis.url, namespace="post-flush", limits={"llm": {"max_in_flight": 2}}
    )
    with fleet.slot("llm"):
        pass
    client = redis.Redis.from_url(private_redis.url)
    with fleet.slot("llm"):
        client.script_flush()  # the release below meets NOSCRIPT
    assert fleet.admission.in_flight("llm") == 0  # drained, loaded, sent again
    client.close()


def test_a_capless_limit_sweeps_expired_leases_once_it_holds_1024(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": {"rpm": 10**9, "lease": 1}})
    leases = fleet.admission.keys("llm").leases
    for _ in range(1030):  # holders that die: never released
        assert fleet.try_acquire("llm")
    time.sleep(1.1)
    assert rclient.zcard(leases) == 1030  # the sweeps on the way found nothing expired yet
    assert fleet.try_acquire("llm")  # holds 1,030 >= 1,024: sweeps (256 per call)
    assert rclient.zcard(leases) == 1030 - 256 + 1


def test_a_bad_lease_id_is_refused_before_redis(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"max_in_flight": 2, "tpm": 10**14}})
    for bad in (123, b"bytes", "", "x" * 201):
        with pytest.raises(ConfigError, match="lease id"):
            fleet.admission.try_acquire("llm", lease_id=bad)  # type: ignore[arg-type]
    for bad in (123, b"bytes", "", "x" * 265):  # a lease is the id after its record
        with pytest.raises(ConfigError, match="lease id"):
            fleet.admission.release("llm", bad)  # type: ignore[arg-type]
    longest = fleet.admission.try_acquire("llm", tokens=10**12, lease_id="x" * 200)
    assert longest and fleet.admission.release("llm", longest.lease_id).released  # type: ignore[arg-type]
    assert fleet.admission.in_flight("llm") == 0


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_makes_lease_ids_of_its_own() -> None:
    """Lease ids come from a generator seeded once per process: a forked child gets a new
    process tag and a new random sequence (a caller's ``random.seed()`` does not matter)."""
    import os
    import random

    from celery_fleet.admission.decision import new_lease_id

    new_lease_id()  # the parent's tag and generator exist before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without running pytest's exit
        random.seed(0)
        os.write(write, ",".join(new_lease_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split(",")
    random.seed(0)
    parent = [new_lease_id() for _ in range(3)]
    assert len(set(child)) == 3 and len(set(parent)) == 3, (child, parent)
    assert {i[:8] for i in child}.isdisjoint({i[:8] for i in parent})  # tags
    assert {i[8:] for i in child}.isdisjoint({i[8:] for i in parent})  # random parts
