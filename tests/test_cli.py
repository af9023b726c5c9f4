"""``celery fleet``: click's runner against real Redis, and the real command as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest
import redis
from celery import Celery
from click.testing import CliRunner, Result

from celery_fleet import Fleet
from celery_fleet.durability.ledger import record_id_for
from celery_fleet.observability.cli import fleet as fleet_cli

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {
    "llm": {"requests": "60/minute", "burst": 10 / 60, "max_in_flight": 5},
    "tool": {"max_in_flight": 4, "breaker": True, "adaptive": True},
}


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[Celery]:
    celery = Celery("cli_test", broker=redis_url, set_as_current=False)
    celery.conf.update(fleet_redis_url=redis_url, fleet_namespace=namespace, fleet_limits=LIMITS)
    yield celery


def run(app: Celery, *args: str) -> Result:
    return CliRunner().invoke(fleet_cli, list(args), obj=SimpleNamespace(app=app))


def status(app: Celery, *limits: str) -> dict[str, Any]:
    result = run(app, "status", "--json", *limits)
    assert result.exit_code == 0, result.output
    return {s["limit"]: s for s in json.loads(result.output)}


def test_status_reads_budgets_leases_and_breaker_from_redis(app: Celery) -> None:
    fleet = Fleet(app)
    before = status(app)
    assert before["llm"]["windows"] == [{"window": "60 requests/60s", "left": 10, "full": 10}]
    assert before["llm"]["in_flight"] == 0 and before["llm"]["cap"] == 5
    held = [fleet.try_acquire("llm") for _ in range(3)]
    time.sleep(0.3)
    now = status(app, "llm")["llm"]
    assert now["windows"][0]["left"] == 7 and now["in_flight"] == 3
    assert 0.3 <= now["oldest_lease_s"] < 5
    for d in held:
        fleet.release(d)
    tool = status(app, "tool")["tool"]
    assert tool["breaker"] == "closed" and tool["adaptive_cap"] is not None
    text = run(app, "status").output
    assert "llm\n  in flight    0/5" in text and "7 left now (holds 10)" in text
    assert "breaker      closed" in text


def test_breaker_switches_and_reset(app: Celery) -> None:
    fleet = Fleet(app)
    assert run(app, "breaker", "open", "tool").output == "tool: breaker open (forced open)\n"
    assert fleet.breaker("tool").state().forced == "open"
    assert not fleet.try_acquire("tool")  # the whole fleet sees it
    assert run(app, "breaker", "close", "tool").exit_code == 0
    assert fleet.breaker("tool").state().forced == "closed"
    assert run(app, "breaker", "auto", "tool").exit_code == 0
    assert fleet.breaker("tool").state().forced is None
    for _ in range(4):
        fleet.try_acquire("llm")
    assert status(app, "llm")["llm"]["windows"][0]["left"] == 6
    result = run(app, "reset", "llm", "--what", "buckets")
    assert result.exit_code == 0 and "windows refilled" in result.output
    assert status(app, "llm")["llm"]["windows"][0]["left"] == 10


def test_history_of_a_key(app: Celery) -> None:
    fleet = Fleet(app)
    key = f"cli:{uuid.uuid4().hex[:8]}"
    run_id = record_id_for(key)
    fleet.ledger.enqueue(run_id, key, "proj.summarize")
    fleet.ledger.claim(run_id, key, "proj.summarize", "me", 10, False)
    fleet.ledger.finish(run_id, "me", "succeeded", "42")
    out = json.loads(run(app, "history", key, "--json").output)
    assert [e["event"] for e in out["events"]] == ["queued", "running", "succeeded"]
    assert out["record"]["state"] == "succeeded" and out["record"]["result"] == "42"
    text = run(app, "history", key).output
    assert text.startswith(f"{key}: succeeded, 1 attempt(s)") and "running" in text


@pytest.mark.parametrize("as_json", [(), ("--json",)])
def test_history_of_an_unknown_key_is_one_line_on_stderr_and_exit_1(
    app: Celery, as_json: tuple[str, ...]
) -> None:
    result = run(app, "history", f"never-published-{uuid.uuid4().hex[:8]}", *as_json)
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "no record of key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_forced_open_breaker_shows_no_probe(app: Celery) -> None:
    # A forced-open breaker sends no probe: a countdown to one would never reach zero.
    assert run(app, "breaker", "open", "tool").exit_code == 0
    text = run(app, "status", "tool").output
    assert "breaker      open (forced open)\n" in text, text
    assert "probe" not in text
    assert status(app, "tool")["tool"]["breaker_retry_s"] == 0.0


def test_every_json_option_has_help(app: Celery) -> None:
    for name, command in fleet_cli.commands.items():
        for param in command.params:
            if "--json" in getattr(param, "opts", ()):
                assert param.help, f"fleet {name} --json has no help text"


def test_every_option_has_help_and_no_markup_shows(app: Celery) -> None:
    """``--help`` is read in a terminal: an option without help, or reST's double
    backticks in a command's text, reads as unfinished (``fleet watch`` had both)."""
    for name, command in fleet_cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"fleet {name} {param.opts[0]} has no help text"
        text = run(app, name, "--help").output
        assert "``" not in text, f"fleet {name} --help shows reST markup:\n{text}"


@pytest.mark.parametrize(
    "args, message",
    [
        (("status", "nope"), "unknown limit 'nope'"),
        (("breaker", "open", "llm"), "breaker"),
        (("reset", "llm", "--what", "breaker"), "has no breaker"),
    ],
)
def test_mistakes_are_one_line_and_exit_1(app: Celery, args: tuple[str, ...], message: str) -> None:
    result = run(app, *args)
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("interval", ["nan", "inf", "-inf", "0", "1e400", "x"])
def test_a_bad_watch_interval_is_a_usage_error(app: Celery, interval: str) -> None:
    result = run(app, "watch", "--interval", interval, "--count", "1")
    assert result.exit_code == 2 and "Invalid value for '--interval'" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_an_unreachable_redis_is_one_line(app: Celery) -> None:
    app.conf.fleet_redis_url = "redis://127.0.0.1:1/0"
    result = run(app, "status")
    assert result.exit_code == 1 and "cannot reach Redis at redis://127.0.0.1:1/0" in result.output
    assert "Traceback" not in result.output


def test_the_installed_command_runs_with_no_worker(redis_url: str) -> None:
    """`celery -A ... fleet` through Celery's entry point, as an operator runs it."""
    ns = f"cli-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "FLEET_IT_REDIS": redis_url, "FLEET_IT_NS": ns,
           "FLEET_IT_BROKER": redis_url, "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, "-m", "celery", "-A", "tests.integration.fleet_app", "fleet"]
    try:
        done = subprocess.run([*cmd, "status", "--json", "model", "broken"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        got = {s["limit"]: s for s in json.loads(done.stdout)}
        assert got["model"]["cap"] == 3 and got["broken"]["breaker"] == "closed"
        bad = subprocess.run([*cmd, "status", "nope"], env=env, capture_output=True,
                             text=True, timeout=60, check=False)  # fmt: skip
        assert bad.returncode == 1 and "unknown limit 'nope'" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        client = redis.Redis.from_url(redis_url)
        for k in client.scan_iter(match=f"*{ns}*"):
            client.delete(k)
        client.close()
