"""The combiner's bare reply reader (celery_fleet/store/replies.py) where Redis fails.

An outside audit of the reader at the combiner's seams, with real components: a private
``redis-server`` frozen (SIGSTOP) under sixteen threads, restarted between a posted call
and the next ask (NOSCRIPT, loaded and sent again), its scripts flushed while the wire is
busy, the combiner's connection killed mid-round-trip, the carrier interrupted mid-reply
(a signal handler raising, as Celery's soft time limit does), a pipelined batch's replies
split at every byte, a Unix-socket URL, RESP2 and RESP3. Each checks that every caller
gets its own reply (never another call's) and that the wire works after the fault.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.exceptions import NoScriptError

from celery_fleet import Fleet
from celery_fleet.errors import ConfigError, FleetError
from celery_fleet.store import replies as bare
from celery_fleet.store.combiner import Combiner
from celery_fleet.store.replies import BareReader, reader_for
from celery_fleet.testing.redis_server import RedisServer, find_binary

#: The one script the combiner calls here: it answers its argument (a caller's tag).
ECHO = "return ARGV[1]"
#: Answers its argument after keeping Redis busy for ARGV[2] ms.
SLOW = (
    "local t = redis.call('TIME') local s = t[1] * 1000000 + t[2] "
    "repeat local n = redis.call('TIME') until n[1] * 1000000 + n[2] - s > ARGV[2] * 1000 "
    "return ARGV[1]"
)
SOURCES = {"echo": ECHO, "slow": SLOW}


class Interrupt(BaseException):
    """Stands for Celery's SoftTimeLimitExceeded raised by a signal handler."""


def _resp(*words: str | bytes) -> bytes:
    parts = [w if isinstance(w, bytes) else w.encode() for w in words]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)


def _sha(client: redis.Redis, name: str) -> str:
    return str(client.script_load(SOURCES[name]))


def _echo(sha: str, tag: str) -> tuple[str, bytes]:
    return ("echo", _resp("EVALSHA", sha, "0", tag))


def _slow(sha: str, tag: str, ms: int) -> tuple[str, bytes]:
    return ("slow", _resp("EVALSHA", sha, "0", tag, str(ms)))


def _load(client: redis.Redis, script: str) -> None:
    client.script_load(SOURCES[script])


