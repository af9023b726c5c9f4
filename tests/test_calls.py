"""The sans-IO call protocol, driven with scripted replies: no Redis, no worker.

Every admission operation is a generator of Redis calls (:mod:`celery_fleet.store.calls`).
Here the replies are written by hand, so what an operation asks for, in which order and
in how many round trips, and what it makes of each reply or error, is checked without a
server: the hot path's single round trip, the resend after a dropped connection, the
replay of an ask an outage left unanswered, the store-down policy's retry interval.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from celery_fleet.admission.config import parse_limits
from celery_fleet.admission.core import Admission
from celery_fleet.admission.decision import MAX_WAIT_MS, Decision, Release
from celery_fleet.errors import FleetError, LeaseLost, StoreUnavailable
from celery_fleet.resilience.fallback import RETRY_S, StoreDown, is_local_lease
from celery_fleet.store.calls import PackedCalls, ScriptCall, Steps, adrive, drive
from celery_fleet.store.sync import RedisStore

pytestmark = pytest.mark.fast

URL = "redis://127.0.0.1:1/0"  # never connected to: every reply below is scripted
LEASE = "a1b2c3d4" + "0" * 16
NOW_MS = 1_700_000_000_000


def dropped() -> StoreUnavailable:
    return StoreUnavailable(URL, "Connection reset by peer", dropped=True)


def timed_out() -> StoreUnavailable:
    return StoreUnavailable(URL, "Timeout reading from socket")


class ScriptedStore:
    """A blocking store whose replies are given in advance, in order (one per script call,
    packed ones included); a reply that is an exception is raised instead. Records every
    call it gets."""

    def __init__(self, *replies: Any) -> None:
        self.replies = list(replies)
        self.calls: list[ScriptCall | PackedCalls] = []

    def _next(self) -> Any:
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        self.calls.append(ScriptCall(script, keys, args))
        return self._next()

    def send(self, *commands: tuple[str, bytes]) -> list[Any]:
        self.calls.append(PackedCalls(commands))
        return [self._next() for _command in commands]  # one reply per command


class AsyncScriptedStore(ScriptedStore):
    """The same, awaited (the shape :func:`adrive` needs)."""

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:  # type: ignore[override]
        await asyncio.sleep(0)
        return ScriptedStore.run(self, script, keys, args)

    async def send(self, *commands: tuple[str, bytes]) -> list[Any]:  # type: ignore[override]
        await asyncio.sleep(0)
        return ScriptedStore.send(self, *commands)


def scripts(calls: list[ScriptCall | PackedCalls]) -> list[str]:
    """The script names of calls, packed ones one per command."""
    out: list[str] = []
    for call in calls:
        if isinstance(call, PackedCalls):
            out += [script for script, _packed in call.commands]
        else:
            out.append(call.script)
    return out


def admitted(lease: str = LEASE, in_flight: int = 1, probe: int = 0) -> list[Any]:
    """An acquire reply that admits: allowed, wait, lease, in flight, now, probe, ahead, line."""
    return [1, 0, lease.encode(), in_flight, NOW_MS, probe, 0, 0]


def refused(wait_ms: Any, field: bytes, ahead: int = 0, line: int = 0) -> list[Any]:
    return [0, wait_ms, field, 4, NOW_MS, 0, ahead, line]


@pytest.fixture
def admission() -> Admission:
    limits = parse_limits({"llm": {"rpm": 600, "tpm": 60_000, "max_in_flight": 4}})
    return Admission(RedisStore(URL), limits, namespace="calls")


def ask(admission: Admission, tokens: int = 10, join: bool = False) -> Steps[Decision]:
    return admission.acquire_steps(admission.limit("llm"), tokens, LEASE, 0, join)


# -- drive / adrive ------------------------------------------------------------------------


def _two_calls() -> Steps[tuple[Any, Any]]:
    first = yield ScriptCall("leave", ["k"], ["t"])
    (second,) = yield PackedCalls((("release", b"packed"),))
    return first, second


def test_drive_runs_script_calls_and_sends_packed_ones_in_order() -> None:
    store = ScriptedStore(1, b"ok")
    assert drive(_two_calls(), store) == (1, b"ok")
    assert store.calls == [
        ScriptCall("leave", ["k"], ["t"]),
        PackedCalls((("release", b"packed"),)),
    ]


def test_drive_throws_the_store_error_in_at_the_yield_and_the_operation_decides() -> None:
    def tolerant() -> Steps[str]:
        try:
            yield ScriptCall("renew", [], [])
        except StoreUnavailable:
            return "handled"
        return "answered"

    assert drive(tolerant(), ScriptedStore(timed_out())) == "handled"
    with pytest.raises(StoreUnavailable):
        drive(_two_calls(), ScriptedStore(timed_out()))


def test_adrive_asks_the_same_calls_and_reaches_the_same_decision_as_drive() -> None:
    replies = (dropped(), admitted())
    sync_store, async_store = ScriptedStore(*replies), AsyncScriptedStore(*replies)
    a = Admission(RedisStore(URL), parse_limits({"llm": {"rpm": 600}}), namespace="calls")
    blocking = drive(ask(a), sync_store)
    awaited = asyncio.run(adrive(ask(a), async_store))
    assert blocking == awaited and blocking.allowed
    assert sync_store.calls == async_store.calls


# -- acquire -------------------------------------------------------------------------------


def test_an_ask_is_one_round_trip_of_one_acquire(admission: Admission) -> None:
    store = ScriptedStore(admitted(in_flight=3))
    decision = drive(ask(admission), store)
    assert store.calls == [PackedCalls((admission.acquire_command("llm", 10, LEASE),))]
    assert decision == Decision("llm", True, 0, LEASE, "", 3, 10, NOW_MS / 1000, False, 0, 0)


def test_a_refusal_names_its_window_and_its_wait_is_clamped(admission: Admission) -> None:
    far = drive(ask(admission), ScriptedStore(refused(10**30, b"t:60", ahead=2, line=5)))
    assert not far and far.lease_id is None
    assert (far.wait_ms, far.reason, far.ahead, far.line) == (MAX_WAIT_MS, "tokens/60s", 2, 5)
    past = drive(ask(admission), ScriptedStore(refused(-5, b"in_flight")))
    assert (past.wait_ms, past.reason) == (0, "in_flight")
    garbage = drive(ask(admission), ScriptedStore(refused(b"nan?", b"r:60")))
    assert (garbage.wait_ms, garbage.reason) == (MAX_WAIT_MS, "requests/60s")


def test_an_ask_dropped_in_flight_is_resent_once_marked_as_a_retry(admission: Admission) -> None:
    """The first send may have admitted before the connection dropped: the resend says so,
    and the script answers with that lease instead of charging again."""
    store = ScriptedStore(dropped(), admitted())
    assert drive(ask(admission, join=True), store).allowed
    first, again = (call.commands for call in store.calls)  # type: ignore[union-attr]
    assert first == (admission.acquire_command("llm", 10, LEASE, 0, True),)
    assert again == (admission.acquire_command("llm", 10, LEASE, 0, True, retry=True),)
    assert first != again
    assert len(admission.replays) == 0


def test_an_unanswered_ask_is_raised_and_owed_then_looked_up_first(
    admission: Admission,
) -> None:
    """An ask a frozen Redis may still run is remembered; the next ask first looks it up and
    gives back the lease it made, in the same operation, before asking for itself."""
    with pytest.raises(StoreUnavailable):
        drive(ask(admission), ScriptedStore(timed_out()))
    assert len(admission.replays) == 1

    ghost = "a1b2c3d4" + "f" * 16
    store = ScriptedStore(admitted(ghost), [1, NOW_MS, 5, b"", 0], admitted())
    assert drive(ask(admission), store).allowed
    assert store.calls == [
        PackedCalls((admission.lookup_command("llm", LEASE),)),
        PackedCalls((admission.release_command("llm", ghost),)),
        PackedCalls((admission.acquire_command("llm", 10, LEASE),)),
    ]
    assert len(admission.replays) == 0


def test_a_dropped_resend_that_fails_again_is_raised_and_owed(admission: Admission) -> None:
    with pytest.raises(StoreUnavailable):
        drive(ask(admission), ScriptedStore(dropped(), timed_out()))
    assert len(admission.replays) == 1


def test_a_non_outage_error_is_raised_and_not_owed(admission: Admission) -> None:
    with pytest.raises(FleetError) as info:
        drive(ask(admission), ScriptedStore(FleetError("ERR wrong number of arguments")))
    assert not isinstance(info.value, StoreUnavailable)
    assert len(admission.replays) == 0


def test_a_half_open_probe_tells_the_breaker_listeners(admission: Admission) -> None:
    heard: list[tuple[str, str]] = []
    admission.listeners.append(lambda limit, state: heard.append((limit, state)))
    assert drive(ask(admission), ScriptedStore(admitted(probe=1))).probe
    assert heard == [("llm", "half_open")]


# -- the store-down policy -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def with_policy(policy: str, clock: Callable[[], float]) -> Admission:
    limits = parse_limits({"llm": {"rpm": 600, "max_in_flight": 4}})
    down = StoreDown(policy, limits, share=lambda: 4, clock=clock)
    return Admission(RedisStore(URL), limits, namespace="calls", store_down=down)


def test_during_an_outage_asks_are_answered_by_the_policy_without_a_call() -> None:
    clock = Clock()
    admission = with_policy("open", clock)
    first = drive(ask(admission), ScriptedStore(timed_out()))
    assert first.allowed and first.lease_id == f"open.{LEASE}"
    store = ScriptedStore()  # any call would fail: it has no reply
    clock.now += RETRY_S / 2
    assert drive(ask(admission), store).allowed
    assert store.calls == []
    # a lease the policy gave is given back without Redis
    assert drive(admission.release_steps("llm", f"open.{LEASE}"), store).released
    assert store.calls == []


def test_closed_refuses_as_backpressure_during_an_outage() -> None:
    admission = with_policy("closed", Clock())
    decision = drive(ask(admission), ScriptedStore(timed_out()))
    assert not decision and decision.reason == "store_down" and decision.wait_ms > 0


def test_after_the_retry_interval_one_ask_looks_for_the_hand_over_then_asks_redis() -> None:
    clock = Clock()
    admission = with_policy("open", clock)
    drive(ask(admission), ScriptedStore(timed_out()))
    admission.replays.take()  # the timed-out ask's look-up is tested above
    clock.now += RETRY_S
    store = ScriptedStore([NOW_MS, NOW_MS], admitted())  # the moment is now: switch at once
    decision = drive(ask(admission), store)
    assert decision.allowed and decision.lease_id == LEASE
    assert scripts(store.calls) == ["handover", "acquire"]
    assert not admission.store_down.down  # type: ignore[union-attr]


# -- release, settle, renew, leave ---------------------------------------------------------


def test_a_release_is_one_round_trip_and_reports_the_breaker_transition(
    admission: Admission,
) -> None:
    heard: list[str] = []
    admission.listeners.append(lambda _limit, state: heard.append(state))
    store = ScriptedStore([1, NOW_MS, 250, b"open", 3.0])
    release = drive(admission.release_steps("llm", LEASE, "overload"), store)
    assert release == Release(True, 250, NOW_MS / 1000, "open", 3.0)
    command = admission.release_command("llm", LEASE, "overload", clock=True)
    assert store.calls == [PackedCalls((command,))]
    assert heard == ["open"]


def test_a_settle_charges_and_raises_lease_lost_when_the_lease_must_be_held(
    admission: Admission,
) -> None:
    store = ScriptedStore([1, 120, NOW_MS, 1])
    assert drive(admission.settle_steps("llm", LEASE, 130, 10), store) == 120
    (call,) = store.calls
    assert isinstance(call, ScriptCall) and call.script == "settle"
    assert call.args[:3] == [LEASE, 130, 10]
    with pytest.raises(LeaseLost):
        steps = admission.settle_steps("llm", LEASE, 130, 10, must_hold=True)
        drive(steps, ScriptedStore([0, 120, NOW_MS, 0]))


def test_renew_splits_lost_from_restored_and_never_sends_local_leases(
    admission: Admission, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Leases the store-down strategy handed out (the local limiter's) stay in this process.
    monkeypatch.setattr(admission.store_down, "owns", is_local_lease)
    store = ScriptedStore([b"gone1", b"+", b"back1"])
    leases = [("gone1", 0), ("back1", 5), ("local.x", 0)]
    assert drive(admission.renew_steps("llm", leases), store) == (["gone1"], ["back1"])
    (call,) = store.calls
    assert isinstance(call, ScriptCall) and "local.x" not in call.args
    only_local = ScriptedStore()
    assert drive(admission.renew_steps("llm", [("local.x", 0)]), only_local) == ([], [])
    assert only_local.calls == []


def test_leave_is_one_script_call(admission: Admission) -> None:
    store = ScriptedStore(1)
    assert drive(admission.leave_steps("llm", LEASE), store) is True
    assert store.calls == [admission.leave_call("llm", LEASE)]
