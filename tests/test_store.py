"""The store: URL masking, error translation, and the eviction check, against real Redis."""

from __future__ import annotations

import logging
import time

import pytest
import redis

from celery_fleet import ConfigError, Fleet, StoreUnavailable
from celery_fleet.admission.core import Admission
from celery_fleet.store.sync import RedisStore, eviction_risk, has_password, mask_url
from celery_fleet.testing.redis_server import RedisServer


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:s3cret@host/0", "redis://user:***@host/0"),
        ("redis://host/0?password=s3cret", "redis://host/0?password=***"),
        ("redis://host/0?db=1&password=s3cret&x=1", "redis://host/0?db=1&password=***&x=1"),
        ("redis://:pw@host:abc/0", "redis://:***@host:abc/0"),  # bad port: still masked
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///tmp/r.sock?password=pw", "unix:///tmp/r.sock?password=***"),
    ],
)
def test_mask_url_hides_every_password_and_never_raises(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert has_password(url) == (url != masked)


@pytest.mark.parametrize(
    "url", ["redis://:s3cret@127.0.0.1:1/0", "redis://127.0.0.1:1/0?password=s3cret"]
)
def test_no_repr_or_error_shows_the_password(url: str) -> None:
    fleet = Fleet(redis_url=url, limits={"llm": {"rpm": 60}})
    with pytest.raises(StoreUnavailable) as info:
        fleet.check()
    shown = [repr(fleet), repr(fleet.store), str(info.value), repr(info.value.args)]
    assert all("s3cret" not in text for text in shown), shown
    assert "***" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?decode_responses=True",
        "redis://127.0.0.1:6379/0?decode_responses=False",  # redis-py: the text "False"
        "redis+cluster://127.0.0.1:7000?decode_responses=1",
    ],
)
def test_a_url_asking_for_decoded_replies_is_refused_at_start(url: str) -> None:
    """The fleet reads its replies as bytes (a riding release's ``b"lost"`` among them):
    a URL's decode_responses, like a client built with it, is a ConfigError at once."""
    with pytest.raises(ConfigError, match="decode_responses"):
        Fleet(redis_url=url, limits={"llm": {"rpm": 60}})


def test_a_bad_port_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Fleet(redis_url="redis://:s3cret@host:abc/0", limits={"llm": {"rpm": 60}})
    assert "s3cret" not in str(info.value) and "invalid Redis URL" in str(info.value)


def test_eviction_risk_by_policy() -> None:
    assert eviction_risk(0, "allkeys-lru") is None  # no maxmemory: nothing is evicted
    assert eviction_risk(10_000_000, "noeviction") is None
    for policy in ("volatile-ttl", "volatile-lru", "allkeys-lru", "allkeys-random"):
        assert "noeviction" in (eviction_risk(10_000_000, policy) or "")


@pytest.mark.slow
def warned(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_an_evicting_redis_is_reported_loudly_once(caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer(args=["--maxmemory", "50mb", "--maxmemory-policy", "volatile-ttl"]) as srv:
        fleet = Fleet(redis_url=srv.url, limits={"llm": {"rpm": 600}})
        with caplog.at_level(logging.WARNING, logger="celery_fleet"):
            fleet.try_acquire("llm")
            # The check runs in a thread of its own (a frozen Redis must not hold the
            # process's first call for the socket timeout): wait for its word.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not warned(caplog, "volatile-ttl"):
                time.sleep(0.05)
            fleet.try_acquire("llm")
            time.sleep(0.2)
        assert len(warned(caplog, "volatile-ttl")) == 1
        fleet.store.client.close()


@pytest.mark.slow
def test_a_full_noeviction_redis_is_store_unavailable() -> None:
    with RedisServer(args=["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]) as srv:
        fleet = Fleet(redis_url=srv.url, limits={"llm": {"rpm": 600, "max_in_flight": 4}})
        client = fleet.store.client
        with pytest.raises(redis.exceptions.OutOfMemoryError):  # fill it until Redis refuses
            for i in range(10_000):
                client.set(f"fill:{i}", "x" * 10_000)
        with pytest.raises(StoreUnavailable, match="OutOfMemoryError|OOM"):
            Admission(fleet.store, fleet.limits).try_acquire("llm")
        client.close()


@pytest.mark.slow
def test_a_read_only_replica_is_store_unavailable() -> None:
    with RedisServer(args=["--replicaof", "127.0.0.1", "1"]) as srv:
        store = RedisStore(srv.url)
        fleet = Fleet(redis_url=srv.url, limits={"llm": {"rpm": 600}})
        with pytest.raises(StoreUnavailable, match="ReadOnlyError|READONLY"):
            Admission(fleet.store, fleet.limits).try_acquire("llm")
        fleet.store.client.close()
        store.reset()


def test_a_process_may_hold_more_than_a_hundred_connections(redis_url: str) -> None:
    """redis-py 8 caps a pool at 100; a worker with 200 threads waiting in line holds 200."""
    store = RedisStore(redis_url)
    assert store.client.connection_pool.max_connections >= 10_000
    assert store.blocking_client.connection_pool.max_connections >= 10_000
    capped = RedisStore(redis_url + "?max_connections=7")  # the URL still wins
    assert capped.client.connection_pool.max_connections == 7
    for s in (store, capped):
        s.client.close()
        s.blocking_client.close()
