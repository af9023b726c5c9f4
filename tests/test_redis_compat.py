"""The redis-py calls that differ across the supported versions (5.0-8.x), on whichever one
is installed (tox.ini's redis envs run this file on each): a read with a deadline is bounded
by it on a frozen Redis (not by the socket timeout), a checkout names no command, and the
asyncio wire fails its callers, not hangs them, when its connection cannot be had.

A frozen Redis is a private ``redis-server`` stopped with SIGSTOP (connections stay open,
nothing answers), so nobody else's Redis is touched.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from celery_fleet import FleetError
from celery_fleet.errors import StoreUnavailable
from celery_fleet.store import aio
from celery_fleet.store.aio import AsyncStore
from celery_fleet.store.combiner import Combiner
from celery_fleet.store.compat import read_reply, take_connection
from celery_fleet.store.sync import RedisStore
from celery_fleet.testing.redis_server import NoRedisServer, RedisServer, find_binary

#: The socket timeout of the connections here: what an unbounded read would wait.
SOCKET_TIMEOUT_S = 30.0
#: The deadline of the bounded reads.
DEADLINE_S = 0.2
#: A correctness bound, not a speed target: far above the deadline, far below the socket
#: timeout, so only a read the deadline did not bound can exceed it.
BOUND_S = 5.0
PING = b"*1\r\n$4\r\nPING\r\n"
#: A reply three deadlines late (``DEBUG SLEEP 0.6``).
DEBUG_SLEEP = b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$3\r\n0.6\r\n"


@pytest.fixture(scope="module")
def server(private_redis: RedisServer) -> RedisServer:
    """The module's private redis-server (conftest), paused and resumed by the tests."""
    return private_redis


@pytest.fixture(scope="module")
def slow_server() -> Iterator[RedisServer]:
    """A private server that takes ``DEBUG SLEEP`` (a slow reply on demand)."""
    try:
        binary = find_binary(install=False)
    except NoRedisServer as exc:
        pytest.skip(str(exc))
    with RedisServer(binary=binary, args=["--enable-debug-command", "local"]) as private:
        yield private


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """The server stopped (SIGSTOP) inside the block: it accepts nothing and answers nothing."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


def test_a_read_with_a_deadline_keeps_the_socket_timeout_of_its_connection(
    server: RedisServer,
) -> None:
    conn = redis.Connection(port=server.port, socket_timeout=SOCKET_TIMEOUT_S)
    try:
        conn.connect()  # type: ignore[no-untyped-call]
        for _ in range(2):
            conn.send_command("PING")  # type: ignore[no-untyped-call]
            assert read_reply(conn, DEADLINE_S) == b"PONG"
            # the next plain read waits the socket timeout again, not the last deadline
            assert conn._sock is not None
            assert conn._sock.gettimeout() == SOCKET_TIMEOUT_S
    finally:
        conn.disconnect()  # type: ignore[no-untyped-call]


def test_a_read_with_a_deadline_is_bounded_by_it_on_a_frozen_redis(server: RedisServer) -> None:
    conn = redis.Connection(port=server.port, socket_timeout=SOCKET_TIMEOUT_S)
    try:
        conn.connect()  # type: ignore[no-untyped-call]
        with frozen(server):
            conn.send_command("PING")  # type: ignore[no-untyped-call]
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                read_reply(conn, DEADLINE_S)
            waited = time.monotonic() - started
        assert waited < BOUND_S, f"the read waited {waited:.1f} s, past its deadline"
        # out of step (the PONG may still come): redis-py dropped the connection
        assert conn._sock is None
    finally:
        conn.disconnect()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("pool_class", [redis.ConnectionPool, redis.BlockingConnectionPool])
def test_a_checkout_works_without_a_command_name(
    server: RedisServer, pool_class: type[redis.ConnectionPool]
) -> None:
    """redis-py < 5.3 requires a command name, later ones warn on it (an error here)."""
    pool = pool_class(port=server.port)
    try:
        conn = take_connection(pool)
        try:
            conn.send_command("PING")
            assert conn.read_response() == b"PONG"
        finally:
            pool.release(conn)
    finally:
        pool.disconnect()


def test_the_combiners_read_is_bounded_by_its_callers_deadline(server: RedisServer) -> None:
    """A caller's deadline nearer than the connection's socket timeout (its own timeout
    for the read: the path that needs ``read_response(timeout=)`` on redis-py 8)."""
    client = redis.Redis(port=server.port, socket_timeout=SOCKET_TIMEOUT_S)
    combiner = Combiner(lambda: client, lambda _client, _script: None, bound=lambda: DEADLINE_S)
    try:
        assert combiner.send([("ping", PING)]) == [b"PONG"]
        with frozen(server):
            started = time.monotonic()
            (reply,) = combiner.send([("ping", PING)])
            waited = time.monotonic() - started
        assert isinstance(reply, redis.TimeoutError)
        assert waited < BOUND_S, f"the call waited {waited:.1f} s, past its deadline"
        assert combiner.send([("ping", PING)]) == [b"PONG"]  # a new connection
    finally:
        client.close()


def test_a_connection_opened_under_a_near_deadline_keeps_its_socket_timeout(
    slow_server: RedisServer,
) -> None:
    """The combiner opens its connection within the batch's deadline (a frozen Redis never
    answers the handshake); redis-py's parser must not keep that deadline as the socket
    timeout: a later call with no near deadline waits for a slow reply (here 0.6 s), it
    does not time out at the first batch's 0.2 s."""
    client = redis.Redis(port=slow_server.port, socket_timeout=SOCKET_TIMEOUT_S)
    bound = [DEADLINE_S]
    combiner = Combiner(lambda: client, lambda _client, _script: None, bound=lambda: bound[0])
    try:
        for _ in range(2):  # the second read has its own timeout too (and restores after)
            assert combiner.send([("ping", PING)]) == [b"PONG"]
        bound[0] = math.inf
        assert combiner.send([("sleep", DEBUG_SLEEP)]) == [b"OK"]
    finally:
        client.close()


