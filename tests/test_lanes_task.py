"""@fleet_task(lane=...): a lane name checked at decoration, a template or callable bound
to the task's arguments and checked at publish (no worker: memory broker, eager calls)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_fleet import ConfigError, Fleet, fleet_task
from celery_fleet.admission.slot import _held_here

LANES = {"interactive": {"priority": 0, "reserve": 0.5}, "batch": {"priority": 1}}


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[Celery]:
    app = Celery("unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.fleet_redis_url = redis_url
    app.conf.fleet_namespace = namespace
    app.conf.fleet_limits = {"llm": {"max_in_flight": 4, "lanes": LANES}, "plain": {"rpm": 60}}
    yield app


def _lane_held() -> str | None:
    """The lane of the slot the running body holds (the innermost one)."""
    return _held_here()[-1].lane


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"lane": "batch"}, "needs a limit="),
        ({"limit": "llm", "lane": 3}, "lane must be a lane name"),
        ({"limit": "llm", "lane": "a b"}, "lane must be a non-empty string"),
        ({"limit": "llm", "lane": "{0}"}, "name the arguments"),
        ({"limit": "llm", "lane": "{tier"}, "malformed"),
    ],
)
def test_bad_lane_options_fail_at_decoration(app: Celery, options: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        fleet_task(app=app, **options)


def test_a_fixed_unknown_lane_fails_at_decoration(app: Celery) -> None:
    Fleet(app)
    with pytest.raises(ConfigError, match="unknown lane 'bacth' of limit 'llm'"):
        fleet_task(app=app, limit="llm", lane="bacth")(lambda: None)
    with pytest.raises(ConfigError, match="limit 'plain' has no lanes"):
        fleet_task(app=app, limit="plain", lane="batch")(lambda: None)


def test_a_template_lane_is_checked_at_publish_and_bound_per_call(app: Celery) -> None:
    Fleet(app)
    app.conf.task_always_eager = True

    @fleet_task(app=app, limit="llm", lane="{tier}", shared=False, name="tiered")
    def tiered(doc: int, tier: str = "batch") -> Any:
        return _lane_held()

    with pytest.raises(ConfigError, match="unknown lane 'gold' of limit 'llm'"):
        tiered.delay(1, tier="gold")
    assert tiered.delay(1, tier="interactive").get() == "interactive"
    assert tiered.delay(2).get() == "batch"  # the default argument binds too


def test_a_callable_lane_and_the_default_lane(app: Celery) -> None:
    Fleet(app)
    app.conf.task_always_eager = True

    def pick(user: str, urgent: bool = False) -> str | None:
        return "interactive" if urgent else None  # None: the limit's lowest lane

    @fleet_task(app=app, limit="llm", lane=pick, shared=False, name="picked")
    def picked(user: str, urgent: bool = False) -> Any:
        return _lane_held()

    @fleet_task(app=app, limit="llm", shared=False, name="unlaned")
    def unlaned() -> Any:
        return _lane_held()

    assert picked.delay("u", urgent=True).get() == "interactive"
    assert picked.delay("u").get() == "batch"
    assert unlaned.delay().get() == "batch"


def test_celery_fleet_status_shows_each_lanes_share(app: Celery) -> None:
    import json
    from types import SimpleNamespace

    from click.testing import CliRunner

    from celery_fleet.observability.cli import fleet as fleet_cli

    fleet = Fleet(app)
    for _ in range(3):  # batch may hold 2 of 4: the third waits in line
        fleet.admission.try_acquire("llm", lease_id=fleet.admission.ticket("llm"), join=True)
    fleet.try_acquire("llm", lane="interactive")

    def status(*args: str) -> str:
        result = CliRunner().invoke(
            fleet_cli, ["status", *args, "llm"], obj=SimpleNamespace(app=app)
        )
        assert result.exit_code == 0, result.output
        return result.output

    assert "lane batch   2/2 in flight, 1 waiting (priority 1, may use 50%, owed 2)" in status()
    assert "lane interactive 1/4 in flight, 0 waiting" in status()
    (row,) = json.loads(status("--json"))
    assert row["lanes"] == [
        {"lane": "interactive", "priority": 0, "share": 1.0, "in_flight": 1, "waiting": 0,
         "cap": 4, "guarantee": 0.0, "owed": 0},
        {"lane": "batch", "priority": 1, "share": 0.5, "in_flight": 2, "waiting": 1, "cap": 2,
         "guarantee": 0.5, "owed": 2},
    ]  # fmt: skip
