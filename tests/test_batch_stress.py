"""Stress and failure tests of the Combiner (celery_fleet/batch.py) against a real Redis.

The suite's Redis (conftest: DB 9, a namespace per test, deleted afterwards); anything that
kills connections, restarts Redis or flushes scripts runs on a private ``redis-server``.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_fleet import Fleet
from celery_fleet.errors import StoreUnavailable, Throttled
from celery_fleet.store.combiner import Combiner
from celery_fleet.testing.redis_server import RedisServer, find_binary


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt / gevent.Timeout raised in a thread using the wire."""


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def shared_fleet(make_fleet: Callable[..., Fleet]) -> Fleet:
    """A Fleet on the suite's Redis, in this test's own namespace (see conftest)."""
    fleet: Fleet = make_fleet({"llm": {"max_in_flight": 1000}})
    return fleet


@pytest.fixture
def private() -> Iterator[RedisServer]:
    try:
        binary = find_binary(install=False)
    except Exception:
        pytest.skip("no redis-server binary")
    with RedisServer(binary=binary) as server:
        yield server


def _resp(*words: str | bytes) -> bytes:
    parts = [w if isinstance(w, bytes) else w.encode() for w in words]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)


def _eval(body: str) -> tuple[str, bytes]:
    return ("eval", _resp("EVAL", body, "0"))


#: A script that keeps Redis busy for ``ms`` then answers ``tag``.
def _slow(ms: int, tag: str) -> tuple[str, bytes]:
    body = (
        "local t = redis.call('TIME') local s = t[1] * 1000000 + t[2] "
        "repeat local n = redis.call('TIME') until n[1] * 1000000 + n[2] - s > "
        f"{ms * 1000} return '{tag}'"
    )
    return _eval(body)


def _fast(tag: str) -> tuple[str, bytes]:
    return _eval(f"return '{tag}'")


def _combiner(url: str, **options: Any) -> tuple[Combiner, redis.Redis]:
    client = redis.Redis.from_url(url, **options)
    return Combiner(lambda: client, lambda c, s: None), client


def _in_thread(fn: Any, timeout: float) -> tuple[bool, list[Any]]:
    """Run fn in a daemon thread; (finished in time, [result or exception])."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), out


def _interrupt_after(seconds: float) -> Any:
    """Raise Interrupt in the main thread after ``seconds`` (as Ctrl-C would)."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupt()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return old


def _no_more_interrupts(old: Any) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


# -- many threads, one wire -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_32_threads_of_mixed_send_and_post_all_return_and_release_everything(
    shared_fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = shared_fleet
    caplog.set_level(logging.WARNING, logger="celery_fleet")
    with fleet.slot("llm"):
        pass  # the release script answered once on the wire: later releases are posted
    errors: list[BaseException] = []
    done = [0] * 32

    def worker(i: int) -> None:
        rnd = random.Random(i)
        try:
            for _ in range(200):
                op = rnd.random()
                if op < 0.4:
                    with fleet.slot("llm"):
                        pass
                elif op < 0.6:
                    with fleet.slot("llm") as slot:
                        slot.next()
                elif op < 0.85:
                    d = fleet.try_acquire("llm")
                    assert d.allowed
                    fleet.release(d)
                else:
                    fleet.admission.in_flight("llm")  # a plain call: drains first
                done[i] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a caller never returned"
    assert not errors, errors[:3]
    assert done == [200] * 32
    fleet.store.drain()
    assert fleet.admission.in_flight("llm") == 0
    assert not fleet.store.combiner._unread and not fleet.store.combiner._queue
    assert not fleet.store.combiner._busy
    # (not a warning about another Redis: a fleet of an earlier test on its private server,
    # stopped since, whose background thread was still in a step)
    url = fleet.store.safe_url
    bad = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and (url in r.getMessage() or "redis://" not in r.getMessage())
    ]
    assert not bad, [r.getMessage() for r in bad[:3]]


@pytest.mark.timeout(60)
def test_replies_go_to_their_own_caller_under_contention(shared_fleet: Fleet) -> None:
    combiner = shared_fleet.store.combiner
    wrong: list[tuple[str, Any]] = []

    def worker(i: int) -> None:
        for j in range(200):
            tag = f"{i}-{j}"
            if j % 3 == 0:
                got: list[Any] = []
                if combiner.post([_fast(tag)], got.extend) is False:
                    combiner.send([_fast(tag)])
            else:
                (reply,) = combiner.send([_fast(tag)])
                if reply != tag.encode():
                    wrong.append((tag, reply))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not any(t.is_alive() for t in threads)
    assert not wrong, wrong[:3]


# -- BaseException (KeyboardInterrupt, gevent.Timeout) ------------------------------------


