"""The store strategy: every call Redis does not answer is handed to one object.

Admission runs on a Redis that refuses connections (a free port), so every call fails at
once; a recording strategy stands in for the store-down policy. No Redis server needed.
"""

from __future__ import annotations

import pytest

from celery_fleet.admission.config import LimitConfig, parse_limits
from celery_fleet.admission.core import Admission
from celery_fleet.admission.decision import Decision
from celery_fleet.admission.providers import Observation
from celery_fleet.errors import StoreUnavailable
from celery_fleet.resilience.fallback import StoreDown
from celery_fleet.resilience.strategy import RedisOnly, StoreStrategy
from celery_fleet.store.calls import Steps
from celery_fleet.store.sync import RedisStore
from celery_fleet.testing.redis_server import free_port


class Recording:
    """A strategy that answers every ask with a refusal and remembers what it was told."""

    fallback = True
    down = False
    unreachable = False

    def __init__(self) -> None:
        self.covered: list[StoreUnavailable] = []
        self.owned: set[str] = set()

    def back_steps(self, admission: object) -> Steps[bool]:
        return True
        yield  # pragma: no cover

    def admit(self, cfg: LimitConfig, tokens: int, lease_id: str) -> Decision:
        return Decision(cfg.name, False, 50, None, "recorded", 0, tokens, 0.0)

    def owns(self, lease_id: object) -> bool:
        return lease_id in self.owned

    def release(self, limit: str, lease_id: str) -> bool:
        self.owned.discard(lease_id)
        return True

    def settle(self, cfg: LimitConfig, lease_id: str, actual: int) -> int:
        return -1

    def failed(self, error: StoreUnavailable) -> None:
        self.covered.append(error)

    def cover(self, error: StoreUnavailable) -> None:
        self.covered.append(error)

    def saw(
        self, limit: str, in_flight: int, admitted: bool, redis_ms: float | None = None
    ) -> None:
        raise AssertionError("Redis never answers here")

    def answered(self) -> bool:
        return False


@pytest.fixture
def limits() -> dict[str, LimitConfig]:
    return parse_limits({"llm": {"rpm": 60, "tpm": 6000, "max_in_flight": 2}})


@pytest.fixture
def store() -> RedisStore:
    return RedisStore(f"redis://127.0.0.1:{free_port()}/0", health_s=0.5)


def test_both_strategies_are_store_strategies(limits: dict[str, LimitConfig]) -> None:
    strategies: list[StoreStrategy] = [RedisOnly(), StoreDown("local", limits, lambda: 1)]
    assert [s.fallback for s in strategies] == [False, True]
    assert not any(s.down for s in strategies)
    assert strategies[1].owns("local.abc") and not strategies[0].owns("local.abc")


def test_without_a_policy_every_unanswered_call_raises(
    store: RedisStore, limits: dict[str, LimitConfig]
) -> None:
    admission = Admission(store, limits)
    assert isinstance(admission.store_down, RedisOnly)
    with pytest.raises(StoreUnavailable):
        admission.try_acquire("llm")
    with pytest.raises(StoreUnavailable):
        admission.settle("llm", "lease", 10, 20)
    with pytest.raises(StoreUnavailable):
        admission.observe("llm", Observation(requests_remaining=1))


def test_each_unanswered_call_is_handed_to_the_strategy(
    store: RedisStore, limits: dict[str, LimitConfig]
) -> None:
    strategy = Recording()
    admission = Admission(store, limits, "fleet", strategy)
    refused = admission.try_acquire("llm", tokens=5)
    assert not refused and refused.reason == "recorded" and refused.tokens == 5
    assert admission.settle("llm", "lease", 10, 20) == 0
    assert admission.observe("llm", Observation(requests_remaining=1)) == 0
    # the three calls, and the first ask's read of the runtime limits (once a process)
    assert len(strategy.covered) == 4
    assert [o.kind for o in admission.replays.take()] == ["ask"]  # owed once Redis answers


def test_a_lease_the_strategy_owns_never_reaches_redis(
    store: RedisStore, limits: dict[str, LimitConfig]
) -> None:
    strategy = Recording()
    strategy.owned.add("mine.1")
    admission = Admission(store, limits, "fleet", strategy)
    assert admission.settle("llm", "mine.1", 10, 20) == -1
    assert admission.renew("llm", [("mine.1", 20)]) == ([], [])
    assert admission.release("llm", "mine.1").released
    assert strategy.covered == [] and "mine.1" not in strategy.owned