@pytest.fixture
def private(redis_of_this_test: RedisServer) -> RedisServer:
    return redis_of_this_test


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def protocol(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def _combiner(
    url: str, protocol: int, bound: Any = None, **options: Any
) -> tuple[Combiner, redis.Redis, dict[str, str]]:
    client = redis.Redis.from_url(url, protocol=protocol, **options)
    shas = {name: _sha(client, name) for name in SOURCES}
    combiner = Combiner(lambda: client, _load, bound)
    assert combiner.send([_echo(shas["echo"], "warm")]) == [b"warm"]
    assert combiner._reader is not None, "the wire should read its replies bare"
    return combiner, client, shas


def _run_threads(target: Any, n: int, timeout: float) -> list[Any]:
    """Run ``target(i)`` in ``n`` threads at once; their results (or exceptions)."""
    out: list[Any] = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = target(i)
        except BaseException as exc:  # noqa: BLE001
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a caller never returned"
    return out


def _all_own(
    combiner: Combiner, sha: str, n: int = 16, rounds: int = 20, lost_ok: bool = False
) -> None:
    """``n`` threads, ``rounds`` calls each: every caller gets its own tag back."""

    def caller(i: int) -> list[Any]:
        got = []
        for r in range(rounds):
            tag = f"t{i}-r{r}"
            reply = combiner.send([_echo(sha, tag), _echo(sha, tag + "b")])
            got.append((tag, reply))
        return got

    for result in _run_threads(caller, n, timeout=60):
        assert isinstance(result, list), result
        for tag, reply in result:
            for want, got in zip([tag.encode(), (tag + "b").encode()], reply, strict=True):
                # NOSCRIPT only when the script was flushed again before it was sent again
                assert got == want or (lost_ok and isinstance(got, NoScriptError)), (
                    f"{tag} got {reply!r}"
                )


# -- a frozen Redis under sixteen threads ----------------------------------------------------


@pytest.mark.timeout(120)
def test_sixteen_callers_on_a_frozen_redis_stop_at_their_own_deadlines(
    private: RedisServer, protocol: int
) -> None:
    deadlines: dict[str, float] = {}

    def bound() -> float:
        return deadlines.get(threading.current_thread().name, 5.0)

    combiner, client, shas = _combiner(private.url, protocol, bound, socket_timeout=10.0)
    assert private.proc is not None
    private.proc.send_signal(signal.SIGSTOP)
    try:

        def caller(i: int) -> tuple[float, float, list[Any]]:
            wait = 0.3 + 0.1 * i  # 0.3 s .. 1.8 s, each its own
            deadlines[threading.current_thread().name] = wait
            started = time.monotonic()
            replies = combiner.send([_echo(shas["echo"], f"frozen{i}")])
            return wait, time.monotonic() - started, replies

        results = _run_threads(caller, 16, timeout=30)
    finally:
        private.proc.send_signal(signal.SIGCONT)
    for result in results:
        assert isinstance(result, tuple), result
        wait, took, replies = result
        assert isinstance(replies[0], redis.TimeoutError), replies
        assert took < wait + 1.5, f"a caller of {wait:.1f} s waited {took:.2f} s"  # not 10 s
    # After SIGCONT the frozen calls' replies may still come on the old socket: the wire
    # must have dropped it (out of step) and every later caller gets its own reply.
    _all_own(combiner, shas["echo"])
    assert combiner._reader is not None and not combiner._reader.pending(combiner._conn)
    client.close()


# -- a restart, a script flush, a killed connection -------------------------------------------


@pytest.mark.timeout(90)
def test_a_restart_between_a_posted_call_and_the_next_ask_loads_and_sends_again(
    protocol: int,
) -> None:
    binary = find_binary(install=False)
    server = RedisServer(binary=binary).start()
    try:
        combiner, client, shas = _combiner(server.url, protocol)
        combiner.flush_s = 60.0  # held: only the next ask writes it
        got: list[Any] = []
        assert combiner.post([_echo(shas["echo"], "posted")], got.append) is not None
        port = server.port
        server.stop()
        server = RedisServer(port=port, binary=binary).start()  # empty: no scripts
        replies = combiner.send([_echo(shas["echo"], "ask"), _echo(shas["echo"], "ask2")])
        assert replies == [b"ask", b"ask2"], [repr(r) for r in replies]
        assert got == [[b"posted"]]
        _all_own(combiner, shas["echo"], n=4, rounds=10)
        client.close()
    finally:
        server.stop()


@pytest.mark.timeout(90)
def test_a_restart_with_a_posted_reply_unread_fails_only_as_dropped(protocol: int) -> None:
    """A posted call written (its reply on the socket, unread) when Redis restarts: the
    next ask may fail as dropped (it was written to a dead socket), never with another
    call's reply, and the call after it works."""
    binary = find_binary(install=False)
    server = RedisServer(binary=binary).start()
    try:
        combiner, client, shas = _combiner(server.url, protocol)
        got: list[Any] = []
        assert combiner.post([_echo(shas["echo"], "posted")], got.append) is not None
        combiner.flush()  # written, reply left unread
        assert combiner._unread
        time.sleep(0.1)
        port = server.port
        server.stop()
        server = RedisServer(port=port, binary=binary).start()
        replies = combiner.send([_echo(shas["echo"], "ask")])
        assert replies == [b"ask"] or isinstance(replies[0], redis.ConnectionError), replies
        assert got == [[b"posted"]]
        assert combiner.send([_echo(shas["echo"], "after")]) == [b"after"]
        client.close()
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_script_flush_while_busy_never_gives_a_caller_another_calls_reply(
    private: RedisServer, protocol: int
) -> None:
    combiner, client, shas = _combiner(private.url, protocol)
    admin = redis.Redis.from_url(private.url)
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            admin.script_flush()
            time.sleep(0.002)

    t = threading.Thread(target=flusher, daemon=True)
    t.start()
    try:
        _all_own(combiner, shas["echo"], n=16, rounds=30, lost_ok=True)
    finally:
        stop.set()
        t.join(5)
        admin.close()
    client.close()


@pytest.mark.timeout(60)
def test_client_kill_mid_round_trip_fails_that_call_and_the_next_works(
    private: RedisServer, protocol: int
) -> None:
    """The combiner's connection is killed while its calls wait (held by ``CLIENT PAUSE
    WRITE``: a script call is a write, the admin's CLIENT KILL is not): that round trip
    fails as dropped, and the wire reconnects for the next call."""
    combiner, client, shas = _combiner(private.url, protocol)
    admin = redis.Redis.from_url(private.url)
    admin.execute_command("CLIENT", "PAUSE", "3000", "WRITE")

    def kill() -> None:
        time.sleep(0.2)
        try:
            for entry in admin.client_list():
                if entry.get("cmd") == "evalsha":
                    admin.client_kill_filter(_id=entry["id"])
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    replies = combiner.send([_echo(shas["echo"], "x"), _echo(shas["echo"], "y")])
    killer.join(5)
    assert all(isinstance(r, redis.ConnectionError) for r in replies), replies
    assert combiner.send([_echo(shas["echo"], "next")]) == [b"next"]
    _all_own(combiner, shas["echo"], n=4, rounds=10)
    admin.close()
    client.close()


# -- an interrupt in the carrier's thread, mid-reply ------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("own_deadline", [False, True], ids=["socket-timeout", "own-deadline"])
def test_an_interrupt_mid_reply_drops_the_wire_and_the_next_call_gets_its_own(
    private: RedisServer, protocol: int, own_deadline: bool
) -> None:
    """A signal handler raises while the carrier is in the middle of a big reply (part of
    it received, the rest still coming): the next call must get its own reply, not the
    rest of that one."""
    bound = (lambda: 3.0) if own_deadline else None
    combiner, client, shas = _combiner(private.url, protocol, bound, socket_timeout=5.0)
    big = "y" * 2_000_000  # many recv() calls: the handler fires between two of them
    real_recv = BareReader._recv
    recvs = [0]
    ours = combiner._conn._sock
    main = threading.main_thread()

    def recv(sock: Any, size: int) -> bytes:
        # Only this combiner's reads in this thread count: the patch is the class's, and a
        # thread an earlier test left running (its own combiner) reads through it too; its
        # recv arming the timer made the interrupt land after this call's replies were all
        # read (nothing out of step, the wire rightly kept: the suite failed once).
        if sock is not ours or threading.current_thread() is not main:
            return real_recv(sock, size)
        recvs[0] += 1
        if recvs[0] == 3:
            signal.setitimer(signal.ITIMER_REAL, 0.001)
            time.sleep(0.05)  # the handler runs here, mid-reply
        # small reads: the reply is still coming at the third, however fast the wire
        return real_recv(sock, min(size, 16_384))

    def handler(signum: int, frame: Any) -> None:
        raise Interrupt()

    old = signal.signal(signal.SIGALRM, handler)
    BareReader._recv = staticmethod(recv)  # type: ignore[method-assign, assignment]
    try:
        with pytest.raises(Interrupt):
            combiner.send([_echo(shas["echo"], big), _echo(shas["echo"], "second")])
    finally:
        BareReader._recv = staticmethod(real_recv)  # type: ignore[method-assign, assignment]
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert recvs[0] >= 3, "the interrupt must land mid-reply"
    assert combiner._conn._sock is None, "out of step: the connection must be dropped"
    assert combiner.send([_echo(shas["echo"], "next")]) == [b"next"]
    _all_own(combiner, shas["echo"], n=4, rounds=10)
    client.close()


# -- replies split at every byte of a pipelined batch -----------------------------------------


class _Chunks:
    """A socket whose ``recv`` hands out the given chunks, one a call (then EOF)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = [c for c in chunks if c]

    def recv(self, size: int) -> bytes:
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > size:
            chunk, rest = chunk[:size], chunk[size:]
            self.chunks.insert(0, rest)
        return chunk


class _Conn:
    """The parts of a redis-py connection the reader touches."""

    def __init__(self, sock: _Chunks) -> None:
        self._sock: _Chunks | None = sock
        self.socket_timeout = 5.0

    def disconnect(self) -> None:
        self._sock = None


def test_a_pipelined_batch_split_at_every_byte_reads_the_same(
    private: RedisServer, protocol: int
) -> None:
    """The raw bytes of a real batch's replies (integers, lease-id bulks, arrays, an
    error, a nested array, RESP3 types) fed to the reader cut in two at every offset, and
    dribbled one byte per recv: the same replies, in order, nothing left over."""
    raw = socket.create_connection(("127.0.0.1", private.port))
    if protocol == 3:
        raw.sendall(_resp("HELLO", "3"))
    bodies = [
        "return 1",
        "return 'lease-0123456789abcdef'",
        "return {1, 'granted', {2, 'x'}, -5}",
        "return redis.error_reply('NOSCRIPT No matching script')",
        "return {}",
        "return nil",
        "redis.setresp(3); return {double = 2.5}",
        "redis.setresp(3); return {map = {a = 1}}",
        "return string.rep('q', 5000)",
        "return redis.status_reply('OK')",
    ]
    raw.sendall(b"".join(_resp("EVAL", body, "0") for body in bodies))
    raw.settimeout(0.3)
    data = b""
    while True:  # everything Redis answers, then 0.3 s of silence
        try:
            chunk = raw.recv(65536)
        except TimeoutError:
            break
        assert chunk
        data += chunk
    raw.close()

    parse_error = redis.connection.Connection()._parser.parse_error

    def read_all(chunks: list[bytes]) -> list[Any]:
        conn = _Conn(_Chunks(chunks))
        reader = BareReader(None, parse_error)
        out: list[Any] = []
        for _ in range(len(bodies) + (protocol == 3)):  # HELLO's map first on RESP3
            try:
                out.append(reader.read(conn))
            except redis.ResponseError as exc:
                out.append((type(exc), str(exc)))
        assert not reader.pending(conn), "bytes left over"
        assert conn._sock is not None and not conn._sock.chunks, "replies left unread"
        return out

    whole = read_all([data])
    assert whole[-len(bodies)] == 1 and whole[-1] == b"OK"
    assert (redis.exceptions.NoScriptError, "No matching script") in whole
    for cut in range(1, len(data)):
        assert read_all([data[:cut], data[cut:]]) == whole, f"split at byte {cut}"
    # every byte a recv of its own
    assert read_all([data[i : i + 1] for i in range(len(data))]) == whole


# -- the wire's settings: a Unix socket, decoded replies, TLS and Sentinel ----------------------


@pytest.fixture
def unix_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private redis-server that also listens on a Unix socket (its path, its process)."""
    try:
        binary = find_binary(install=False)
    except Exception:  # pragma: no cover
        pytest.skip("no redis-server binary")
    with tempfile.TemporaryDirectory(prefix="fleet-unix-") as where:
        path = os.path.join(where, "redis.sock")
        with RedisServer(binary=binary, args=["--unixsocket", path]) as server:
            assert server.proc is not None
            yield path, server.proc


