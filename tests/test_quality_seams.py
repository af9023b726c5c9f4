"""The quality breaker at its seams (issue 25's verification): Redis losing the breaker's
hash in the middle of an incident, and processes counting one limit with different configs.

Real Redis; the state loss is a DEL of the hash (what a restart without persistence, or an
eviction, leaves). Every wait is a condition with a bound on calls, never on time.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import Fleet

MakeFleet = Callable[..., Fleet]

OK = {
    "choices": [
        {"message": {"content": "Paris is the capital of France."}, "finish_reason": "stop"}
    ]
}
BAD = {"choices": [{"message": {"content": "  "}, "finish_reason": "stop"}]}


def limits(**quality: Any) -> dict[str, Any]:
    cfg = {"window": 2, "min_calls": 20, "reset_timeout": 60, "probes": 10, **quality}
    return {"llm": {"rpm": 10**7, "quality": {**cfg, "on_degraded": "flag"}}}


def call(fleet: Fleet, bad: bool) -> None:
    with fleet.slot("llm", max_wait=5) as slot:
        slot.judge(BAD if bad else OK)


def warm(fleet: Fleet, rng: random.Random) -> None:
    """A 2% garbage rate until the baseline has learnt from more than min_calls calls."""
    for _ in range(5000):
        call(fleet, rng.random() < 0.02)
        if fleet.admission.quality.seen("llm").base_n >= 40:
            return
        time.sleep(0.002)
    raise AssertionError("the baseline never learnt")


def garbage_until_open(fleet: Fleet, calls: int) -> int | None:
    """All-garbage calls until the breaker opens: how many it took (None: not within)."""
    for n in range(1, calls + 1):
        call(fleet, True)
        if fleet.quality("llm").state == "open":
            return n
        time.sleep(0.002)
    return None


def test_a_lost_hash_is_seeded_with_the_baseline_this_process_saw(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    """Without the seed the incident's garbage becomes the new baseline: it never opens."""
    fleet = make_fleet(limits())
    warm(fleet, random.Random(7))
    seen = fleet.admission.quality.seen("llm")
    learnt = seen.baseline
    rclient.delete(fleet.admission.quality.key("llm"))  # Redis lost it
    assert fleet.quality("llm").state == "closed"  # a read of the empty hash ...
    assert seen.baseline == learnt and seen.base_n >= 40  # ... keeps what this process saw
    assert garbage_until_open(fleet, 400) is not None
    assert fleet.quality("llm").baseline < 0.2  # not the incident's 100%


def test_a_lost_open_breaker_is_open_again_on_the_next_count(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet(limits())
    warm(fleet, random.Random(11))
    assert garbage_until_open(fleet, 400) is not None
    wait = fleet.quality("llm").wait_ms
    rclient.delete(fleet.admission.quality.key("llm"))
    assert fleet.quality("llm").state == "closed"
    call(fleet, True)  # its count finds no hash, and this process saw it open
    state = fleet.quality("llm")
    assert state.state == "open"
    assert 0 < state.wait_ms <= wait  # the rest of the same reset timeout, not a new one


def test_a_new_hash_without_knowledge_starts_empty(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet(limits())
    call(fleet, True)
    state = fleet.quality("llm")
    assert (state.state, state.baseline, state.calls) == ("closed", 0.0, 1)


def test_a_process_with_another_config_is_warned_once(
    make_fleet: MakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_fleet(limits())
    second = make_fleet(limits(window=3, ratio=10))
    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        call(first, False)
        assert not caplog.records  # the hash takes the first count's config
        call(second, False)
        call(second, False)
        call(first, False)
    warnings = [r.getMessage() for r in caplog.records if "differs" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "'llm'" in warnings[0]
    assert "window_ms 3000 vs 2000" in warnings[0]
    assert "ratio 10.0 vs 3.0" in warnings[0]
    assert "min_calls" not in warnings[0]  # only what differs
