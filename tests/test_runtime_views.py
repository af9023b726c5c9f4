"""Limits changed at runtime as the operator sees them: ``celery fleet set-limit`` /
``reset-limit`` (click's runner, real Redis), status, Prometheus and the Flower row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner, Result
from prometheus_client import generate_latest

from celery_fleet import Fleet
from celery_fleet.observability.cli import fleet as fleet_cli
from celery_fleet.observability.metrics import InfoStep, fleet_registry

LIMITS = {"llm": {"requests": "60/minute", "max_in_flight": 5}, "tool": {"max_in_flight": 2}}


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[Celery]:
    celery = Celery("runtime_cli", broker=redis_url, set_as_current=False)
    celery.conf.update(fleet_redis_url=redis_url, fleet_namespace=namespace, fleet_limits=LIMITS)
    yield celery


def run(app: Celery, *args: str) -> Result:
    return CliRunner().invoke(fleet_cli, list(args), obj=SimpleNamespace(app=app))


def other_process(app: Celery) -> Fleet:
    """A Fleet of the same app config, as another process (a worker) would build it."""
    conf = app.conf
    return Fleet(redis_url=conf.fleet_redis_url, namespace=conf.fleet_namespace, limits=LIMITS)


def status(app: Celery, limit: str) -> dict[str, Any]:
    result = run(app, "status", "--json", limit)
    assert result.exit_code == 0, result.output
    row: dict[str, Any] = json.loads(result.output)[0]
    return row


def test_set_limit_and_reset_limit_from_the_command(app: Celery) -> None:
    worker = other_process(app)
    assert status(app, "llm")["config_version"] == 0
    done = run(app, "set-limit", "llm", "--rpm", "900", "--max-in-flight", "16")
    assert done.exit_code == 0, done.output
    assert "max_in_flight=16, rpm=900" in done.output
    row = status(app, "llm")
    version = row["config_version"]
    assert version > 0 and row["cap"] == 16
    assert row["config_fields"] == {"max_in_flight": 16, "rpm": 900}
    assert row["windows"][0]["window"] == "900 requests/60s"
    assert (
        f"config       version {version} (max_in_flight=16, rpm=900)"
        in run(app, "status", "llm").output
    )
    worker.admission.runtime.sync()  # what its poller does every half second
    assert worker.limits["llm"].max_in_flight == 16

    more = run(app, "set-limit", "llm", "--requests", "100/second", "--json")
    assert json.loads(more.output)["fields"] == {"max_in_flight": 16, "requests": "100/second"}

    reset = run(app, "reset-limit", "llm")
    assert reset.exit_code == 0 and "as configured" in reset.output, reset.output
    after = status(app, "llm")
    assert after["config_version"] > version and after["cap"] == 5
    assert after["config_fields"] == {}
    assert "(as configured)" in run(app, "status", "llm").output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--rpm", "0"), "['rpm'] must be a positive int, got 0"),
        (("--headroom", "1.5"), "['headroom']"),
        (("--tokens", "lots"), "cannot parse 'lots'"),
        ((), "changes nothing"),
    ],
)
def test_a_bad_value_is_one_line_and_changes_nothing(
    app: Celery, args: tuple[str, ...], message: str
) -> None:
    result = run(app, "set-limit", "llm", *args)
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    row = status(app, "llm")
    assert (row["config_version"], row["cap"]) == (0, 5)


def test_an_unknown_limit_is_one_line(app: Celery) -> None:
    result = run(app, "reset-limit", "nope")
    assert result.exit_code == 1 and "unknown limit 'nope'" in result.stderr


def test_metrics_show_the_version_and_the_values_in_force(app: Celery) -> None:
    writer, scraped = Fleet(app), other_process(app)

    def sample(name: str, limit: str) -> float:
        text = generate_latest(fleet_registry(scraped)).decode()
        for line in text.splitlines():
            if line.startswith(f"celery_fleet_{name}{{") and f'limit="{limit}"' in line:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name} for {limit}")

    assert sample("limit_config_version", "llm") == 0
    version = writer.set_limit("llm", max_in_flight=9)
    assert sample("limit_config_version", "llm") == version
    assert sample("in_flight_cap", "llm") == 9  # the cap gauge follows
    assert sample("limit_config_version", "tool") == 0


def test_the_flower_row_shows_the_version(app: Celery) -> None:
    fleet = Fleet(app)
    version = fleet.set_limit("tool", max_in_flight=3)
    worker = SimpleNamespace(app=app)
    info = InfoStep(worker).info(worker)
    assert info["fleet: tool"] == (f"in flight 0/3, 0 waiting, config v{version} (max_in_flight=3)")
