"""Regression tests for failure paths: serialization, Redis loss, stalls, misuse."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import pytest
from celery import Celery

from celery_fleet import (
    CircuitOpen,
    ConfigError,
    Fleet,
    FleetError,
    FleetTask,
    QuotaExhausted,
    StoreUnavailable,
    Throttled,
    fleet_task,
)
from celery_fleet.admission.config import parse_limit
from celery_fleet.celery.loops import run_async

MakeFleet = Callable[..., Fleet]


@pytest.mark.parametrize(
    "exc",
    [
        Throttled("llm", 1500, "tokens/60s"),
        CircuitOpen("llm", 900, "circuit_open"),
        QuotaExhausted("llm", "insufficient_quota"),
        StoreUnavailable("redis://h:1/0", "refused"),
    ],
)
def test_fleet_errors_survive_the_json_result_backend(exc: Exception) -> None:
    app = Celery("ser", backend="cache+memory://", set_as_current=False)
    app.conf.result_serializer = "json"
    back = app.backend.exception_to_python(app.backend.prepare_exception(exc, "json"))
    assert type(back) is type(exc)
    fields = ("limit", "wait_ms", "reason", "detail", "url")
    assert {f: getattr(back, f, None) for f in fields} == {f: getattr(exc, f, None) for f in fields}
    assert str(back) == str(exc)


def test_settle_after_release_does_not_refund_twice(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"tpm": 6000, "burst": 1000 / 6000}})
    d = fleet.try_acquire("llm", tokens=1000)
    assert fleet.settle(d, 100) == -900
    fleet.release(d)
    assert [fleet.settle(d, 100) for _ in range(3)] == [0, 0, 0]
    assert fleet.try_acquire("llm", tokens=900)
    assert not fleet.try_acquire("llm", tokens=50)


def test_a_failed_release_does_not_replace_the_body_outcome(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = make_fleet({"llm": {"max_in_flight": 2}})

    def redis_gone(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("redis://gone", "connection reset")

    def reply_lost(command: object, callback: Callable[[object], None]) -> bool:
        callback(StoreUnavailable("redis://gone", "connection reset"))  # the posted reply
        return True

    def answer() -> str:
        with fleet.slot("llm"):
            monkeypatch.setattr(fleet.admission, "release_of", redis_gone)
            return "paid-for model answer"

    assert answer() == "paid-for model answer"  # the release error did not replace it
    assert "will expire" in caplog.text
    monkeypatch.undo()
    caplog.clear()
    with pytest.raises(KeyError):
        with fleet.slot("llm"):
            monkeypatch.setattr(fleet.store, "post", reply_lost)
            raise KeyError("the body's own error")
    assert "will expire" in caplog.text


def test_a_stalled_lease_is_marked_lost_by_the_fleet_clock(make_fleet: MakeFleet) -> None:
    class Jumpy:
        now = 0.0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    clock = Jumpy()
    fleet = make_fleet({"tool": {"max_in_flight": 1, "lease": 1}}, clock=clock)
    with fleet.slot("tool") as slot:
        time.sleep(0.5)  # the keeper ticks; on the fleet's clock no time has passed
        assert not slot.lost
        clock.now += 5.0  # as if the process (or Redis) froze for 5 s
        deadline = time.monotonic() + 3
        while not slot.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slot.lost


def test_eager_retry_with_backpressure_is_not_counted(redis_url: str, namespace: str) -> None:
    app = Celery("eager", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(
        fleet_redis_url=redis_url, fleet_namespace=namespace, fleet_limits={"llm": {"rpm": 60}}
    )
    fleet = Fleet(app)
    fleet.clock.sleep = lambda s: None  # type: ignore[method-assign]
    seen: list[int] = []

    @fleet_task(app=app, shared=False, bind=True, max_retries=0, name="eager-retry")
    def agent(self: FleetTask) -> str:
        seen.append(self.request.retries)
        if len(seen) == 1:
            raise self.retry(exc=Throttled("llm", 10))
        return "done"

    assert agent.apply().get() == "done"
    assert seen == [0, 0]


def test_attribute_spellings_of_fleet_options_are_rejected() -> None:
    with pytest.raises(ConfigError, match="fleet_on_limit"):
        fleet_task(fleet_on_limit="retry")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"redis_url": "redis://127.0.0.1:notaport/13"}, "invalid Redis URL"),
        ({"limits": {"llm": {"rpm": 10, "lease": math.inf}}}, "'lease'] must be"),
    ],
)
def test_bad_urls_and_numbers_fail_at_fleet_creation(kwargs: dict, needle: str) -> None:
    kwargs.setdefault("redis_url", "redis://127.0.0.1:6379/9")
    kwargs.setdefault("limits", {"llm": {"rpm": 10}})
    with pytest.raises(ConfigError, match=needle):
        Fleet(**kwargs)


def test_a_limit_config_object_takes_its_key_as_name(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"a": parse_limit("b", {"rpm": 10}, "x")})
    assert fleet.try_acquire("a")


def test_listener_errors_are_logged_not_raised(
    make_fleet: MakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = make_fleet(
        {"llm": {"max_in_flight": 5, "breaker": {"min_calls": 1, "reset_timeout": 5}}}
    )
    fleet.on_breaker_change(lambda limit, state: 1 / 0)
    with caplog.at_level(logging.ERROR), pytest.raises(TimeoutError):
        with fleet.slot("llm"):
            raise TimeoutError("provider timed out")
    assert fleet.breaker("llm").state().state == "open"
    assert "breaker listener" in caplog.text


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda f: f.release(object()), "needs the Decision fleet.try_acquire"),
        (lambda f: f.release(None), "needs the Decision fleet.try_acquire"),
        (lambda f: f.settle("lease-id", 10), "needs the Decision fleet.try_acquire"),
        (lambda f: f.reschedule_countdown(10**400, 1), "wait_s=...\\) must be >= 0.0 \\(finite"),
        (lambda f: f.reschedule_countdown(math.nan, 1), "wait_s=...\\) must be >= 0.0 \\(finite"),
        (lambda f: f.reschedule_countdown(-1, 1), "wait_s=...\\) must be >= 0.0"),
        (lambda f: f.reschedule_countdown(1, -1), "reschedules=...\\) must be an int >= 0"),
        (lambda f: f.reschedule_countdown(1, "2"), "reschedules=...\\) must be an int >= 0"),
        (lambda f: f.reschedule_countdown(1, 1, math.inf, True), "previous_s=...\\) must be"),
        (lambda f: f.reschedule_countdown(1, 1, 0, "yes"), "guess=...\\) must be a bool"),
        (lambda f: f.circuit_breaker("llm", name="llm"), "given once as the first argument"),
        (lambda f: f.circuit_breaker(), "needs the name of a limit"),
        (lambda f: f.on_breaker_change(5), "needs a callable"),
        (lambda f: f.circuit_breaker("llm", throw_new_error_on_trip=math.nan), "must be a bool"),
        (lambda f: f.deferred.take(math.nan), "take\\(limit=...\\) must be an int"),
        (lambda f: f.deferred.take(-1), "take\\(limit=...\\) must be an int"),
        (lambda f: f.deferred.take(10, claim_s=math.inf), "claim_s=...\\) must be"),
        (lambda f: f.deferred.add("i", 1.0, "not bytes"), "must be bytes"),
        (lambda f: f.deferred.ack([5]), "item ids must be a list of str"),
        (lambda f: f.deferred.fate(None), "item ids must be a list of str"),
        (lambda f: run_async(5), "needs a coroutine"),
    ],
)
def test_misuse_of_the_public_api_is_a_config_error(
    make_fleet: MakeFleet, call: Callable[[Fleet], object], needle: str
) -> None:
    """Each raised a raw AttributeError, OverflowError, TypeError or ValueError (or passed
    silently: take(-1) took every item)."""
    pytest.importorskip("pybreaker")
    fleet = make_fleet({"llm": {"max_in_flight": 2, "breaker": {}}})
    with pytest.raises(FleetError, match=needle):
        call(fleet)


def test_circuit_breaker_still_takes_its_name_as_a_keyword(make_fleet: MakeFleet) -> None:
    pytest.importorskip("pybreaker")
    fleet = make_fleet({"llm": {"max_in_flight": 2, "breaker": {}}})
    assert fleet.circuit_breaker(name="llm").limit == "llm"
    assert 1.0 <= fleet.reschedule_countdown(1.0, 10**400) <= fleet.max_countdown_s
