"""fleet.circuit_breaker: pybreaker's interface on the fleet-wide breaker, with real Redis and
real processes where the state is shared."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pybreaker
import pytest

from celery_fleet import CircuitOpen, ConfigError, Fleet
from celery_fleet.contrib.pybreaker import CircuitBreakerOpen, FleetCircuitBreaker

MakeFleet = Callable[..., Fleet]
REQ = httpx.Request("POST", "http://sim/v1/search")
# failure_rate 0.6 over min_calls 2 opens on the same calls as pybreaker's fail_max=2 in the
# script below (two failures in a row, after a success or from fresh)
QUICK = {
    "max_in_flight": 50,
    "breaker": {"failure_rate": 0.6, "min_calls": 2, "window": 30, "reset_timeout": 0.3},
}
SLOW = {
    "max_in_flight": 50,
    "breaker": {"failure_rate": 0.6, "min_calls": 2, "window": 30, "reset_timeout": 30},
}


class Recorder(pybreaker.CircuitBreakerListener):
    """Writes down every callback pybreaker defines, with what it was given."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def before_call(self, cb: Any, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.log.append(("before_call", func.__name__, args, kwargs))

    def success(self, cb: Any) -> None:
        self.log.append(("success",))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.log.append(("failure", type(exc).__name__, str(exc)))

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.log.append(("state_change", old_state and old_state.name, new_state.name))


def ok(n: int, *, tag: str = "") -> int:
    return n


def bad(n: int, *, tag: str = "") -> int:
    raise RuntimeError(f"failure {n}")


def run_script(cb: Any, log: list[tuple[Any, ...]]) -> None:
    """Trip, refuse, probe and close, trip again, fail the probe: what the caller sees."""
    steps: list[Any] = [ok, bad, bad, ok, "wait", ok, bad, bad, "wait", bad, ok]
    for n, step in enumerate(steps):
        if step == "wait":
            time.sleep(0.4)  # past reset_timeout
            continue
        try:
            cb.call(step, n, tag="x")
            log.append(("returned",))
        except pybreaker.CircuitBreakerError as exc:
            log.append(("CircuitBreakerError",))
            assert cb.current_state == "open", exc
        except RuntimeError:
            log.append(("RuntimeError",))


def test_listeners_hear_what_pybreaker_would_tell_them_in_the_same_order(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"tool": QUICK})
    reference, ours = Recorder(), Recorder()
    run_script(
        pybreaker.CircuitBreaker(fail_max=2, reset_timeout=0.3, listeners=[reference]),
        reference.log,
    )
    cb = fleet.circuit_breaker("tool", listeners=[ours])
    run_script(cb, ours.log)
    assert ours.log == reference.log
    # and it is the interesting sequence, not two empty logs
    assert ours.log[6:12] == [
        ("before_call", "bad", (2,), {"tag": "x"}),
        ("failure", "RuntimeError", "failure 2"),
        ("state_change", "closed", "open"),
        ("CircuitBreakerError",),
        ("CircuitBreakerError",),  # open: refused before any listener hears of it
        ("state_change", "open", "half-open"),  # this process's call is the probe
    ]
    assert ours.log[-5:] == [
        ("before_call", "bad", (9,), {"tag": "x"}),
        ("failure", "RuntimeError", "failure 9"),
        ("state_change", "half-open", "open"),
        ("CircuitBreakerError",),  # the trial call failed
        ("CircuitBreakerError",),  # and the breaker is open again
    ]


