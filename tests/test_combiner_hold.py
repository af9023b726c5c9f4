"""A posted release is held for the process's next call and written in its write.

Ordering (a call of any thread, any limit, goes after it), the flusher, exit, fork, and a
dropped or frozen Redis between the post and the write, with real Redis. Tests that kill
connections or freeze Redis run on a private ``redis-server`` (ports 17500-17599).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_fleet import Fleet
from celery_fleet.admission import keeper
from celery_fleet.errors import StoreUnavailable
from celery_fleet.store import combiner as combiner_module
from celery_fleet.store import posting
from celery_fleet.testing.redis_server import RedisServer, find_binary

MakeFleet = Callable[..., Fleet]
CAP = {"max_in_flight": 1, "lease": 30}


def _port() -> int:
    """A free port in this suite's range for private servers (17500-17599)."""
    for port in range(17500, 17600):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 17500-17599")


@pytest.fixture
def private() -> Iterator[RedisServer]:
    try:
        binary = find_binary(install=False)
    except Exception:  # pragma: no cover - the machine has no redis-server
        pytest.skip("no redis-server binary to start a private Redis")
    with RedisServer(port=_port(), binary=binary) as server:
        yield server


def _warm_releases(fleet: Fleet, limit: str = "llm") -> None:
    """Have both release scripts answer on the wire, so that a release is always posted: a
    lease release.lua samples (one in 32) was sent, not posted, while only the lean one
    had answered."""
    fleet.release(fleet.try_acquire(limit))  # release.lua, its reply waited for
    for _ in range(10):
        with fleet.slot(limit):
            pass
        fleet.store.drain()
        if {"release", "release_lean"} <= fleet.store.combiner._loaded:
            return
    raise AssertionError("the lean release never answered")


def _holding(fleet: Fleet, limit: str = "llm") -> None:
    """Warm the wire (scripts seen), then make the flusher wait long: only a call of this
    process writes what a release posts (both release scripts answered on the wire first:
    a script the wire has not seen is sent, not held)."""
    _warm_releases(fleet, limit)
    fleet.store.combiner.flush_s = 60.0


def _release_held(fleet: Fleet, limit: str = "llm") -> None:
    """Take and leave a slot so that its release is held (a background call of the fleet's,
    its presence record or the runtime limits' poll, may carry it: then again)."""
    for _ in range(10):
        with fleet.slot(limit):
            pass
        if fleet.store.combiner._held:
            return
    raise AssertionError("no release stayed held")


def _until(check: Callable[[], object], timeout_s: float = 10.0) -> bool:
    """Poll ``check`` (a bound for a hung test, not a speed assert)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def test_a_call_of_another_thread_and_limit_goes_after_the_held_release(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": CAP, "other": CAP})
    _holding(fleet)
    _release_held(fleet)
    held = fleet.store.combiner._held
    assert len(held) == 1  # not written yet: Redis still holds the lease
    assert rclient.zcard(fleet.admission.keys("llm").leases) == 1
    got: list[Any] = []
    # another thread asks another limit: its write carries the release, ahead of its ask
    worker = threading.Thread(target=lambda: got.append(fleet.try_acquire("other")))
    worker.start()
    worker.join(10)
    assert got and got[0].allowed and not held
    assert rclient.zcard(fleet.admission.keys("llm").leases) == 0
    # and an ask of the released limit from another thread is admitted (cap 1): ordered
    _release_held(fleet)
    worker = threading.Thread(target=lambda: got.append(fleet.try_acquire("llm")))
    worker.start()
    worker.join(10)
    assert got[-1].allowed, got[-1]
    fleet.release(got[0])
    fleet.release(got[-1])


def test_a_released_slot_wakes_a_waiter_of_another_process_without_a_next_call(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher writes a release nobody carries: a waiter elsewhere is woken by it."""
    monkeypatch.setattr(keeper, "POSTED_READ_AFTER_S", 3600.0)  # not the keeper's drain
    holder = make_fleet({"llm": CAP})
    waiter = Fleet(redis_url=holder.store.url, namespace=holder.namespace, limits={"llm": CAP})
    _warm_releases(holder)
    slot = holder.slot("llm").acquire()
    admitted = threading.Event()

    def wait() -> None:
        with waiter.slot("llm", max_wait=30):
            admitted.set()

    thread = threading.Thread(target=wait)
    thread.start()
    assert _until(lambda: waiter.admission.line("llm"))  # it waits in line
    combiner = holder.store.combiner
    writers: list[str] = []
    real = combiner._round_trip

    def round_trip(batch: list[Any], answered: list[Any]) -> Any:
        if any(call.callback is not None for call in batch):
            writers.append(threading.current_thread().name)
        return real(batch, answered)

    combiner._round_trip = round_trip  # type: ignore[method-assign]
    # the holder's own background calls (the runtime limits' poll, the counters' flush and
    # presence) would carry a held release too: stopped, only the flusher is left to
    holder.admission.runtime.stop()
    holder.counters._background.stop()
    slot.release()  # held; the flusher writes it, the waiter is woken
    assert admitted.wait(10)
    thread.join(10)
    assert not combiner._held
    assert writers[:1] == ["fleet-flusher"]  # not a later call of the holder's