@pytest.mark.timeout(60)
def test_a_unix_socket_url_reads_bare_and_survives_a_freeze(
    unix_server: tuple[str, subprocess.Popen[bytes]], protocol: int
) -> None:
    path, proc = unix_server
    url = f"unix://{path}?db=3&protocol={protocol}"
    fleet = Fleet(
        redis_url=url,
        namespace=f"seams-unix-{protocol}",
        limits={"llm": {"max_in_flight": 2}},
        max_wait=0.5,
    )
    try:
        for _ in range(10):
            with fleet.slot("llm"):
                pass
        combiner = fleet.store.combiner
        assert isinstance(combiner, Combiner)
        assert type(combiner._conn) is redis.UnixDomainSocketConnection
        assert combiner._reader is not None
        assert str(combiner._conn.protocol) == str(protocol)
        proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            try:
                with fleet.slot("llm"):
                    pass  # admitted locally (fleet_store_down='local'), or refused
            except FleetError:
                pass
            assert time.monotonic() - started < 5.0
        finally:
            proc.send_signal(signal.SIGCONT)
        for _ in range(10):
            with fleet.slot("llm"):
                pass
        fleet.store.drain()
        assert combiner._reader is not None and not combiner._reader.pending(combiner._conn)
        # (the ask written to the frozen server ran after SIGCONT: its lease is the
        # fleet's to find, as on TCP; in_flight is not what this test checks)
        decision = fleet.try_acquire("llm")
        assert decision.allowed and fleet.release(decision).released
    finally:
        fleet.close()