@pytest.mark.timeout(60)
def test_a_waiter_interrupted_in_the_queue_does_not_stall_the_wire(private: RedisServer) -> None:
    """A caller waiting for its turn is interrupted; it is then chosen as heir of the wire
    and nobody carries again: every later send waits forever."""
    combiner, client = _combiner(private.url)
    combiner.send([_fast("warm")])
    carrier = threading.Thread(target=combiner.send, args=([_slow(600, "a")],), daemon=True)
    carrier.start()
    time.sleep(0.1)  # the carrier is on the wire
    old = _interrupt_after(0.1)
    try:
        with pytest.raises(Interrupt):
            combiner.send([_fast("main")])  # queued behind the carrier, then interrupted
    finally:
        _no_more_interrupts(old)
    carrier.join(5)
    finished, out = _in_thread(lambda: combiner.send([_fast("later")]), timeout=5)
    assert finished, "the wire was handed to a caller that had gone: later calls hang"
    assert out == [[b"later"]]
    client.close()


@pytest.mark.timeout(60)
def test_a_carrier_interrupted_while_reading_does_not_shift_later_replies(
    private: RedisServer,
) -> None:
    """The carrier is interrupted while Redis is still working on its call. Its reply
    arrives after the next caller has written: that caller must not get it."""
    combiner, client = _combiner(private.url)
    combiner.send([_fast("warm")])
    old = _interrupt_after(0.1)
    try:
        with pytest.raises(Interrupt):
            combiner.send([_slow(500, "first")])
    finally:
        _no_more_interrupts(old)
    finished, out = _in_thread(lambda: combiner.send([_fast("second")]), timeout=10)
    assert finished
    assert out == [[b"second"]], f"got {out!r}: another call's reply"
    client.close()


@pytest.mark.timeout(60)
def test_an_interrupt_between_two_reads_does_not_shift_later_replies(
    private: RedisServer,
) -> None:
    """An async exception lands in the carrier between two replies (after redis-py's
    read_response returned, so redis-py does not disconnect): the wire is left with a
    reply due, and the next caller must not read it as its own."""
    combiner, client = _combiner(private.url)
    combiner.send([_fast("warm")])
    real = combiner._read
    hits = [0]

    def read(conn: Any, script: str) -> Any:
        reply = real(conn, script)
        hits[0] += 1
        if hits[0] == 1:
            raise Interrupt()
        return reply

    combiner._read = read  # type: ignore[method-assign]
    with pytest.raises(Interrupt):
        combiner.send([_fast("one"), _slow(400, "two")])
    finished, out = _in_thread(lambda: combiner.send([_fast("next")]), timeout=10)
    assert finished
    assert out == [[b"next"]], f"got {out!r}: another call's reply"
    client.close()


@pytest.mark.timeout(60)
def test_posted_callbacks_run_even_when_the_carrier_is_interrupted(
    private: RedisServer,
) -> None:
    combiner, client = _combiner(private.url)
    combiner.send([_fast("warm")])  # "eval" answered on this wire: it may be posted
    got: list[Any] = []
    assert combiner.post([_fast("posted")], got.append)
    time.sleep(0.1)  # Redis answers it before the slow call arrives
    old = _interrupt_after(0.1)
    try:
        with pytest.raises(Interrupt):
            combiner.send([_slow(400, "slow")])  # reads the posted reply, then is stopped
    finally:
        _no_more_interrupts(old)
    finished, _ = _in_thread(combiner.drain, timeout=10)
    assert finished
    assert len(got) == 1, "a posted call's callback never ran"
    client.close()


# -- errors between a post and its read -----------------------------------------------------


@pytest.mark.timeout(60)
def test_a_posted_callback_runs_when_a_later_reply_times_out(private: RedisServer) -> None:
    """Posted reply read fine, the waited-for one after it times out: the posted call's
    callback must still run (with its reply or an error)."""
    combiner, client = _combiner(private.url, socket_timeout=0.3)
    combiner.send([_fast("warm")])
    got: list[Any] = []
    assert combiner.post([_fast("posted")], got.append)
    time.sleep(0.1)  # Redis answers it before the slow call arrives
    replies = combiner.send([_slow(800, "slow")])
    assert isinstance(replies[0], redis.TimeoutError)
    time.sleep(0.8)  # let the slow script end before the next call
    combiner.drain()
    assert len(got) == 1, "the posted call's callback was never run"
    client.close()


@pytest.mark.timeout(60)
def test_a_posted_callback_runs_when_reloading_lost_scripts_fails(private: RedisServer) -> None:
    client = redis.Redis.from_url(private.url)
    sha = client.script_load("return 7")
    calls = {"load": 0}

    def load(_client: redis.Redis, _script: str) -> None:
        calls["load"] += 1
        raise redis.ConnectionError("Redis went away while loading")

    combiner = Combiner(lambda: client, load)
    cmd = ("seven", _resp("EVALSHA", sha, "0"))
    assert combiner.send([cmd]) == [7]
    got: list[Any] = []
    assert combiner.post([cmd], got.append)
    combiner.drain()
    assert got == [[7]]
    got.clear()
    assert combiner.post([cmd], got.append)
    client.script_flush()  # the posted call already ran; the next one meets NOSCRIPT
    assert combiner.post([cmd], got.append)
    replies = combiner.send([cmd])
    assert calls["load"] == 1
    assert isinstance(replies[0], redis.RedisError)
    assert len(got) == 2, f"posted callbacks lost: {got!r}"
    client.close()