_EXIT_SCRIPT = """
import sys
from celery_fleet import Fleet
limits = {"llm": {"max_in_flight": 1, "lease": 30}}
fleet = Fleet(redis_url=sys.argv[1], namespace=sys.argv[2], limits=limits)
with fleet.slot("llm"):
    pass
fleet.store.drain()
fleet.store.combiner.flush_s = 3600.0
for _ in range(10):  # (a background call of the fleet's may carry it: release again)
    with fleet.slot("llm"):
        pass
    if fleet.store.combiner._held:
        break
assert len(fleet.store.combiner._held) == 1
"""


def _leases_after(
    script: str, redis_url: str, namespace: str, rclient: redis.Redis, *argv: str
) -> int:
    """Run ``script`` (source, or a file's path; argv: the Redis URL, the namespace,
    ``argv``) in a process of its own, which must succeed; the leases of limit ``llm``
    left in Redis after it exited."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = [script] if script.endswith(".py") else ["-c", script]
    done = subprocess.run(
        [sys.executable, *run, redis_url, namespace, *argv],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    fleet = Fleet(redis_url=redis_url, namespace=namespace, limits={"llm": CAP})
    return int(rclient.zcard(fleet.admission.keys("llm").leases))


def test_a_process_that_exits_writes_its_held_release_first(
    redis_url: str, namespace: str, rclient: redis.Redis
) -> None:
    assert _leases_after(_EXIT_SCRIPT, redis_url, namespace, rclient) == 0  # released at exit


_MP_CHILD_SCRIPT = """
import multiprocessing, sys
from celery_fleet import Fleet
limits = {"llm": {"max_in_flight": 4, "lease": 30}}

def work(url, namespace, hold):
    fleet = Fleet(redis_url=url, namespace=namespace, limits=limits)
    with fleet.slot("llm"):
        pass
    fleet.store.drain()
    combiner = fleet.store.combiner
    combiner.flush_s = 3600.0  # the flusher never writes: the exit, or the post itself
    if hold:
        combiner.write_now = False  # held as in any other process: the exit writes it
    for _ in range(10):  # (a release is sent, not posted, until its script answered)
        with fleet.slot("llm"):
            pass
        if combiner._held:
            break
    assert combiner._held or not hold
    return 0

if __name__ == "__main__":
    url, namespace, method, how = sys.argv[1:]
    context = multiprocessing.get_context(method)
    if how == "process":  # the target returns, then the child leaves with os._exit
        child = context.Process(target=work, args=(url, namespace, True))
        child.start()
        child.join()
        sys.exit(child.exitcode)
    with context.Pool(2) as pool:  # its end terminates the workers (SIGTERM)
        assert pool.starmap(work, [(url, namespace, False)] * 2) == [0, 0]