def test_a_decoding_client_is_refused_as_a_config_error(private: RedisServer) -> None:
    client = redis.Redis.from_url(private.url, decode_responses=True)
    try:
        with pytest.raises(ConfigError):
            Fleet(redis_client=client, namespace="seams-decode", limits={"llm": {"rpm": 60}})
    finally:
        client.close()


def test_tls_and_sentinel_connections_keep_redis_pys_reads(private: RedisServer) -> None:
    from celery_fleet.store.sentinel import FleetSentinelConnection, FleetSentinelPool

    assert reader_for(redis.SSLConnection(port=private.port)) is None
    sentinel = redis.Sentinel([("127.0.0.1", private.port)])
    pool = FleetSentinelPool("mymaster", sentinel)
    assert pool.connection_class is FleetSentinelConnection
    assert reader_for(pool.connection_class(connection_pool=pool)) is None


# -- close() while another thread is on the wire ----------------------------------------------


@pytest.mark.timeout(60)
def test_close_racing_callers_never_breaks_a_round_trip_with_a_raw_error(
    private: RedisServer, protocol: int
) -> None:
    """``close()`` (a fleet closed while a thread still calls through it) must not shut
    the socket under a carrier's round trip: that surfaced raw ``OSError`` (EBADF from
    the socket) and ``AttributeError`` (redis-py's handshake). Each call gets its own
    reply or a ``redis.RedisError``; the wire is closed once nobody is on it."""
    combiner, client, shas = _combiner(private.url, protocol, lambda: 2.0)
    stop = time.monotonic() + 2.0
    closes = [0]

    def caller(i: int) -> list[Any]:
        odd = []
        n = 0
        while time.monotonic() < stop:
            tag = f"c{i}-{n}"
            n += 1
            try:
                reply = combiner.send([_echo(shas["echo"], tag)])[0]
            except Exception as exc:  # noqa: BLE001
                odd.append(exc)
                continue
            if reply != tag.encode() and not isinstance(reply, redis.RedisError):
                odd.append(reply)
        return odd

    def closer() -> None:
        while time.monotonic() < stop:
            combiner.close()
            closes[0] += 1
            time.sleep(0.0002)

    closing = threading.Thread(target=closer, daemon=True)
    closing.start()
    results = _run_threads(caller, 2, timeout=30)
    closing.join(10)
    assert closes[0] > 100
    assert results == [[], []]
    combiner.close()
    assert combiner._conn is None
    client.close()


