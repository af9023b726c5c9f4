"""Fuzz (hypothesis) over configuration, slot / try_acquire / release / settle arguments and
CLI options, against a private redis-server: only the documented errors (``FleetError``
and its subclasses, click usage errors), never a raw Redis/Lua/Python error, never a
leaked lease, never a hang (every wait is bounded by a small ``max_wait``)."""

from __future__ import annotations

import dataclasses
import math
import time
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from celery_fleet import Fleet, FleetError
from celery_fleet.testing.chaos import Figures
from celery_fleet.testing.faults import KeptRedisServer

from .scenarios import _describe


@dataclasses.dataclass(frozen=True)
class FuzzParams:
    examples: int = 150  # per property (configuration, calls, CLI)
    seed: int = 20


LIMITS = {
    "cap": {"max_in_flight": 2, "lease": 2},
    "llm": {"rpm": 6000, "tpm": 1_000_000, "max_in_flight": 4},
    "brk": {"max_in_flight": 2, "breaker": True},
}
WEIRD_NUMBERS = st.sampled_from(
    [
        0,
        -1,
        1,
        2**53,
        2**64,
        10**400,
        1.5,
        -0.5,
        math.nan,
        math.inf,
        -math.inf,
        True,
        None,
        "5",
        "x",
        b"1",
        [],
        {},
    ]
)
NUMBERS = st.one_of(st.integers(-10, 10**7), WEIRD_NUMBERS)
WAITS = st.sampled_from([0, 0.01, 0.05, -1, math.nan, math.inf, -math.inf, 10**400, "1", None])
NAMES = st.sampled_from(["cap", "llm", "brk", "nope", "", "a:b", 5, None, "x" * 200])
OUTCOMES = st.sampled_from(["ok", "error", "timeout", "overload", "rate_limited", "bogus", None, 5])
LIMIT_OPTIONS = st.dictionaries(
    st.sampled_from(
        [
            "rpm",
            "tpm",
            "max_in_flight",
            "lease",
            "burst",
            "headroom",
            "requests",
            "tokens",
            "breaker",
            "adaptive",
            "min_in_flight",
            "tokns",
        ]
    ),
    st.one_of(
        NUMBERS,
        st.sampled_from(
            [
                "10/minute",
                "5/second;100/day",
                "x/y",
                True,
                False,
                {"failure_rate": 2},
                {"reset_timeout": -1},
            ]
        ),
    ),
    max_size=4,
)


