"""The combiner's own reply reader (celery_fleet/store/replies.py) against redis-py's parser.

Every reply shape a script or a command can give is read twice from a real Redis, by
redis-py's ``read_response`` and by :class:`BareReader`, on RESP2 and RESP3 connections,
and must come out the same (values, types, exception classes and texts). Then what a wire
meets: replies split across ``recv`` calls and several in one, a push message between
replies (RESP3 client tracking), a frozen Redis (SIGSTOP: a read bounded by its timeout),
a connection the server closed, a reconnect (the buffer of the old socket is dropped).
The servers are private ``redis-server`` processes.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_fleet import Fleet
from celery_fleet.store.replies import BareReader, reader_for, send
from celery_fleet.testing.redis_server import RedisServer

#: Lua bodies (EVAL 0) and what they exercise.
SCRIPTS = {
    "int": "return 42",
    "negative": "return -7",
    "float number": "return 3.7",  # Lua numbers become integers
    "bulk": "return 'a lease id'",
    "empty bulk": "return ''",
    "binary": "return '\\r\\n\\0x'",
    "array": "return {1, 'x', {2, 'y', {}}, -3}",
    "empty array": "return {}",
    "false": "return false",
    "true": "return true",
    "nil": "return nil",
    "status": "return redis.status_reply('FINE')",
    "error": "return redis.error_reply('WRONGTYPE a custom error')",
    "nested error": "return {1, redis.error_reply('ERR inside an array'), 2}",
    "big bulk": "return string.rep('z', 300000)",  # several recv() calls
    "resp3 double": "redis.setresp(3); return {double = 3.5}",
    "resp3 map": "redis.setresp(3); return {map = {a = 1, b = {2, 3}}}",
    "resp3 set": "redis.setresp(3); return {set = {x = true}}",
    "resp3 big number": "redis.setresp(3); return {big_number = '123456789012345678901234567890'}",
    "resp3 verbatim": (
        "redis.setresp(3); return {verbatim_string = {format = 'txt', string = 'hi'}}"
    ),
    "resp3 true": "redis.setresp(3); return true",
    "resp3 false": "redis.setresp(3); return false",
    "resp3 null": "redis.setresp(3); return redis.call('GET', '{replies}:none')",
}


def _eval(body: str) -> bytes:
    args = [b"EVAL", body.encode(), b"0"]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _plain(value: Any) -> Any:
    """``value`` with every exception instance in it as (class, text): comparable."""
    if isinstance(value, BaseException):
        return type(value), str(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _outcome(read: Any) -> tuple[str, Any]:
    """What a read gave: ("ok", value) or ("raised", (class, text))."""
    try:
        return "ok", _plain(read())
    except redis.RedisError as exc:
        return "raised", (type(exc), str(exc))


@pytest.fixture(scope="module")
def server(private_redis: RedisServer) -> RedisServer:
    return private_redis


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def pair(server: RedisServer, request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """Two connections of one protocol: one read by redis-py, one by the bare reader."""
    conns = [redis.Connection(port=server.port, protocol=request.param) for _ in range(2)]
    for conn in conns:
        conn.connect()
    yield conns[0], conns[1]
    for conn in conns:
        conn.disconnect()


@pytest.mark.parametrize("case", sorted(SCRIPTS))
def test_every_reply_shape_reads_as_redis_py_reads_it(pair: tuple[Any, Any], case: str) -> None:
    theirs, ours = pair
    reader = reader_for(ours)
    assert reader is not None
    packed = _eval(SCRIPTS[case])
    theirs.send_packed_command([packed])
    send(ours, packed)
    expected = _outcome(theirs.read_response)
    got = _outcome(lambda: reader.read(ours))
    # Where redis-py's versions and parsers differ (5.0 reads a set as a set, hiredis a big
    # number as bytes; no fleet script returns either) the reader gives what redis-py 8's
    # own parser gives.
    if case == "resp3 set" and isinstance(expected[1], set):
        expected = ("ok", sorted(expected[1]))
    if case == "resp3 big number" and ours.protocol == 3 and isinstance(expected[1], bytes):
        expected = ("ok", int(expected[1]))
    assert got == expected
    if case == "nested error":  # an error inside an array stays an instance, as redis-py's
        assert got[1][1][0] is redis.ResponseError
    # both still in step
    theirs.send_command("PING")
    send(ours, b"*1\r\n$4\r\nPING\r\n")
    assert reader.read(ours) == theirs.read_response()


def test_errors_are_redis_py_classes(pair: tuple[Any, Any]) -> None:
    _theirs, ours = pair
    reader = reader_for(ours)
    assert reader is not None
    send(ours, b"*3\r\n$7\r\nEVALSHA\r\n$40\r\n" + b"0" * 40 + b"\r\n$1\r\n0\r\n")
    with pytest.raises(redis.exceptions.NoScriptError):
        reader.read(ours)
    assert ours._sock is not None  # an error reply leaves the connection in step


def test_decoded_replies_follow_the_connections_encoder(server: RedisServer) -> None:
    conn = redis.Connection(port=server.port, decode_responses=True)
    conn.connect()
    try:
        reader = reader_for(conn)
        assert reader is not None
        send(conn, _eval("return {'abc', redis.status_reply('OK'), 5}"))
        assert reader.read(conn) == ["abc", "OK", 5]
    finally:
        conn.disconnect()


def test_several_replies_in_one_recv_come_out_in_order(server: RedisServer) -> None:
    conn = redis.Connection(port=server.port)
    conn.connect()
    try:
        reader = reader_for(conn)
        assert reader is not None
        send(conn, b"".join(_eval(f"return {i}") for i in range(50)))
        time.sleep(0.05)  # all 50 replies on the socket: most come in the first recv
        assert [reader.read(conn) for _ in range(50)] == list(range(50))
        assert not reader.pending(conn)
    finally:
        conn.disconnect()


def test_a_push_between_replies_goes_to_the_handler_and_the_read_goes_on(
    server: RedisServer,
) -> None:
    conn = redis.Connection(port=server.port, protocol=3)
    conn.connect()
    other = redis.Redis(port=server.port)
    pushed: list[Any] = []
    try:
        conn.send_command("CLIENT", "TRACKING", "ON")
        assert conn.read_response() in (b"OK", "OK")
        conn.send_command("GET", "{replies}:tracked")
        conn.read_response()
        reader = BareReader(None, conn._parser.parse_error, pushed.append)
        other.set("{replies}:tracked", "1")  # invalidates: a push to conn
        time.sleep(0.05)
        send(conn, b"*1\r\n$4\r\nPING\r\n")
        assert reader.read(conn) == b"PONG"
        assert pushed and pushed[0][0] == b"invalidate"
        assert pushed[0][1] == [b"{replies}:tracked"]
    finally:
        other.delete("{replies}:tracked")
        other.close()
        conn.disconnect()


def test_a_read_on_a_frozen_redis_stops_at_its_timeout_and_drops_the_connection(
    server: RedisServer,
) -> None:
    conn = redis.Connection(port=server.port, socket_timeout=30.0)
    conn.connect()
    try:
        reader = reader_for(conn)
        assert reader is not None
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            send(conn, b"*1\r\n$4\r\nPING\r\n")
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                reader.read(conn, timeout=0.2)
            waited = time.monotonic() - started
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert waited < 5.0, f"waited {waited:.1f} s: not bounded by the read's timeout"
        assert conn._sock is None  # out of step: the PONG may still come
        conn.connect()
        send(conn, b"*1\r\n$4\r\nPING\r\n")
        assert reader.read(conn, timeout=1.0) == b"PONG"
        assert conn._sock.gettimeout() == 30.0  # the connection's own timeout is back
    finally:
        conn.disconnect()


def test_a_connection_the_server_closed_fails_as_a_connection_error(server: RedisServer) -> None:
    conn = redis.Connection(port=server.port, client_name="replies-killed")
    conn.connect()
    admin = redis.Redis(port=server.port)
    try:
        reader = reader_for(conn)
        assert reader is not None
        for client in admin.client_list():
            if client.get("name") == "replies-killed":
                admin.client_kill_filter(_id=client["id"])
        with pytest.raises(redis.ConnectionError):
            reader.read(conn, timeout=2.0)  # nothing was asked: the close is all there is
        assert conn._sock is None
    finally:
        admin.close()
        conn.disconnect()


def test_a_reconnect_drops_what_the_old_socket_left(server: RedisServer) -> None:
    conn = redis.Connection(port=server.port)
    conn.connect()
    try:
        reader = reader_for(conn)
        assert reader is not None
        send(conn, _eval("return 1") + _eval("return 2"))
        time.sleep(0.05)
        assert reader.read(conn) == 1
        assert reader.pending(conn)  # the second reply is buffered, nobody asked for it
        conn.disconnect()
        conn.connect()
        send(conn, _eval("return 3"))
        assert reader.read(conn) == 3  # not the old socket's 2
    finally:
        conn.disconnect()


def test_only_plain_connections_without_health_checks_are_read_bare(server: RedisServer) -> None:
    class Instrumented(redis.Connection):
        pass

    assert reader_for(redis.Connection(port=server.port)) is not None
    assert reader_for(redis.UnixDomainSocketConnection(path="/nonexistent")) is not None
    assert reader_for(redis.SSLConnection(port=server.port)) is None
    assert reader_for(Instrumented(port=server.port)) is None
    assert reader_for(redis.Connection(port=server.port, health_check_interval=30)) is None


def test_the_fleets_wire_reads_bare_and_decides_as_before(server: RedisServer) -> None:
    """A plain fleet's combiner uses the reader; slots and a lean release's ride work."""
    for protocol in (2, 3):
        client = redis.Redis(port=server.port, protocol=protocol)
        fleet = Fleet(
            redis_client=client,
            namespace=f"replies-{protocol}",
            limits={"llm": {"rpm": 1000, "tpm": 100000, "max_in_flight": 2}},
        )
        try:
            for _ in range(20):
                with fleet.slot("llm", tokens=10):
                    pass
            assert fleet.store.combiner._reader is not None
            fleet.store.drain()
            assert fleet.admission.in_flight("llm") == 0
            first = fleet.try_acquire("llm")
            second = fleet.try_acquire("llm")
            assert first.allowed and second.allowed
            refused = fleet.try_acquire("llm")  # the cap, read off the reply
            assert not refused.allowed and refused.reason == "in_flight"
            assert fleet.release(first).released and fleet.release(second).released
        finally:
            fleet.close()
            client.close()