def test_a_blpop_is_bounded_by_the_block_and_the_health_deadline(server: RedisServer) -> None:
    """The blocking client's socket timeout outlasts the longest block; a frozen Redis
    fails the wait after the block plus ``health_s``."""
    store = RedisStore(server.url, health_s=DEADLINE_S)
    key = f"t-{uuid.uuid4().hex[:12]}"
    assert store.blpop(key, 0.05) is False  # connected, nothing to pop
    with frozen(server):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.blpop(key, 0.05)
        waited = time.monotonic() - started
    assert waited < BOUND_S, f"the wait took {waited:.1f} s, past its deadline"
    store.client.lpush(key, b"1")
    assert store.blpop(key, 1.0) is True


def test_the_asyncio_wire_fails_its_callers_when_it_cannot_get_a_connection(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error in the carrier (redis-py 5.0-5.2's checkout was one: a
    TypeError) fails the batch: a future left unresolved would hang its caller."""
    store = AsyncStore(RedisStore(server.url))

    async def broken(_pool: Any) -> Any:
        raise TypeError("get_connection() missing 1 required positional argument")

    async def ping() -> list[Any]:
        return await asyncio.wait_for(store.send(("ping", PING)), BOUND_S)  # never a hang

    async def main() -> None:
        try:
            assert await ping() == [b"PONG"]  # redis-py 5.0-5.2 hung here before
            await store.wire._drop()  # the next batch needs a connection again
            monkeypatch.setattr(aio, "atake_connection", broken)
            with pytest.raises(FleetError, match="TypeError"):
                await ping()
            monkeypatch.undo()
            assert await ping() == [b"PONG"]
        finally:
            await store.aclose()

    asyncio.run(main())


def test_the_asyncio_wire_is_bounded_by_the_health_deadline_on_a_frozen_redis(
    server: RedisServer,
) -> None:
    """A reply that does not come within ``health_s`` fails the call as an outage (on
    Python 3.10 ``asyncio.wait_for`` raises ``asyncio.TimeoutError``, not an ``OSError``:
    the carrier must fail its batch on it too)."""
    store = AsyncStore(RedisStore(server.url, health_s=DEADLINE_S))

    async def main() -> None:
        try:
            assert await store.send(("ping", PING)) == [b"PONG"]
            with frozen(server):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await asyncio.wait_for(store.send(("ping", PING)), BOUND_S)
                waited = time.monotonic() - started
            assert waited < BOUND_S, f"the call waited {waited:.1f} s, past its deadline"
            assert await asyncio.wait_for(store.send(("ping", PING)), BOUND_S) == [b"PONG"]
        finally:
            await store.aclose()

    asyncio.run(main())