@pytest.mark.timeout(60)
def test_connection_killed_with_posted_replies_unread(
    private: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = private.url + "/0"
    fleet = Fleet(redis_url=url, namespace="review-kill", limits={"llm": {"max_in_flight": 5}})
    admin = redis.Redis.from_url(url)
    with fleet.slot("llm"):
        pass
    # The first admission starts the presence record in the background; once it has read
    # Redis's run_id its calls (which would read the posted reply) are 2 s apart.
    deadline = time.monotonic() + 10
    while fleet.presence.run_id is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(10):
        with fleet.slot("llm"):
            pass  # posted: held, then written by the flusher
        deadline = time.monotonic() + 5
        while fleet.store.combiner._held and time.monotonic() < deadline:
            time.sleep(0.001)
        # (sent, not posted, when its script had not answered on the wire yet: release.lua
        # samples one lease in 32; or a background call read its reply): again
        if fleet.store.combiner._unread:
            break
    assert fleet.store.combiner._unread
    time.sleep(0.05)
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal")  # SKIPME yes: admin survives

    def next_call() -> Any:
        try:
            return fleet.try_acquire("llm")
        except StoreUnavailable as exc:
            return exc

    finished, out = _in_thread(next_call, timeout=10)
    assert finished
    first = out[0]
    assert isinstance(first, StoreUnavailable) or first.allowed, first
    if not isinstance(first, StoreUnavailable):
        fleet.release(first)
    d = fleet.try_acquire("llm")  # the wire is usable again
    assert d
    fleet.release(d)
    fleet.store.drain()
    assert fleet.admission.in_flight("llm") == 0
    assert not [r for r in caplog.records if "handling a posted reply failed" in r.getMessage()]
    admin.close()


@pytest.mark.timeout(90)
def test_after_a_redis_restart_a_posted_release_is_applied_before_the_next_acquire(
    tmp_path: Any,
) -> None:
    """After a restart (scripts gone) the next posted release meets NOSCRIPT; an acquire
    right after it must not be refused because of it (the release is ordered first)."""
    binary = find_binary(install=False)
    server = RedisServer(binary=binary).start()
    try:
        url = server.url + "/0"
        fleet = Fleet(
            redis_url=url, namespace="review-restart", limits={"llm": {"max_in_flight": 1}}
        )
        with fleet.slot("llm", max_wait=0):
            pass
        with fleet.slot("llm", max_wait=0):
            pass
        fleet.store.drain()
        port = server.port
        server.stop()
        server = RedisServer(port=port, binary=binary).start()  # empty, no scripts
        with fleet.slot("llm", max_wait=0):
            pass  # its release is posted, and meets NOSCRIPT
        try:
            with fleet.slot("llm", max_wait=0):
                pass
        except Throttled as exc:
            pytest.fail(f"refused by this process's own released lease: {exc}")
    finally:
        server.stop()


# -- small things ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_drain_waits_for_posted_calls_another_thread_is_carrying(private: RedisServer) -> None:
    """``drain()`` promises that what this thread posted has run before its next call; it
    must not return while the posted call is still in another carrier's batch."""
    combiner, client = _combiner(private.url)
    combiner.send([_fast("warm")])
    real = combiner._round_trip
    entered = [threading.Event(), threading.Event()]
    go = [threading.Event(), threading.Event()]
    n = [0]

    def gated(batch: list[Any], answered: list[Any]) -> Any:
        i = n[0]
        n[0] += 1
        if i < 2:
            entered[i].set()
            go[i].wait(10)
        return real(batch, answered)

    combiner._round_trip = gated  # type: ignore[method-assign]
    carrier = threading.Thread(target=combiner.send, args=([_fast("a")],), daemon=True)
    carrier.start()
    assert entered[0].wait(5)
    got: list[Any] = []
    assert combiner.post([_fast("posted")], got.append)  # queued: the wire is busy
    go[0].set()
    assert entered[1].wait(5)  # the carrier carries the posted call on, still unwritten
    finished, _ = _in_thread(combiner.drain, timeout=0.5)
    go[1].set()
    carrier.join(5)
    assert not finished, "drain() returned before the posted call was even written"
    client.close()


@pytest.mark.timeout(30)
def test_pending_counts_from_the_oldest_unread_post(private: RedisServer) -> None:
    combiner, client = _combiner(private.url)
    combiner.send([_fast("warm")])
    assert combiner.post([_fast("p1")], lambda r: None)
    time.sleep(0.3)
    assert combiner.post([_fast("p2")], lambda r: None)
    assert combiner.pending() >= 0.3, "the keeper would not read p1 until posts stop"
    combiner.drain()
    client.close()


@pytest.mark.timeout(60)
def test_a_forked_child_uses_its_own_wire(shared_fleet: Fleet) -> None:
    fleet = shared_fleet
    with fleet.slot("llm"):
        pass
    with fleet.slot("llm"):
        pass  # posted, unread in the parent
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            for _ in range(20):
                with fleet.slot("llm"):
                    pass
            fleet.store.drain()
            code = 0 if fleet.admission.in_flight("llm") == 0 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    fleet.store.drain()
    assert fleet.admission.in_flight("llm") == 0
