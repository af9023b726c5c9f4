"""Shared fixtures: a real Redis, a private key namespace per test, Fleet factories.

REDIS_URL (default redis://127.0.0.1:6379) names the Redis; `make test` starts one when
nothing answers. Tests use DB ``FLEET_TEST_DB`` (default 9) and a namespace of their own,
deleted afterwards, so parallel runs never collide. Without Redis a test is skipped
locally and fails in CI (CI=true).

Tests marked ``fast`` (``make test-fast``, which starts no Redis) must not use it: a fast
test that asks for the Redis fixtures stops the run at collection, naming it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_fleet import Fleet
from celery_fleet.testing.redis_server import RedisServer, answers, find_binary

BASE_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
TEST_DB = int(os.environ.get("FLEET_TEST_DB", "9"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a ``fast`` test that needs Redis: the fast tier runs without one, where such a
    test would only be skipped, silently leaving what it checks out of the tier."""
    wrong = [
        item.nodeid
        for item in items
        if item.get_closest_marker("fast") and "redis_url" in getattr(item, "fixturenames", ())
    ]
    if wrong:
        raise pytest.UsageError(
            "tests marked fast must not use Redis (redis_url and the fixtures built on it): "
            + ", ".join(wrong)
        )


def _with_db(url: str, db: int) -> str:
    head, _, tail = url.partition("://")
    host = tail.split("/", 1)[0]
    return f"{head}://{host}/{db}"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the test Redis DB; skips (fails in CI) when no Redis answers."""
    if not answers(BASE_URL):
        message = f"no Redis answers at {BASE_URL} (run `make test`, or set REDIS_URL)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return _with_db(BASE_URL, TEST_DB)


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A key namespace of this test's own; its keys, and those of namespaces that start
    with it (``f"{namespace}-b"``), are deleted afterwards."""
    ns = f"t-{uuid.uuid4().hex[:12]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{{{ns}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def make_fleet(redis_url: str, namespace: str) -> Callable[..., Fleet]:
    """Build a Fleet in this test's namespace: ``make_fleet({"llm": {"rpm": 60}})``."""

    def make(limits: dict[str, Any], **kwargs: Any) -> Fleet:
        kwargs.setdefault("redis_url", redis_url)
        kwargs.setdefault("namespace", namespace)
        return Fleet(limits=limits, **kwargs)

    return make


@pytest.fixture(autouse=True, scope="module")
def _close_the_modules_fleets() -> Iterator[None]:
    """Close the Fleets a test module built and left open when the module ends: their
    background threads (lease keeper, counters' flush, runtime-limit poll) otherwise go
    on calling Redis for the rest of the run, through code a later test may patch (a
    reader's ``_recv`` patched by one test armed its timer from another module's fleet:
    CI failed once)."""
    before = {id(fleet) for fleet in Fleet.all()}
    yield
    for fleet in Fleet.all():
        if id(fleet) not in before:
            fleet.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Collect, quietly, the Redis sockets of Fleets built by tests and never closed (a
    Fleet has no close: a process keeps it for life): left to the interpreter's exit, one
    of them warns after the run, which fails it though every test passed. (During the
    run, pyproject's filterwarnings lets an unclosed socket pass: the collector frees it
    in whichever test it happens to run, not in the one that leaked it.)"""
    import gc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _own_server() -> Iterator[RedisServer]:
    try:
        binary = find_binary(install=False)
    except Exception:  # pragma: no cover - the machine has no redis-server
        pytest.skip("no redis-server binary to start a private Redis")
    with RedisServer(binary=binary) as server:
        yield server


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test module's own (a free port): its INFO and CLIENT LIST
    hold only the module's commands and connections."""
    yield from _own_server()


@pytest.fixture
def redis_of_this_test() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for a test that freezes, kills or restarts it."""
    yield from _own_server()
