"""@fleet.guarded / aguarded with ``key=`` and ``lane=``: fixed or computed from the
function's arguments, checked at decoration; against real Redis (the key's and the lane's
budgets are decided inside acquire.lua)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from celery_fleet import ConfigError, Fleet, Throttled

MakeFleet = Callable[..., Fleet]
LANES = {"interactive": {"priority": 0, "reserve": 0.34}, "batch": {"priority": 1}}
KEYED = {"m": {"max_in_flight": 10, "keys": {"max_in_flight": 1}}}
LANED = {"m": {"max_in_flight": 3, "lanes": LANES}}  # batch may hold floor(3 * 0.66) = 1


def test_a_key_computed_from_the_arguments_gets_that_keys_sub_limit(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet(KEYED)
    seen: list[str] = []

    @fleet.guarded("m", max_wait=0.2, key=lambda tenant, prompt: tenant)
    def answer(tenant: str, prompt: str) -> str:
        seen.append(tenant)
        return prompt

    with fleet.slot("m", key="acme"):  # acme's one slot is taken
        assert answer("globex", "hi") == "hi"  # another key: its own budget
        with pytest.raises(Throttled):
            answer("acme", "hi")  # acme's own cap (1), not the limit's (10)
    assert seen == ["globex"]
    assert answer("acme", "again") == "again"
    assert fleet.admission.in_flight("m") == 0


def test_a_fixed_key_puts_every_call_under_it(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(KEYED)

    @fleet.guarded("m", max_wait=0.2, key="acme")
    def call() -> None:
        pytest.fail("called past acme's cap")

    with fleet.slot("m", key="acme"), pytest.raises(Throttled):
        call()


def test_a_lane_fixed_or_computed_uses_that_lanes_share(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(LANED)
    held = fleet.try_acquire("m", lane="batch")
    assert held.allowed  # batch's share (1 of 3) is used up

    @fleet.guarded("m", max_wait=0.2, lane=lambda urgent: "interactive" if urgent else "batch")
    def ask(urgent: bool) -> str:
        return "done"

    @fleet.guarded("m", max_wait=0.2, lane="interactive")
    def interactive() -> str:
        return "done"

    assert ask(True) == "done"  # interactive: the part kept for it
    assert interactive() == "done"
    with pytest.raises(Throttled):
        ask(False)  # batch: no more than its share, though 2 of 3 are free
    fleet.release(held)


def test_aguarded_takes_the_same_key_and_lane(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 3, "keys": {"max_in_flight": 1}, "lanes": LANES}})

    @fleet.aguarded("m", max_wait=0.2, key=lambda tenant: tenant, lane="interactive")
    async def answer(tenant: str) -> str:
        return tenant

    async def main() -> None:
        async with fleet.aslot("m", key="acme", lane="interactive"):
            assert await answer("globex") == "globex"
            with pytest.raises(Throttled):
                await answer("acme")
        await fleet.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("limits", "options", "words"),
    [
        (LANED, {"lane": "urgent"}, "unknown lane 'urgent'"),
        ({"m": {"max_in_flight": 3}}, {"lane": "batch"}, "has no lanes"),
        ({"m": {"max_in_flight": 3}}, {"lane": lambda x: "batch"}, "has no lanes"),
        ({"m": {"max_in_flight": 3}}, {"key": "acme"}, "has no keys"),
        ({"m": {"max_in_flight": 3}}, {"key": lambda x: x}, "has no keys"),
        (KEYED, {"key": "a\nb"}, "printable"),
        (KEYED, {"key": ""}, "non-empty"),
        (KEYED, {"key": "{tenant}"}, "looks like a template"),
        (KEYED, {"key": 42}, "must be a str or a callable"),
        (LANED, {"lane": 1}, "must be a str or a callable"),
    ],
)
def test_what_cannot_work_fails_at_decoration(
    make_fleet: MakeFleet, limits: dict[str, Any], options: dict[str, Any], words: str
) -> None:
    fleet = make_fleet(limits)
    with pytest.raises(ConfigError, match=words):
        fleet.guarded("m", **options)
    with pytest.raises(ConfigError, match=words):
        fleet.aguarded("m", **options)


def test_a_callables_bad_answer_fails_before_redis(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 3, "weights": {}, "lanes": LANES}})

    @fleet.guarded("m", key=lambda k, lane: k, lane=lambda k, lane: lane)
    def call(k: Any, lane: Any) -> str:
        return "ran"

    with pytest.raises(ConfigError, match="key"):
        call("a\nb", None)
    with pytest.raises(ConfigError, match="unknown lane 'urgent'"):
        call("acme", "urgent")
    assert call("acme", None) == "ran"  # None: the default lane (batch)
    assert fleet.admission.in_flight("m") == 0