class _Run:
    """What one property saw: examples run, the raw errors, the leases left behind."""

    def __init__(self) -> None:
        self.examples = 0
        self.raw: list[str] = []
        self.kinds: set[str] = set()
        self.leaks = 0

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn``; a FleetError is documented (None), anything else is recorded."""
        try:
            return fn(*args, **kwargs)
        except FleetError:
            return None
        except Exception as exc:  # the finding: a raw error reached the caller
            self.found(getattr(fn, "__name__", repr(fn)), _short(args, kwargs), exc)
            return None

    def found(self, where: str, call: str, exc: BaseException) -> None:
        self.kinds.add(f"{where}: {type(exc).__name__}")
        self.raw.append(f"{where}{call}: {type(exc).__name__}: {exc}"[:200])


def _short(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    parts = [repr(a)[:30] for a in args] + [f"{k}={v!r}"[:30] for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _settings(p: FuzzParams) -> settings:
    return settings(
        max_examples=p.examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def _fuzz_config(url: str, p: FuzzParams, run: _Run) -> None:
    @seed(p.seed)
    @_settings(p)
    @given(limits=st.dictionaries(NAMES, LIMIT_OPTIONS, max_size=3), namespace=NAMES)
    def prop(limits: dict[Any, Any], namespace: Any) -> None:
        run.examples += 1
        run.call(Fleet, redis_url=url, namespace=namespace, limits=limits)

    prop()


def _fuzz_calls(fleet: Fleet, p: FuzzParams, run: _Run) -> None:
    @seed(p.seed)
    @_settings(p)
    @given(
        op=st.sampled_from(
            ["slot", "try_acquire", "release_junk", "settle", "countdown", "circuit_breaker"]
        ),
        name=NAMES,
        tokens=NUMBERS,
        max_wait=WAITS,
        settle=NUMBERS,
        outcome=OUTCOMES,
        junk=st.sampled_from([None, "x", 5, object(), {"lease_id": "x"}]),
    )
    def prop(
        op: str, name: Any, tokens: Any, max_wait: Any, settle: Any, outcome: Any, junk: Any
    ) -> None:
        run.examples += 1
        if op == "slot":
            _in_slot(fleet, run, name, tokens, max_wait, settle)
        elif op == "try_acquire":
            decision = run.call(fleet.try_acquire, name, tokens)
            if decision:
                run.call(fleet.settle, decision, settle)
                run.call(fleet.release, decision, outcome)
                if decision.lease_id and fleet.admission.in_flight(decision.limit):
                    fleet.release(decision)  # the bad outcome was refused: give it back
        elif op == "release_junk":
            run.call(fleet.release, junk, outcome)
        elif op == "countdown":
            run.call(fleet.reschedule_countdown, tokens, settle)
        elif op == "circuit_breaker":
            run.call(fleet.circuit_breaker, name, **({"name": name} if junk == "x" else {}))
        else:
            run.call(fleet.settle, junk, settle)

    prop()


def _in_slot(fleet: Fleet, run: _Run, name: Any, tokens: Any, max_wait: Any, settle: Any) -> None:
    def body() -> None:
        started = time.monotonic()
        with fleet.slot(name, tokens=tokens, max_wait=max_wait) as slot:
            slot.observe({"x-ratelimit-remaining-requests": str(settle)})
            slot.settle(settle)
            slot.next(tokens=tokens if isinstance(tokens, int) else None)
        if time.monotonic() - started > 10:
            run.found("slot", _short((name,), {"max_wait": max_wait}), TimeoutError("> 10 s"))

    run.call(body)


def _fuzz_cli(url: str, p: FuzzParams, run: _Run) -> None:
    from celery import Celery
    from click.testing import CliRunner

    from celery_fleet.observability.cli import fleet as fleet_cli

    app = Celery("fuzz_cli", broker=url, set_as_current=False)
    app.conf.update(fleet_redis_url=url, fleet_namespace="fuzz", fleet_limits=LIMITS)
    value = st.sampled_from(
        [
            "nan",
            "inf",
            "-1",
            "0",
            "0.1",
            "1e400",
            "x",
            "",
            "cap",
            "llm",
            "nope",
            "open",
            "close",
            "auto",
            "--json",
        ]
    )
    command = st.one_of(
        st.tuples(
            st.just("watch"),
            st.just("--count"),
            st.sampled_from(["1", "2", "0", "-1", "x"]),
            st.just("--interval"),
            value,
        ),
        st.tuples(st.sampled_from(["status", "breaker", "reset", "history"]), value, value),
    )

    @seed(p.seed)
    @_settings(p)
    @given(args=command)
    def prop(args: tuple[str, ...]) -> None:
        run.examples += 1
        result = CliRunner().invoke(fleet_cli, list(args), obj=SimpleNamespace(app=app))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            run.found(f"celery fleet {args[0]}", " " + " ".join(args[1:]), result.exception)

    prop()


def fuzz(p: FuzzParams) -> Figures:
    """Configuration, call arguments and CLI options at random -> documented errors only,
    no lease left behind, no hang."""
    fig = Figures("fuzz", params=_describe(p))
    started = time.monotonic()
    with KeptRedisServer() as server:
        fleet = Fleet(redis_url=server.url, namespace="fuzz", limits=LIMITS)
        for what, prop in [
            ("configuration", lambda run: _fuzz_config(server.url, p, run)),
            ("calls", lambda run: _fuzz_calls(fleet, p, run)),
            ("CLI options", lambda run: _fuzz_cli(server.url, p, run)),
        ]:
            run = _Run()
            prop(run)
            fig.tasks += run.examples
            fig.check(
                f"{what}: only documented errors",
                not run.raw,
                f"{len(run.raw)} raw errors: {', '.join(sorted(run.kinds))}; "
                f"e.g. {run.raw[0] if run.raw else '-'}",
            )
        fig.leaks = sum(fleet.admission.in_flight(name) for name in LIMITS)
        fig.check("no lease left behind", fig.leaks == 0, f"{fig.leaks} held")
    fig.executions = fig.tasks
    fig.seconds = time.monotonic() - started
    return fig