def test_an_open_breaker_refuses_without_calling(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": SLOW})
    recorder = Recorder()
    cb = fleet.circuit_breaker("tool", listeners=[recorder])
    assert cb.open() is True  # pybreaker: throw_new_error_on_trip
    assert cb.current_state == "open"
    assert fleet.breaker("tool").state().state == "open"
    called = []
    with pytest.raises(pybreaker.CircuitBreakerError) as info:
        cb.call(called.append, 1)
    assert called == []
    assert isinstance(info.value, CircuitOpen) and 0 < info.value.wait_ms <= 30_000
    assert recorder.log == [("state_change", "closed", "open")]
    cb.close()
    assert cb.current_state == "closed" and cb.call(len, "abc") == 3


def test_the_fleets_breaker_refuses_pybreaker_callers_too(make_fleet: MakeFleet) -> None:
    """One state: a trip by plain slots is an open pybreaker breaker, and back."""
    fleet = make_fleet({"tool": SLOW})
    cb = fleet.circuit_breaker("tool")
    for _ in range(2):
        with pytest.raises(openai.InternalServerError), fleet.slot("tool"):
            raise openai.InternalServerError(
                "boom", response=httpx.Response(500, request=REQ), body=None
            )
    assert cb.current_state == "open"
    with pytest.raises(CircuitBreakerOpen):
        cb.call(len, "abc")
    cb.half_open()
    assert fleet.breaker("tool").state().state == "half_open"
    assert cb.call(len, "abc") == 3  # the probe closes it
    assert fleet.breaker("tool").state().state == "closed"


CHILD = textwrap.dedent(
    """
    import json, sys
    from celery_fleet import Fleet
    url, ns, limits, op = sys.argv[1:5]
    fleet = Fleet(redis_url=url, namespace=ns, limits=json.loads(limits))
    cb = fleet.circuit_breaker("tool")
    if op != "state":
        getattr(cb, op)()
    print(cb.current_state)
    """
)


def child(redis_url: str, namespace: str, op: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, redis_url, namespace, json.dumps({"tool": SLOW}), op],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_open_half_open_and_close_act_for_the_whole_fleet(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": QUICK})
    cb = fleet.circuit_breaker("tool")
    cb.open()  # as a trip: refused for reset_timeout, then one probe
    with pytest.raises(CircuitBreakerOpen):
        cb.call(len, "abc")
    time.sleep(0.4)
    assert cb.current_state == "half-open"
    assert cb.call(len, "abc") == 3 and cb.current_state == "closed"
    fleet.breaker("tool").force_open()  # an operator's override
    cb.close()
    state = fleet.breaker("tool").state()
    assert (state.state, state.forced, state.calls) == ("closed", None, 0)


def test_a_fleet_task_reschedules_on_an_open_breaker(redis_url: str, namespace: str) -> None:
    from celery import Celery

    from celery_fleet import fleet_task

    app = Celery("unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    fleet = Fleet(app, redis_url=redis_url, namespace=namespace, limits={"tool": SLOW})
    cb = fleet.circuit_breaker("tool")
    waited: list[float] = []

    def sleep(seconds: float) -> None:  # the reschedule's countdown: the tool recovers
        waited.append(seconds)
        cb.close()

    fleet.clock.sleep = sleep  # type: ignore[method-assign]
    runs: list[int] = []

    @cb
    def search() -> str:
        return "hits"

    @fleet_task(app=app, shared=False)
    def agent() -> str:
        runs.append(1)
        return search()

    cb.open()
    assert agent.apply().get() == "hits"
    assert len(runs) == 2 and len(waited) == 1


def test_the_state_is_shared_across_processes(
    make_fleet: MakeFleet, redis_url: str, namespace: str
) -> None:
    fleet = make_fleet({"tool": SLOW})
    recorder = Recorder()
    cb = fleet.circuit_breaker("tool", listeners=[recorder])
    assert cb.state.name == "closed"
    assert child(redis_url, namespace, "open") == "open"
    assert cb.current_state == "open"
    assert cb.state.name == "open"  # noticed here, as pybreaker notices a shared storage
    assert recorder.log == [("state_change", "closed", "open")]
    with pytest.raises(pybreaker.CircuitBreakerError):
        cb.call(len, "abc")
    cb.close()
    assert child(redis_url, namespace, "state") == "closed"
    assert child(redis_url, namespace, "half_open") == "half-open"
    assert cb.current_state == "half-open"


PROBER = textwrap.dedent(
    """
    import json, sys, time
    import pybreaker, redis
    from celery_fleet import Fleet
    url, ns, limits, counter = sys.argv[1:5]
    fleet = Fleet(redis_url=url, namespace=ns, limits=json.loads(limits))
    fleet.check()
    cb = fleet.circuit_breaker("tool")
    client = redis.Redis.from_url(url)

    def work():
        client.incr(counter)
        time.sleep(1.0)  # the probe is still running while the others ask
        return "done"

    print("ready", flush=True)
    sys.stdin.readline()
    try:
        print(json.dumps(cb.call(work)), flush=True)
    except pybreaker.CircuitBreakerError as exc:
        print(json.dumps(type(exc).__name__), flush=True)
    """
)


def test_half_open_lets_exactly_one_probe_run_in_the_whole_fleet(
    make_fleet: MakeFleet, redis_url: str, namespace: str, rclient: Any
) -> None:
    fleet = make_fleet({"tool": SLOW})
    counter = f"{{{namespace}}}:ran"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PROBER,
                redis_url,
                namespace,
                json.dumps({"tool": SLOW}),
                counter,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        fleet.circuit_breaker("tool").half_open()
        for p in procs:  # all at once
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        answers = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert sorted(answers) == ["CircuitBreakerOpen"] * 7 + ["done"]
    assert int(rclient.get(counter)) == 1  # the work itself ran once
    assert fleet.circuit_breaker("tool").current_state == "closed"


def test_excluded_exceptions_do_not_count(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": SLOW})
    recorder = Recorder()
    cb = fleet.circuit_breaker(
        "tool", exclude=[KeyError, lambda exc: "business" in str(exc)], listeners=[recorder]
    )
    assert not cb.is_system_error(KeyError("x"))
    assert not cb.is_system_error(ValueError("a business rule"))
    assert cb.is_system_error(ValueError("a crash"))

    def raise_(exc: Exception) -> None:
        raise exc

    for exc in [KeyError("missing"), ValueError("business rule")] * 3:
        with pytest.raises(type(exc)):
            cb.call(raise_, exc)
    assert cb.current_state == "closed" and cb.fail_counter == 0
    assert [e[0] for e in recorder.log if e[0] != "before_call"] == ["success"] * 6

    cb.add_excluded_exception(ZeroDivisionError)
    assert ZeroDivisionError in cb.excluded_exceptions
    with pytest.raises(ZeroDivisionError):
        cb.call(lambda: 1 / 0)
    assert cb.fail_counter == 0
    assert fleet.breaker("tool").state().calls == 7  # successes, as in pybreaker
    cb.remove_excluded_exception(ZeroDivisionError)
    cb.close()  # a fresh window: two failures in a row open it
    with pytest.raises(ZeroDivisionError):
        cb.call(lambda: 1 / 0)
    assert cb.fail_counter == 1 and cb.current_state == "closed"
    with pytest.raises(CircuitBreakerOpen, match="failure rate reached"):
        cb.call(lambda: 1 / 0)
    with pytest.raises(ConfigError, match="exception type or a callable"):
        cb.add_excluded_exception("KeyError")


def test_without_throw_new_error_on_trip_the_calls_own_error_propagates(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"tool": SLOW})
    cb = fleet.circuit_breaker("tool", throw_new_error_on_trip=False)
    for n in range(2):
        with pytest.raises(RuntimeError, match=f"failure {n}"):
            cb.call(bad, n)
    assert cb.current_state == "open"
    assert cb.open() is False


def test_a_rate_limit_pauses_the_limit_and_counts_only_if_configured(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"tool": SLOW})
    recorder = Recorder()
    cb = fleet.circuit_breaker("tool", listeners=[recorder])

    def limited() -> None:
        response = httpx.Response(429, request=REQ, headers={"retry-after-ms": "5000"})
        raise openai.RateLimitError("slow down", response=response, body=None)

    for _ in range(3):
        with pytest.raises(openai.RateLimitError):  # not turned into Throttled
            cb.call(limited)
        fleet.reset_adaptive("tool")  # lift the pause it wrote, to call again
    assert [e[0] for e in recorder.log].count("failure") == 3  # pybreaker: a system error
    assert cb.current_state == "closed" and cb.fail_counter == 0
    with pytest.raises(openai.RateLimitError):
        cb.call(limited)
    assert fleet.adaptive_state("tool")["pause_until"] > 0


def test_with_count_rate_limits_a_429_is_a_failure(make_fleet: MakeFleet) -> None:
    counted = {**SLOW, "breaker": {**SLOW["breaker"], "count_rate_limits": True}}
    fleet = make_fleet({"tool": counted})
    cb = fleet.circuit_breaker("tool")

    def limited() -> None:
        response = httpx.Response(429, request=REQ)
        raise openai.RateLimitError("slow down", response=response, body=None)

    with pytest.raises(openai.RateLimitError):
        cb.call(limited)
    with pytest.raises(CircuitBreakerOpen):
        cb.call(limited)


def test_calling_is_a_with_block_version_of_call(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": SLOW})
    recorder = Recorder()
    cb = fleet.circuit_breaker("tool", listeners=[recorder])
    with cb.calling():
        pass
    with pytest.raises(RuntimeError), cb.calling():
        raise RuntimeError("inside")
    assert recorder.log == [
        ("before_call", "_block", (), {}),
        ("success",),
        ("before_call", "_block", (), {}),
        ("failure", "RuntimeError", "inside"),
    ]
    assert cb.fail_counter == 1


def test_no_lock_is_held_around_calls(make_fleet: MakeFleet) -> None:
    """pybreaker holds an RLock around each call: this would deadlock there."""
    fleet = make_fleet({"tool": SLOW})
    cb = fleet.circuit_breaker("tool")
    inside = threading.Event()

    def first() -> bool:
        return cb.call(lambda: inside.wait(timeout=10))

    thread_result: list[bool] = []
    thread = threading.Thread(target=lambda: thread_result.append(first()))
    thread.start()
    cb.call(inside.set)  # runs while the other call waits inside
    thread.join(timeout=10)
    assert thread_result == [True]


@pytest.fixture
def offline_fleet() -> Iterator[Fleet]:
    """A Fleet whose Redis does not answer: building a breaker must not need it."""
    fleet = Fleet(
        redis_url="redis://127.0.0.1:1/0",
        limits={"tool": SLOW, "llm": {"rpm": 60}},
    )
    yield fleet
    fleet.reset_connections()


def test_the_decorator_keeps_the_functions_metadata(offline_fleet: Fleet) -> None:
    cb = offline_fleet.circuit_breaker("tool")

    def search(query: str) -> list[str]:
        """Search the web."""
        return [query]

    for wrapped in (cb(search), cb()(search)):
        assert wrapped.__name__ == "search" and wrapped.__doc__ == "Search the web."
        assert wrapped.__qualname__ == search.__qualname__
        assert wrapped.__wrapped__ is search  # type: ignore[attr-defined]

    async def coroutine() -> None: ...

    def generator() -> Iterator[int]:
        yield 1

    for unsupported in (coroutine, generator):
        with pytest.raises(ConfigError, match="async or a generator"):
            cb(unsupported)
        with pytest.raises(ConfigError, match="async or a generator"):
            cb.call(unsupported)
    with pytest.raises(NotImplementedError, match="tornado"):
        cb.call_async(coroutine)


def test_configuration_comes_from_the_limit(offline_fleet: Fleet) -> None:
    cb = offline_fleet.circuit_breaker("tool")
    assert isinstance(cb, pybreaker.CircuitBreaker) and isinstance(cb, FleetCircuitBreaker)
    assert (cb.name, cb.fail_max, cb.reset_timeout, cb.success_threshold) == ("tool", 2, 30, 1)
    with pytest.raises(ConfigError, match=r"fleet_limits\['tool'\]\['breaker'\]"):
        cb.fail_max = 5
    with pytest.raises(ConfigError, match="reset_timeout"):
        cb.reset_timeout = 5
    with pytest.raises(ConfigError, match="unknown limit 'tol'; known limits: llm, tool"):
        offline_fleet.circuit_breaker("tol")
    with pytest.raises(ConfigError, match="has no breaker"):
        offline_fleet.circuit_breaker("llm")
    with pytest.raises(ConfigError, match="fail_max cannot be set.*failure_rate"):
        offline_fleet.circuit_breaker("tool", fail_max=5)
    with pytest.raises(ConfigError, match=r"unknown circuit_breaker option\(s\) \['exlude'\]"):
        offline_fleet.circuit_breaker("tool", exlude=[KeyError])


def test_without_pybreaker_the_error_says_what_to_install(redis_url: str, namespace: str) -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["pybreaker"] = None  # as if it were not installed
        from celery_fleet import Fleet
        fleet = Fleet(redis_url=sys.argv[1], namespace=sys.argv[2],
                      limits={"tool": {"max_in_flight": 1, "breaker": True}})
        with fleet.slot("tool"):
            pass  # the rest of the fleet works without it
        try:
            fleet.circuit_breaker("tool")
        except ImportError as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, redis_url, namespace],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "pip install 'celery-fleet[pybreaker]'" in done.stdout, done.stderr
