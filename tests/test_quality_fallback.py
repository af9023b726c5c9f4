"""``on_degraded: "fallback:<limit>"`` and the fallback's own quality breaker (issue 25), on a
real Redis: a call is never moved to a limit whose breaker is open too (it is refused
with ``QualityDegraded``, ``wait_ms`` the sooner of the two half-opens), fallbacks are
never chained, and a cycle of them is refused at configuration.

Breakers are opened by writing their hash as the count script does when it opens one (at
Redis TIME); the local copies' age runs on a fake clock (``fleet.admission.quality.clock``):
no test waits for the wall clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import Fleet, QualityDegraded
from celery_fleet.admission.config import parse_limits
from celery_fleet.errors import ConfigError
from celery_fleet.quality.breaker import REFRESH_S

MakeFleet = Callable[..., Fleet]


class FakeClock:
    now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def limits(target: str = "flag", a_reset: float = 10, b_reset: float = 3) -> dict[str, Any]:
    b_quality: dict[str, Any] = {"on_degraded": target, "reset_timeout": b_reset}
    return {
        "a": {"rpm": 10**7, "quality": {"on_degraded": "fallback:b", "reset_timeout": a_reset}},
        "b": {"rpm": 10**7, "quality": b_quality},
        "c": {"rpm": 10**7},
    }


def clocked(fleet: Fleet) -> FakeClock:
    clock = FakeClock()
    fleet.admission.quality.clock = clock
    return clock


def redis_ms(rclient: redis.Redis) -> float:
    sec, usec = rclient.time()
    return sec * 1000 + usec / 1000


def open_breaker(rclient: redis.Redis, fleet: Fleet, limit: str, ago_ms: float = 0) -> None:
    """Open ``limit``'s quality breaker ``ago_ms`` ago, as quality_count.lua does."""
    opened = redis_ms(rclient) - ago_ms
    key = fleet.admission.quality.key(limit)
    rclient.hset(key, mapping={"state": "open", "opened_at": f"{opened:.3f}"})


def used(fleet: Fleet, limit: str = "a") -> str:
    with fleet.slot(limit, max_wait=5) as slot:
        return slot.limit


@pytest.mark.parametrize("target", ["flag", "pause", "fallback:c"])
def test_a_fallback_whose_own_breaker_is_open_refuses_with_the_sooner_half_open(
    make_fleet: MakeFleet, rclient: redis.Redis, target: str
) -> None:
    fleet = make_fleet(limits(target))
    clocked(fleet)
    open_breaker(rclient, fleet, "a")
    assert used(fleet) == "b"  # b is closed: the fallback works as before
    open_breaker(rclient, fleet, "b")
    fleet.admission.quality.clock.sleep(REFRESH_S)  # type: ignore[attr-defined]
    with pytest.raises(QualityDegraded) as refused:
        used(fleet)
    assert refused.value.limit == "a" and refused.value.reason == "quality_degraded"
    assert 2000 < refused.value.wait_ms <= 3000  # b half-opens first (3 s; a in 10 s)
    # never chained on to c (b's own fallback), never admitted against b
    assert fleet.admission.in_flight("b") == 0 and fleet.admission.in_flight("c") == 0


def test_the_wait_is_the_asked_limit_s_when_it_half_opens_first(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet(limits(a_reset=2, b_reset=30))
    clocked(fleet)
    open_breaker(rclient, fleet, "a")
    open_breaker(rclient, fleet, "b")
    with pytest.raises(QualityDegraded) as refused:
        used(fleet)
    assert 1000 < refused.value.wait_ms <= 2000


def test_once_the_fallback_half_opens_calls_go_to_it_again(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet(limits())
    clock = clocked(fleet)
    open_breaker(rclient, fleet, "a")
    open_breaker(rclient, fleet, "b")
    with pytest.raises(QualityDegraded):
        used(fleet)
    open_breaker(rclient, fleet, "b", ago_ms=5000)  # past b's reset timeout in Redis
    with pytest.raises(QualityDegraded):  # the local copy is not due yet: refused still
        used(fleet)
    clock.sleep(REFRESH_S)
    assert used(fleet) == "b"  # b read again: half-open, its calls are its probes
    assert fleet.quality("b").state == "half_open"


def test_the_fallback_is_read_only_while_the_breaker_is_open_at_most_once_a_second(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet(limits())
    clock = clocked(fleet)
    quality = fleet.admission.quality
    reads: list[str] = []
    real = quality.state

    def spy(limit: str) -> Any:
        reads.append(limit)
        return real(limit)

    quality.state = spy  # type: ignore[method-assign]
    for _ in range(5):  # closed: the hot path reads a's state once a second, b never
        assert used(fleet) == "a"
    assert reads == ["a"]
    open_breaker(rclient, fleet, "a")
    open_breaker(rclient, fleet, "b")
    clock.sleep(REFRESH_S)
    for _ in range(5):
        with pytest.raises(QualityDegraded):
            used(fleet)
    assert reads == ["a", "a", "b"]
    clock.sleep(REFRESH_S)
    with pytest.raises(QualityDegraded):
        used(fleet)
    assert reads == ["a", "a", "b", "a", "b"]


def test_a_fallback_without_a_quality_breaker_is_always_used(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet(
        {"a": {"rpm": 10**7, "quality": {"on_degraded": "fallback:c"}}, "c": {"rpm": 10**7}}
    )
    clocked(fleet)
    open_breaker(rclient, fleet, "a")
    assert used(fleet) == "c"


def test_an_async_slot_is_refused_as_a_blocking_one(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet(limits("pause"))
    clocked(fleet)
    open_breaker(rclient, fleet, "a")
    open_breaker(rclient, fleet, "b")

    async def main() -> None:
        try:
            with pytest.raises(QualityDegraded) as refused:
                async with fleet.aslot("a"):
                    pass
            assert 2000 < refused.value.wait_ms <= 3000
        finally:
            await fleet.aclose()

    asyncio.run(main())


def quality(fallback: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"rpm": 60}
    if fallback:
        spec["quality"] = {"on_degraded": f"fallback:{fallback}"}
    return spec


@pytest.mark.parametrize(
    ("graph", "loop"),
    [
        ({"a": "b", "b": "a"}, "a -> b -> a"),
        ({"a": "b", "b": "c", "c": "a"}, "a -> b -> c -> a"),
        ({"x": "a", "a": "b", "b": "a"}, "a -> b -> a"),
    ],
)
def test_a_cycle_of_fallbacks_is_refused_at_configuration(graph: dict[str, str], loop: str) -> None:
    raw = {name: quality(graph.get(name)) for name in dict.fromkeys([*graph, *graph.values()])}
    with pytest.raises(ConfigError, match="go round") as error:
        parse_limits(raw)
    assert loop in str(error.value)


def test_a_chain_of_fallbacks_is_allowed_but_never_followed() -> None:
    parsed = parse_limits({"a": quality("b"), "b": quality("c"), "c": quality(None)})
    assert parsed["a"].quality is not None and parsed["a"].quality.fallback == "b"
    with pytest.raises(ConfigError, match="the limit itself"):
        parse_limits({"a": quality("a")})
    with pytest.raises(ConfigError, match="not a limit"):
        parse_limits({"a": quality("z")})
