"""Durable steps and runs: a step's function runs once per run id; a run's patience."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, TypedDict

import pytest
import redis

from celery_fleet import ConfigError, Fleet, Run, StepError
from celery_fleet.durability.steps import json_type

MakeFleet = Callable[..., Fleet]


class Counter:
    def __init__(self, result: Any = None) -> None:
        self.calls = 0
        self.result = result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.result if self.result is not None else {"args": list(args), **kwargs}


def test_a_step_runs_once_per_run_id_and_replays_its_result(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"rpm": 60}})
    fn = Counter()
    first = fleet.steps("task-1").run("plan", fn, 1, 2, mode="x")
    again = fleet.steps("task-1").run("plan", fn, 9, 9)  # a re-run: stored, not called
    assert first == again == {"args": [1, 2], "mode": "x"}  # the tuple came back a list
    assert fn.calls == 1
    assert fleet.steps("task-2").run("plan", fn, 3) == {"args": [3]}  # another run
    assert fn.calls == 2
    assert fleet.steps("task-1").done() == ["plan"]


def test_steps_expire_and_can_be_forgotten(
    make_fleet: MakeFleet, rclient: redis.Redis, redis_url: str, namespace: str
) -> None:
    fleet = Fleet(redis_url=redis_url, namespace=namespace, limits={"m": {"rpm": 60}})
    steps = fleet.steps("t")
    steps.run("a", lambda: 1)
    assert 0 < rclient.pttl(steps.key) <= 7 * 86_400_000
    steps.forget()
    assert steps.get("a") == (False, None)


def test_first_stored_result_wins(make_fleet: MakeFleet) -> None:
    """Two copies of a run raced: the one that stores second returns the first's answer."""
    fleet = make_fleet({"m": {"rpm": 60}})
    steps = fleet.steps("t")

    def racing() -> str:
        fleet.store.call("HSET", steps.key, "s", '"theirs"')  # the other copy, meanwhile
        return "mine"

    assert steps.run("s", racing) == "theirs"


def test_unstorable_results_are_refused_before_the_call_when_annotated(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"m": {"rpm": 60}})
    calls = []

    def returns_bytes() -> bytes:
        calls.append(1)
        return b"x"

    with pytest.raises(StepError, match="annotated to return"):
        fleet.steps("t").run("s", returns_bytes)
    assert calls == []


def test_unstorable_results_fail_clearly_and_store_nothing(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"rpm": 60}})
    steps = fleet.steps("t")
    with pytest.raises(StepError, match="not JSON-serialisable"):
        steps.run("obj", lambda: object())
    with pytest.raises(StepError, match="not JSON-serialisable"):
        steps.run("nan", lambda: math.nan)
    assert steps.done() == []
    small = Fleet(
        redis_url=fleet.redis_url,
        namespace=fleet.namespace,
        limits={"m": {"rpm": 60}},
    )
    small.step_max_bytes = 10
    with pytest.raises(StepError, match="more than fleet_step_max_bytes"):
        small.steps("t").run("big", lambda: "x" * 100)
    assert small.steps("t").done() == []


@pytest.mark.parametrize("name", ["", None, "x" * 201, 3])
def test_bad_step_names_are_refused(make_fleet: MakeFleet, name: Any) -> None:
    fleet = make_fleet({"m": {"rpm": 60}})
    with pytest.raises(StepError, match="step name"):
        fleet.steps("t").run(name, lambda: 1)
    with pytest.raises(StepError, match="not callable"):
        fleet.steps("t").run("s", 42)  # type: ignore[arg-type]
    with pytest.raises(StepError, match="run id"):
        fleet.steps("")


class Usage(TypedDict):
    text: str
    tokens: int


class Response:  # an SDK object: not JSON
    pass


@pytest.mark.parametrize(
    ("annotation", "ok"),
    [
        (dict[str, Any], True),
        (list[int] | None, True),
        (Usage, True),
        (Literal["a", 1], True),
        (tuple[str, ...], True),
        (Any, True),
        (bytes, False),
        (Response, False),
        (dict[int, str], False),
        (list[Response], False),
        (set[str], False),
    ],
)
def test_json_type(annotation: Any, ok: bool) -> None:
    assert json_type(annotation) is ok


def test_step_settings_are_validated(redis_url: str) -> None:
    from celery import Celery

    app = Celery("steps-conf", broker=redis_url)
    app.conf.fleet_limits = {"m": {"rpm": 60}}
    app.conf.fleet_step_ttl = 0
    with pytest.raises(ConfigError, match="fleet_step_ttl"):
        Fleet(app)
    app.conf.fleet_step_ttl = 60
    app.conf.fleet_step_max_bytes = "big"
    with pytest.raises(ConfigError, match="fleet_step_max_bytes"):
        Fleet(app)


def test_a_run_waits_in_place_after_its_first_call() -> None:
    run = Run(max_wait_s=3.0, wait_after_call=True)
    assert run.slot_max_wait(now=0.0) == 3.0
    run.calls = 1
    assert run.slot_max_wait(now=0.0) == math.inf
    run.deadline = 100.0
    assert run.slot_max_wait(now=40.0) == 60.0
    assert run.slot_max_wait(now=140.0) == 0.0
    run.wait_after_call = False
    assert run.slot_max_wait(now=99.0) == 1.0  # max_wait, cut to the deadline
    assert Run().slot_max_wait(now=0.0) is None  # the fleet's own default


def test_slots_of_a_run_share_its_age_and_count_its_calls(make_fleet: MakeFleet) -> None:
    from celery_fleet import running

    fleet = make_fleet({"m": {"max_in_flight": 1}})
    with running(Run(wait_after_call=True)) as run:
        with fleet.slot("m") as first:
            pass
        with fleet.slot("m") as second:
            pass
    assert run.calls == 2
    assert run.since_ms == int(first.decision.at_ms)  # type: ignore[union-attr]
    assert second.run is run


@pytest.mark.parametrize(
    "header",
    [
        {"since_ms": 10**15, "reschedules": -3, "throttled_s": float("nan"), "wait_ms": 10**400},
        {"since_ms": "soon", "reschedules": float("inf"), "throttled_s": -1, "wait_ms": [1]},
        {"since_ms": -5, "reschedules": None, "throttled_s": 1e300, "limit": "x" * 10_000},
        "not a dict",
    ],
)
def test_an_absurd_fleet_header_reads_as_a_first_run(header: Any) -> None:
    """A hand-written or foreign header must never fail the task (since_ms >= 2**42 used to
    reach the admission check as a ConfigError, 10**400 an OverflowError)."""
    from celery_fleet import Throttling

    t = Throttling.from_header(header)
    assert (t.since_ms, t.reschedules, t.throttled_s, t.wait_ms) == (0, 0, 0.0, 0)
    assert len(t.limit) <= 100
    assert Throttling.from_header({"since_ms": 1_700_000_000_000, "reschedules": 2}) == Throttling(
        since_ms=1_700_000_000_000, reschedules=2
    )
