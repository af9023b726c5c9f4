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


def _holding(fleet: Fleet, limit: str = "llm") -> None:
    """Warm the wire (scripts seen), then make the flusher wait long: only a call of this
    process writes what a release posts."""
    with fleet.slot(limit):
        pass
    fleet.store.drain()
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
    with holder.slot("llm"):
        pass
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


def test_a_process_that_exits_writes_its_held_release_first(
    redis_url: str, namespace: str, rclient: redis.Redis
) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, redis_url, namespace],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    fleet = Fleet(redis_url=redis_url, namespace=namespace, limits={"llm": CAP})
    assert rclient.zcard(fleet.admission.keys("llm").leases) == 0  # released at exit


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


def test_the_flusher_thread_ends_when_idle_and_the_next_post_starts_another(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch, rclient: redis.Redis
) -> None:
    monkeypatch.setattr(combiner_module, "FLUSHER_IDLE_S", 0.05)
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