def test_replies_due_on_a_closed_connection_are_not_read_off_the_next(
    private: RedisServer, protocol: int
) -> None:
    """Posted calls written but not read when the connection is replaced (the client
    changed, or the wire was closed): their replies are not on the new socket. Read off
    it, they would take the caller's reply (and the caller the reply after it: out of
    step). The client changed, they are read off the old connection first (it is open:
    they ran, and failed as dropped a release would be owed again, Redis taken for away:
    a fleet closing while a thread calls through its combiner replaced the client); the
    socket closed under them, the next round trip fails them."""
    combiner, client, shas = _combiner(private.url, protocol, lambda: 2.0)
    other = redis.Redis.from_url(private.url, protocol=protocol)
    clients = [client]
    combiner._client = lambda: clients[0]
    got: list[Any] = []
    combiner.flush_s = 60.0
    assert combiner.post([_echo(shas["echo"], "posted")], got.append) is not None
    combiner.flush()  # written, its reply left unread
    assert combiner._unread and not got
    old = combiner._conn
    clients[0] = other  # a new client: a new connection for the next round trip
    assert combiner.send([_echo(shas["echo"], "mine")]) == [b"mine"]
    assert got == [[b"posted"]], got
    assert combiner._conn is not old and old._sock is None  # the old one closed
    assert combiner.send([_echo(shas["echo"], "after")]) == [b"after"]

    got.clear()
    assert combiner.post([_echo(shas["echo"], "gone")], got.append) is not None
    combiner.flush()
    assert combiner._unread and not got
    combiner._conn.disconnect()  # closed with replies due (a waiter handed the wire gave up)
    assert combiner.send([_echo(shas["echo"], "next")]) == [b"next"]
    assert len(got) == 1 and isinstance(got[0][0], redis.ConnectionError), got
    other.close()
    client.close()


