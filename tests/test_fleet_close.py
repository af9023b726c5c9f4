"""``Fleet.close()``: a process that makes fleets and goes on lets one go cleanly.

On a private redis-server, so its CLIENT LIST holds only this test's connections.
"""

from __future__ import annotations

import time

import pytest
import redis

from celery_fleet import Fleet, FleetError
from celery_fleet.store.specs import RELEASE, RELEASE_LEAN
from celery_fleet.testing.redis_server import RedisServer


def _others(client: redis.Redis) -> int:
    """Connections to the server besides ``client``'s own."""
    return len(client.client_list()) - 1


def test_close_writes_held_releases_stops_threads_and_closes_connections(
    private_redis: RedisServer,
) -> None:
    watch = redis.Redis.from_url(private_redis.url)
    before = _others(watch)
    fleet = Fleet(
        redis_url=private_redis.url, namespace="close", limits={"llm": {"max_in_flight": 2}}
    )
    for _ in range(1000):  # both releases seen on the wire: either kind is then held
        with fleet.slot("llm"):
            pass
        fleet.store.drain()
        if {RELEASE.name, RELEASE_LEAN.name} <= fleet.store.combiner._loaded:
            break
    fleet.store.combiner.flush_s = 60.0  # only a later call (or close) writes it
    with fleet.slot("llm"):
        pass
    assert fleet.store.combiner._held  # the release waits for this process's next call
    leases = fleet.admission.keys("llm").leases
    assert watch.zcard(leases) == 1
    loops = [fleet.admission.runtime._loop, fleet.keeper._background]
    threads = [loop.thread for loop in loops if loop.thread is not None]
    assert threads and all(t.is_alive() for t in threads)
    assert _others(watch) > before

    fleet.close()
    assert watch.zcard(leases) == 0  # written before the wire closed
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive(), thread.name
    assert _others(watch) == before  # every connection of the fleet's closed
    with pytest.raises(FleetError, match="closed"):
        fleet.slot("llm")
    with pytest.raises(FleetError, match="closed"):
        fleet.try_acquire("llm")
    fleet.close()  # idempotent
    watch.close()


def test_a_fleet_used_as_a_context_manager_closes_on_leaving(private_redis: RedisServer) -> None:
    watch = redis.Redis.from_url(private_redis.url)
    before = _others(watch)
    with Fleet(
        redis_url=private_redis.url, namespace="close-cm", limits={"llm": {"rpm": 60}}
    ) as fleet:
        with fleet.slot("llm"):
            pass
    assert _others(watch) == before
    with pytest.raises(FleetError, match="closed"):
        fleet.slot("llm")
    watch.close()


def test_close_leaves_a_client_given_by_the_user_open(private_redis: RedisServer) -> None:
    mine = redis.Redis.from_url(private_redis.url)
    fleet = Fleet(redis_client=mine, namespace="close-own", limits={"llm": {"rpm": 60}})
    with fleet.slot("llm"):
        pass
    fleet.close()
    assert mine.ping()  # still the user's to use and close
    mine.close()


@pytest.mark.timeout(60)
def test_close_on_a_frozen_redis_returns_within_the_health_deadline(
    redis_of_this_test: RedisServer,
) -> None:
    """Redis frozen (SIGSTOP) with event counts not yet flushed and a slot held (its lease
    keeper renewing): ``close()`` counted as an outage within the health deadline. Its
    final counters flush went through the client's own pipeline and waited the 5 s socket
    timeout, then each background thread (blocked on the frozen Redis) was joined for 1 s
    in turn: 7 s in all."""
    fleet = Fleet(
        redis_url=redis_of_this_test.url,
        namespace="close-frozen",
        limits={"llm": {"max_in_flight": 2, "lease": 1.5}},  # renewed every 0.5 s
    )
    for _ in range(3):
        with fleet.slot("llm"):
            pass
    held = fleet.slot("llm").__enter__()
    fleet.counters.add("llm", "admitted|")  # a count the close must try to flush
    health = fleet.store.health_s
    assert fleet.keeper._background.thread is not None
    with redis_of_this_test.frozen():
        time.sleep(0.6)  # the keeper's renewal now waits on the frozen server
        start = time.monotonic()
        fleet.close()
        took = time.monotonic() - start
    held.__exit__(None, None, None)
    # the defect took about 7 s; the slack is for a loaded CI machine
    assert took < health * 1.5, took