"""


@pytest.mark.parametrize(
    ("method", "how"),
    [("fork", "process"), ("forkserver", "process"), ("fork", "pool"), ("spawn", "pool")],
)
def test_a_multiprocessing_child_leaves_no_held_release_behind(
    method: str, how: str, redis_url: str, namespace: str, rclient: redis.Redis, tmp_path: Any
) -> None:
    """A child whose target returns leaves with os._exit (no atexit): multiprocessing's
    exit writes what it holds. A pool's worker is killed by SIGTERM as ``with Pool()``
    ends, maybe within the millisecond a release is held: a child writes it at once."""
    script = tmp_path / "mp_child.py"  # a file: forkserver and spawn import the target
    script.write_text(_MP_CHILD_SCRIPT)
    left = _leases_after(str(script), redis_url, namespace, rclient, method, how)
    assert left == 0  # nothing left to expire


_EXIT_WHILE_FLUSHING_SCRIPT = """
import sys, threading, time
from celery_fleet import Fleet
limits = {"llm": {"max_in_flight": 1, "lease": 30}}
fleet = Fleet(redis_url=sys.argv[1], namespace=sys.argv[2], limits=limits)
with fleet.slot("llm"):
    pass
fleet.store.drain()
combiner = fleet.store.combiner
real = combiner._round_trip
taken = threading.Event()

def slow_round_trip(batch, answered):
    if any(call.callback is not None for call in batch):  # the flusher's (or a carrier's)
        taken.set()  # the release is off _held, not written yet
        time.sleep(0.3)
    return real(batch, answered)

combiner._round_trip = slow_round_trip
for _ in range(10):  # (a release is sent, not held, until its script answered on the wire)
    with fleet.slot("llm"):
        pass
    if taken.wait(1):
        break
