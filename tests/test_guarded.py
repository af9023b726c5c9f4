"""@fleet.guarded: a plain function whose every call is made in a slot, against real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from celery_fleet import CircuitOpen, ConfigError, Fleet, Throttled

MakeFleet = Callable[..., Fleet]
REQ = httpx.Request("POST", "http://sim/v1/search")
BREAKER = {
    "max_in_flight": 10,
    "breaker": {"failure_rate": 0.5, "min_calls": 3, "window": 30, "reset_timeout": 30},
}


def test_the_in_flight_cap_holds_across_threads(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"search": {"max_in_flight": 2}})
    lock = threading.Lock()
    running, peak, calls = 0, 0, 0

    @fleet.guarded("search", max_wait=30)
    def search(query: str) -> str:
        nonlocal running, peak, calls
        with lock:
            running += 1
            calls += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return query.upper()

    def agent(i: int) -> None:
        for step in range(3):
            assert search(f"q{i}.{step}") == f"Q{i}.{step}"

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert calls == 18
    assert peak == 2  # the cap was reached, never passed
    assert fleet.admission.in_flight("search") == 0


def test_a_call_that_cannot_get_in_within_max_wait_is_throttled(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"search": {"max_in_flight": 1}})

    @fleet.guarded("search", max_wait=0.2)
    def search() -> None:
        pytest.fail("called past a full in-flight cap")

    with fleet.slot("search"), pytest.raises(Throttled):
        search()


def test_usage_settles_the_reservation_from_the_return_value(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"tpm": 6000, "burst": 1000 / 6000}})  # a bucket of 1,000

    @fleet.guarded("llm", tokens=1000, usage=lambda resp: resp["used"])
    def complete(prompt: str) -> dict[str, Any]:
        return {"text": prompt, "used": 200}

    assert complete("hi") == {"text": "hi", "used": 200}
    # 1,000 reserved, settled to 200: 800 are back in the bucket at once
    assert fleet.try_acquire("llm", tokens=800)


def test_without_usage_the_reservation_stays_spent(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"tpm": 6000, "burst": 1000 / 6000}})

    @fleet.guarded("llm", tokens=1000)
    def complete() -> int:
        return 200

    complete()
    assert not fleet.try_acquire("llm", tokens=800)


def test_callable_tokens_reserve_from_the_arguments(make_fleet: MakeFleet, rclient: Any) -> None:
    fleet = make_fleet({"llm": {"tpm": 600_000}})
    seen: list[int] = []

    @fleet.guarded("llm", tokens=lambda prompt, *, extra=0: len(prompt) + extra)
    def complete(prompt: str, *, extra: int = 0) -> None:
        leases = rclient.zrange(fleet.admission.keys("llm").leases, 0, -1)
        # a lease is "<acquired µs>.<in flight then>.<tokens>.<id>"
        seen.extend(int(lease.decode().split(".")[2]) for lease in leases)

    complete("x" * 120)
    complete("x" * 7, extra=30)
    assert seen == [120, 37]

    @fleet.guarded("llm", tokens=lambda: -5)
    def broken() -> None:
        pytest.fail("called with a bad reservation")

    with pytest.raises(ConfigError, match=r"tokens\(\.\.\.\) must be a non-negative int"):
        broken()


def test_a_rejected_result_counts_against_the_breaker_and_is_returned(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"search": BREAKER})
    ran = 0

    @fleet.guarded("search", validate=lambda hits: hits != "<html>error</html>")
    def search() -> str:
        nonlocal ran
        ran += 1
        return "<html>error</html>"

    assert [search() for _ in range(3)] == ["<html>error</html>"] * 3
    assert fleet.breaker("search").state().state == "open"
    with pytest.raises(CircuitOpen):
        search()
    assert ran == 3  # refused without calling it


def test_the_limits_own_validate_hook_applies_too(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"search": {**BREAKER, "validate": bool}})

    @fleet.guarded("search")
    def search() -> list[str]:
        return []

    for _ in range(3):
        search()
    assert fleet.breaker("search").state().state == "open"


def test_provider_errors_count_as_failures_other_errors_do_not(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"search": BREAKER})
    outcome: list[Exception] = []

    @fleet.guarded("search")
    def search() -> None:
        raise outcome[-1]

    outcome.append(ValueError("the agent's own bug"))
    for _ in range(5):
        with pytest.raises(ValueError):
            search()
    state = fleet.breaker("search").state()
    assert (state.state, state.calls, state.failures) == ("closed", 0, 0)

    outcome.append(
        openai.InternalServerError("boom", response=httpx.Response(502, request=REQ), body=None)
    )
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            search()
    assert fleet.breaker("search").state().state == "open"


def test_a_429_becomes_throttled_as_in_a_slot(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"search": BREAKER})

    @fleet.guarded("search")
    def search() -> None:
        headers = {"retry-after-ms": "250"}
        response = httpx.Response(429, request=REQ, headers=headers)
        raise openai.RateLimitError("slow down", response=response, body=None)

    with pytest.raises(Throttled) as info:
        search()
    assert info.value.wait_ms == 250
    assert fleet.breaker("search").state().failures == 0


@pytest.fixture
def offline_fleet() -> Iterator[Fleet]:
    """A Fleet whose Redis does not answer: decoration must not need it."""
    fleet = Fleet(
        redis_url="redis://127.0.0.1:1/0",
        limits={"search": {"max_in_flight": 2}, "llm": {"tpm": 60_000}},
    )
    yield fleet
    fleet.reset_connections()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tokens": -1}, "tokens must be a non-negative int"),
        ({"tokens": "3"}, "tokens must be a non-negative int"),
        ({"tokens": True}, "tokens must be a non-negative int"),
        ({"tokens": 10_000}, "can never be admitted"),
        ({"max_wait": -1}, "max_wait"),
        ({"validate": 42}, "validate must be a callable"),
        ({"usage": 42}, "usage must be a callable"),
    ],
)
def test_bad_options_fail_at_decoration(
    offline_fleet: Fleet, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        offline_fleet.guarded("llm", **options)


def test_decoration_errors_name_what_is_wrong(offline_fleet: Fleet) -> None:
    with pytest.raises(ConfigError, match="unknown limit 'serch'; known limits: llm, search"):
        offline_fleet.guarded("serch")
    with pytest.raises(ConfigError, match="has no token budget"):
        offline_fleet.guarded("search", tokens=5)
    with pytest.raises(ConfigError, match="usage settles tokens, but limit 'search'"):
        offline_fleet.guarded("search", usage=lambda r: 1)
    with pytest.raises(TypeError, match="tokns"):
        offline_fleet.guarded("search", tokns=5)  # type: ignore[call-arg]

    def plain() -> None: ...

    with pytest.raises(ConfigError, match="with parentheses"):
        offline_fleet.guarded(plain)  # type: ignore[arg-type]

    async def coroutine() -> None: ...

    def generator() -> Iterator[int]:
        yield 1

    guard = offline_fleet.guarded("search")
    with pytest.raises(ConfigError, match="plain \\(sync\\) functions.*async"):
        guard(coroutine)
    with pytest.raises(ConfigError, match="is a generator"):
        guard(generator)
    with pytest.raises(ConfigError, match="decorates a function"):
        guard(42)  # type: ignore[arg-type]


def test_the_wrapper_keeps_the_functions_metadata(offline_fleet: Fleet) -> None:
    def search(query: str, limit: int = 10) -> list[str]:
        """Search the web."""
        return []

    wrapped = offline_fleet.guarded("search")(search)
    assert wrapped.__name__ == "search"
    assert wrapped.__qualname__ == search.__qualname__
    assert wrapped.__doc__ == "Search the web."
    assert wrapped.__module__ == __name__
    assert wrapped.__wrapped__ is search  # type: ignore[attr-defined]
    assert wrapped.__annotations__ == search.__annotations__
