"""The background-thread helper every renewing part runs on: lazy start, a weakly held
owner, a fresh thread in a forked child, wake and stop, failures logged and survived."""

from __future__ import annotations

import gc
import logging
import os
import threading

import pytest

from celery_fleet.background import BackgroundLoop

JOIN_S = 10.0  # generous: only a hung thread ever waits this long


class Owner:
    """Counts its rounds and says when one ran; pauses ``pause_s`` between them."""

    def __init__(self, pause_s: float | None = 3600.0) -> None:
        self.pause_s = pause_s
        self.rounds = 0
        self.ran = threading.Event()
        self.forked = 0

    def round(self) -> float | None:
        self.rounds += 1
        self.ran.set()
        return self.pause_s

    def after_fork(self) -> None:
        self.forked += 1


def _loop(owner: Owner, first_pause_s: float = 0.0) -> BackgroundLoop[Owner]:
    return BackgroundLoop(owner, Owner.round, "fleet-test-loop", first_pause_s=first_pause_s)


def test_the_thread_starts_on_first_use_only_and_once() -> None:
    owner = Owner()
    loop = _loop(owner)
    assert loop.thread is None
    assert "fleet-test-loop" not in {t.name for t in threading.enumerate()}
    loop.start()
    thread = loop.thread
    assert thread is not None and thread.name == "fleet-test-loop" and thread.daemon
    assert owner.ran.wait(JOIN_S)
    for _ in range(100):
        loop.start()
    assert loop.thread is thread and owner.rounds == 1  # pausing, not started again
    loop.stop(join_s=JOIN_S)
    assert not thread.is_alive()


def test_a_collected_owner_ends_its_thread() -> None:
    owner = Owner(pause_s=0.001)
    loop = _loop(owner)
    loop.start()
    thread = loop.thread
    assert thread is not None and owner.ran.wait(JOIN_S)
    del owner
    gc.collect()
    thread.join(JOIN_S)
    assert not thread.is_alive() and loop.thread is None


def test_wake_ends_the_pause_and_stop_ends_the_loop_for_good() -> None:
    owner = Owner()
    loop = _loop(owner)
    loop.start()
    assert owner.ran.wait(JOIN_S)
    owner.ran.clear()
    loop.wake()  # the hour-long pause ends now
    assert owner.ran.wait(JOIN_S) and owner.rounds == 2
    thread = loop.thread
    assert thread is not None
    loop.stop(join_s=JOIN_S)
    assert not thread.is_alive() and loop.stopped
    loop.start()
    assert loop.thread is None and owner.rounds == 2


def test_a_stop_during_the_first_pause_runs_no_round() -> None:
    owner = Owner()
    loop = _loop(owner, first_pause_s=3600.0)
    loop.start()
    loop.stop(join_s=JOIN_S)
    assert owner.rounds == 0 and loop.thread is None


def test_a_start_while_a_forgotten_thread_leaves_starts_another() -> None:
    """The idle exit: a round forgets its thread and ends; a use that comes while that
    thread is still finishing must start a new one, not count on the leaving one."""
    owner = Owner()
    leaving, go = threading.Event(), threading.Event()
    leavers: list[threading.Thread] = []

    def leave_once(o: Owner) -> float | None:
        if not leaving.is_set():
            leavers.append(threading.current_thread())
            loop.forget()  # (the owner does this under the lock its start() calls take)
            leaving.set()
            go.wait(JOIN_S)  # the leaving thread's last work (the keeper drains here)
            return None
        return o.round()

    loop: BackgroundLoop[Owner] = BackgroundLoop(owner, leave_once, "fleet-test-idle")
    loop.start()
    assert leaving.wait(JOIN_S)
    first = leavers[0]
    assert loop.thread is None
    loop.start()  # a slot taken while the idle thread is on its way out
    second = loop.thread
    assert second is not None and second is not first
    go.set()
    first.join(JOIN_S)
    assert owner.ran.wait(JOIN_S) and owner.rounds == 1  # the new thread took over
    assert loop.thread is second and second.is_alive()
    loop.stop(join_s=JOIN_S)


def test_a_failing_round_is_logged_and_the_loop_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = Owner()
    calls: list[int] = []

    def flaky(o: Owner) -> float | None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("redis said no")
        return o.round()

    loop: BackgroundLoop[Owner] = BackgroundLoop(owner, flaky, "fleet-flaky", retry_s=0.001)
    with caplog.at_level(logging.ERROR, logger="celery_fleet"):
        loop.start()
        assert owner.ran.wait(JOIN_S)  # the round after the failure ran
    loop.stop(join_s=JOIN_S)
    failed = [r for r in caplog.records if "fleet-flaky failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert "redis said no" in caplog.text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_thread() -> None:
    owner = Owner()
    loop: BackgroundLoop[Owner] = BackgroundLoop(
        owner, Owner.round, "fleet-test-fork", after_fork=Owner.after_fork
    )
    loop.start()
    assert owner.ran.wait(JOIN_S)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report three flags, and never return into pytest
        flags = b"???"
        try:
            forgot = loop.thread is None and owner.forked == 1
            owner.ran.clear()
            loop.start()
            started = loop.thread is not None and loop.thread.is_alive()
            flags = bytes([forgot, started, owner.ran.wait(JOIN_S)])
        finally:
            os.write(write_end, flags)
            os._exit(0)
    os.close(write_end)
    try:
        reply = os.read(read_end, 3)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    child_forgot, child_started, child_ran = reply
    assert child_forgot, "the child still saw the parent's thread, or after_fork did not run"
    assert child_started and child_ran, "the child's start() ran no thread of its own"
    assert owner.forked == 0 and loop.thread is not None  # the parent's loop is untouched
    loop.stop(join_s=JOIN_S)