assert taken.is_set()
"""


def test_a_process_that_exits_while_the_flusher_writes_waits_for_it(
    redis_url: str, namespace: str, rclient: redis.Redis
) -> None:
    """At exit the flusher may have taken the release and not written it yet (nothing held,
    nothing unread): the exit waits for the wire instead of leaving it to die unwritten."""
    assert _leases_after(_EXIT_WHILE_FLUSHING_SCRIPT, redis_url, namespace, rclient) == 0


def test_a_forked_child_never_writes_its_parents_held_release(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": CAP})
    _holding(fleet)
    _release_held(fleet)
    leases = fleet.admission.keys("llm").leases
    assert rclient.zcard(leases) == 1
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a threaded parent (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: a call of its own, then what exiting runs
        code = 1
        try:
            os.close(read)
            seen = fleet.admission.in_flight("llm")  # the child's own wire
            combiner_module.flush_all()
            fleet.store.drain()
            os.write(write, str(seen).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _pid, status = os.waitpid(pid, 0)
    seen = os.read(read, 100)
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    assert seen == b"1"  # the child saw the lease held: it did not write the release...
    assert rclient.zcard(leases) == 1  # ...nor at its exit
    assert len(fleet.store.combiner._held) == 1  # the parent's, still its to write
    fleet.store.drain()
    assert rclient.zcard(leases) == 0


def test_a_connection_dropped_before_the_write_owes_the_release(private: RedisServer) -> None:
    fleet = Fleet(redis_url=private.url + "/0", namespace="drop", limits={"llm": CAP})
    _holding(fleet)
    admin = redis.Redis.from_url(private.url)
    slot = fleet.slot("llm").acquire()
    lease = slot.lease_id
    slot.release()  # held
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    try:
        fleet.admission.in_flight("llm")  # its write carries the release to a dead socket
    except StoreUnavailable:
        pass
    owed = [(o.kind, o.key) for o in fleet.admission.replays.take()]
    if owed:  # the write met the closed socket: owed, as a release whose write failed
        assert owed == [("release", lease)]
        assert fleet.admission.release("llm", lease).released  # what replay sends
    # or the close was seen before writing (a fresh connection took it): applied
    assert fleet.admission.in_flight("llm") == 0
    admin.close()


def test_a_frozen_redis_before_the_write_owes_the_release(private: RedisServer) -> None:
    fleet = Fleet(redis_url=private.url + "/0", namespace="frozen", limits={"llm": CAP})
    fleet.store.health_s = 0.3  # fleet_redis_health_timeout
    _holding(fleet)
    slot = fleet.slot("llm").acquire()
    lease = slot.lease_id
    slot.release()  # held
    assert private.proc is not None
    os.kill(private.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable):
            fleet.admission.in_flight("llm")  # written, never answered
        owed = [(o.kind, o.key) for o in fleet.admission.replays.take()]
        assert ("release", lease) in owed  # owed: sent again when Redis answers
    finally:
        os.kill(private.proc.pid, signal.SIGCONT)
    fleet.admission.release("llm", lease)  # what replay sends (it may have run at the thaw)
    assert fleet.admission.in_flight("llm") == 0


def test_a_release_read_ahead_of_a_call_keeps_to_the_callers_deadline(
    private: RedisServer,
) -> None:
    """The held release rides with the next call and its reply comes first: on a frozen
    Redis the caller stops at its own deadline (max_wait), not at the release's, which
    nobody waits for (taken when posted: the health deadline)."""
    fleet = Fleet(redis_url=private.url + "/0", namespace="frozen-dl", limits={"llm": CAP})
    fleet.store.health_s = 3.0  # fleet_redis_health_timeout, far from the caller's 0.3 s
    _holding(fleet)
    _release_held(fleet)
    assert private.proc is not None
    os.kill(private.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable), fleet.store.deadline(0.3):
            fleet.admission.in_flight("llm")  # written with the release, never answered
        took = time.monotonic() - started
    finally:
        os.kill(private.proc.pid, signal.SIGCONT)
    assert took < 0.3 + 0.9, took  # generous (a loaded box): not the 3 s health deadline
    assert "release" in [o.kind for o in fleet.admission.replays.take()]  # owed


def test_the_flusher_thread_ends_when_idle_and_the_next_post_starts_another(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch, rclient: redis.Redis
) -> None:
    monkeypatch.setattr(posting, "FLUSHER_IDLE_S", 0.05)
    fleet = make_fleet({"llm": CAP})
    combiner = fleet.store.combiner
    leases = fleet.admission.keys("llm").leases
    for _ in range(2):  # (the first release is sent: its script not yet seen)
        with fleet.slot("llm"):
            pass
        first = combiner._flusher
        assert _until(lambda: combiner._flusher is None)  # idle: the thread ended
        if first is not None:
            first.join(5)
            assert not first.is_alive()
    with fleet.slot("llm"):
        pass  # a post starts a flusher again, which writes it
    assert _until(lambda: rclient.zcard(leases) == 0)


def test_posts_nobody_carries_are_written_at_once_until_a_call_follows_one_again(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    """One thread's slots milliseconds apart (a prefork child's tasks): holding a release
    pays only when a call follows within flush_s. After WRITE_AT_ONCE_AFTER releases the
    flusher had to write, the next is written by its poster as it posts (not held, its
    reply unread); a call soon after a post makes the next one held again."""
    fleet = make_fleet({"llm": CAP})
    _warm_releases(fleet)
    combiner = fleet.store.combiner
    combiner.flush_s = 0.05
    leases = fleet.admission.keys("llm").leases

    def leave_a_slot() -> bool:
        """True when the release was written as it was posted."""
        with fleet.slot("llm"):
            pass
        written = not combiner._held and bool(combiner._unread)
        assert _until(lambda: rclient.zcard(leases) == 0)
        return written

    # Background calls of the fleet (its runtime limits' poll) may come within flush_s of
    # a post now and then, which rightly starts the count again: bounded retries.
    for _ in range(20):
        time.sleep(0.1)  # nothing follows the last release within flush_s
        if leave_a_slot():
            break
    else:
        raise AssertionError("no release was written at once: each waited for the flusher")
    assert combiner._unpaid >= posting.WRITE_AT_ONCE_AFTER
    for _ in range(10):
        with fleet.slot("llm"):
            pass
        held = bool(combiner._held)  # right after a call that followed a post: held again
        if held:
            break
    assert held, "releases stayed written at once though each slot followed the last"
    assert combiner._unpaid == 0


def test_a_poster_never_opens_the_wire_itself_the_flusher_does(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    """Writing at once is for an open wire: a connection to open (maybe to a frozen Redis,
    its handshake waiting up to the health deadline) is the flusher's, not the thread
    leaving its slot. The release is held, then written by the flusher."""
    fleet = make_fleet({"llm": CAP})
    _warm_releases(fleet)
    combiner = fleet.store.combiner
    combiner.flush_s = 0.05
    leases = fleet.admission.keys("llm").leases
    combiner._unpaid = posting.WRITE_AT_ONCE_AFTER  # as after two releases nobody carried
    combiner._posted_at = -1e9
    with fleet.slot("llm"):
        combiner._conn.disconnect()  # dropped while the slot is held
    assert combiner._held, "the caller leaving its slot opened the wire to write its release"
    assert _until(lambda: rclient.zcard(leases) == 0)  # the flusher opened it and wrote it
    assert not combiner._held


def test_a_poster_never_opens_a_wire_the_server_closed_even_if_it_looked_open(
    private: RedisServer,
) -> None:
    """The wire looks open (its socket object is there) but the server closed it (CLIENT
    KILL here; a restart, or its idle timeout), and Redis is frozen: the thread leaving
    its slot finds it closed on the wire and leaves the release held for the flusher,
    instead of opening a connection whose handshake waits up to the health deadline. The
    release is written once Redis thaws: nothing owed, the lease released."""
    fleet = Fleet(redis_url=private.url + "/0", namespace="kill-freeze", limits={"llm": CAP})
    fleet.store.health_s = 3.0  # fleet_redis_health_timeout: what the handshake would wait
    _warm_releases(fleet)
    combiner = fleet.store.combiner
    leases = fleet.admission.keys("llm").leases
    admin = redis.Redis.from_url(private.url)
    assert private.proc is not None
    slot = fleet.slot("llm").acquire()
    combiner._unpaid = posting.WRITE_AT_ONCE_AFTER  # as after two releases nobody carried
    combiner._posted_at = -1e9
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert _until(lambda: combiner._stale(combiner._conn))  # the close has arrived
    assert combiner._wire_open()  # to the poster's first look, open
    os.kill(private.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        slot.release()
        took = time.monotonic() - started
    finally:
        os.kill(private.proc.pid, signal.SIGCONT)
    assert took < 1.0, f"leaving the slot opened the wire itself ({took:.2f} s)"
    assert _until(lambda: admin.zcard(leases) == 0)  # the flusher opened it and wrote it
    fleet.store.drain()
    assert not fleet.admission.replays  # written once, after the thaw: nothing owed
    assert not slot.lost
    admin.close()


def test_a_release_redis_lost_its_script_for_is_owed_when_the_wire_then_drops(
    private: RedisServer,
) -> None:
    """A written release meets NOSCRIPT (SCRIPT FLUSH; a failover to a server without the
    scripts), and the connection drops before the round trip that read that reply could
    load the script and send it again: the release never ran, so it is owed (sent again
    when Redis answers), not handed NOSCRIPT as its answer ("its lease will expire",
    the slot taken until its lease's TTL)."""
    fleet = Fleet(redis_url=private.url + "/0", namespace="noscript-drop", limits={"llm": CAP})
    _warm_releases(fleet)
    combiner = fleet.store.combiner
    leases = fleet.admission.keys("llm").leases
    admin = redis.Redis.from_url(private.url)
    slot = fleet.slot("llm").acquire()
    lease = slot.lease_id
    combiner._unpaid = posting.WRITE_AT_ONCE_AFTER  # as after two releases nobody carried
    combiner._posted_at = -1e9
    admin.script_flush()
    slot.release()  # written at once, its reply (NOSCRIPT) unread
    assert combiner._unread and not combiner._held
    assert _until(lambda: combiner._stale(combiner._conn))  # the NOSCRIPT reply is there
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    time.sleep(0.05)  # the close arrives: the next round trip reads NOSCRIPT, then the drop
    try:
        fleet.admission.in_flight("llm")
    except StoreUnavailable:
        pass
    owed = [(o.kind, o.key) for o in fleet.admission.replays.take()]
    assert ("release", lease) in owed or admin.zcard(leases) == 0, (owed, admin.zcard(leases))
    fleet.admission.release("llm", lease)  # what replay sends
    assert fleet.admission.in_flight("llm") == 0
    admin.close()
