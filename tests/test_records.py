"""Versioned records on real Redis: get / compare-and-set, TTL, JSON values, and concurrent
increments from several processes that lose no update."""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import ConfigError, Fleet

MakeFleet = Callable[..., Fleet]
SPAWN = mp.get_context("spawn")


def test_get_and_compare_and_set(make_fleet: MakeFleet) -> None:
    row = make_fleet({}).record("row")
    assert row.get() == (None, 0)
    assert row.compare_and_set(1, "x") is False  # nothing at version 1 yet
    assert row.compare_and_set(0, {"a": [1, 2], "b": None}) is True
    assert row.get() == ({"a": [1, 2], "b": None}, 1)
    assert row.compare_and_set(0, "late") is False  # read 0, but 1 was written since
    assert row.compare_and_set(1, (1, "t")) is True
    assert row.get() == ([1, "t"], 2)  # as JSON gives it back
    assert row.compare_and_set(2, None) is True
    assert row.get() == (None, 3)  # a stored null is not an absent record


def test_a_ttl_keeps_the_record_that_long_after_each_write(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({})
    brief = fleet.record("brief", ttl=0.3)
    assert brief.compare_and_set(0, 1)
    assert 0 < rclient.pttl(brief.key) <= 300
    time.sleep(0.4)
    assert brief.get() == (None, 0)  # absent again: version 0
    assert brief.compare_and_set(0, 2)
    assert fleet.record("brief").compare_and_set(1, 3)  # no ttl: kept until deleted
    assert rclient.pttl(brief.key) == -1


@pytest.mark.parametrize("value", [object(), {1, 2}, math.nan, math.inf, b"bytes", {"a": object()}])
def test_values_that_are_not_json_are_refused(make_fleet: MakeFleet, value: Any) -> None:
    row = make_fleet({}).record("row")
    with pytest.raises(ConfigError, match="not JSON-serialisable|Out of range"):
        row.compare_and_set(0, value)
    assert row.get() == (None, 0)


def test_a_value_over_max_bytes_is_refused(make_fleet: MakeFleet) -> None:
    row = make_fleet({}).record("row", max_bytes=10)
    assert row.compare_and_set(0, "12345678")  # 10 bytes of JSON with the quotes
    with pytest.raises(ConfigError, match="11 bytes of JSON, more than max_bytes = 10"):
        row.compare_and_set(1, "123456789")
    assert row.get() == ("12345678", 1)


@pytest.mark.parametrize("version", [-1, True, "1", 1.0, None, 2**53, 10**400])
def test_absurd_versions_are_refused(make_fleet: MakeFleet, version: Any) -> None:
    with pytest.raises(ConfigError, match="version must be an int"):
        make_fleet({}).record("row").compare_and_set(version, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "a:b"}, "record name"),
        ({"name": ""}, "record name"),
        ({"ttl": 10**15}, "ttl"),
        ({"ttl": math.nan}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": "5"}, "ttl"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": 1.5}, "max_bytes"),
        ({"max_bytes": 2**40}, "max_bytes"),
    ],
)
def test_absurd_record_arguments_are_refused(
    make_fleet: MakeFleet, kwargs: dict[str, Any], match: str
) -> None:
    kwargs.setdefault("name", "row")
    with pytest.raises(ConfigError, match=match):
        make_fleet({}).record(**kwargs)


def _increment(url: str, namespace: str, attempts: int, out: Any, start: Any) -> None:
    """Try ``attempts`` read-increment-write rounds; report how many writes won."""
    row = Fleet(redis_url=url, namespace=namespace, limits={}).record("counter")
    row.get()  # connected before the start, so the processes overlap
    start.wait(60)
    won = 0
    for _ in range(attempts):
        value, version = row.get()
        if row.compare_and_set(version, {"n": (value or {"n": 0})["n"] + 1}):
            won += 1
    out.put(won)


def test_concurrent_increments_lose_no_update(make_fleet: MakeFleet, redis_url: str) -> None:
    namespace = make_fleet({}).namespace
    out, start = SPAWN.Queue(), SPAWN.Barrier(4)
    procs = [
        SPAWN.Process(target=_increment, args=(redis_url, namespace, 300, out, start))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    won = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    value, version = make_fleet({}).record("counter").get()
    assert value == {"n": sum(won)} and version == sum(won)
    # A lost race means another writer won meanwhile: at least a quarter of rounds win.
    assert 300 <= sum(won) <= 1200