def test_close_reads_the_replies_due_before_it_closes_the_wire(
    private: RedisServer, protocol: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A posted call written after close()'s drain (a release written at once by its
    poster, or the flusher's write while close() waits for it to leave the wire): its
    reply is on its way and must be read before the wire closes. Closed unread, it failed
    as dropped: a release that ran was owed again and Redis taken for away (the fleet
    admitting locally, later releases of the closing fleet held back for a replay that
    never comes)."""
    combiner, client, shas = _combiner(private.url, protocol, lambda: 2.0)
    combiner.flush_s = 60.0  # only a carrier writes what is held
    drain = combiner.drain
    got: dict[str, list[Any]] = {}
    writing = threading.Event()
    real_send = bare.send

    def slow_send(conn: Any, data: bytes) -> None:
        if b"busy" in data:  # the carrier close() meets on the wire
            writing.set()
            time.sleep(0.3)
        real_send(conn, data)

    monkeypatch.setattr(bare, "send", slow_send)

    def post(tag: str) -> None:
        assert combiner.post([_echo(shas["echo"], tag)], lambda r: got.setdefault(tag, r))

    def free_wire_then_drain() -> None:  # another thread's post written at once, meanwhile
        drain()
        post("free")
        combiner.flush()
        assert combiner._unread and not combiner._busy

    monkeypatch.setattr(combiner, "drain", free_wire_then_drain)
    combiner.close()
    assert got == {"free": [b"free"]}, got
    assert combiner._conn is None and not combiner._unread

    assert combiner.send([_echo(shas["echo"], "reopened")]) == [b"reopened"]

    def busy_wire_then_drain() -> None:  # the flusher writing when close() looks
        drain()
        post("busy")
        threading.Thread(target=combiner.flush, daemon=True).start()
        assert writing.wait(10)

    monkeypatch.setattr(combiner, "drain", busy_wire_then_drain)
    combiner.close()
    assert got["busy"] == [b"busy"], got
    assert combiner._conn is None and not combiner._unread and not combiner._busy
    client.close()


@pytest.mark.timeout(60)
def test_close_on_a_frozen_redis_returns_within_the_health_deadline(private: RedisServer) -> None:
    """Redis frozen while threads keep calling: close() waits for the carrier on the wire
    no longer than the health deadline from its own start. Its drain (behind a carrier
    that times out) and then its wait for the next carrier (a caller that came meanwhile)
    took up to twice it."""
    health = 1.0
    client = redis.Redis.from_url(private.url)
    sha = _sha(client, "echo")
    combiner = Combiner(lambda: client, _load, lambda: health, lambda: health)
    assert combiner.send([_echo(sha, "warm")]) == [b"warm"]
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            combiner.send([_echo(sha, "x")])

    callers = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
    for t in callers:
        t.start()
    time.sleep(0.1)
    took = []
    try:
        with private.frozen():
            time.sleep(0.3)  # a carrier is waiting on the frozen server
            for _ in range(3):
                start = time.monotonic()
                combiner.close()
                took.append(time.monotonic() - start)
    finally:
        stop.set()
    for t in callers:
        t.join(10)
    # the defect took about twice the deadline; the slack is for a loaded CI machine
    assert max(took) < health * 1.5, took
    assert combiner.send([_echo(sha, "after")]) == [b"after"]
    combiner.close()
    client.close()
