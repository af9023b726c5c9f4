"""The tasks and beat entries of the beat benchmark (``benchmarks/beat.py``): the 02:00 fan-out.

``ENTRIES`` beat entries on one crontab (``crontab(minute="*")``: every minute) each run
:func:`kickoff`, which publishes ``AGENTS`` :func:`agent` tasks; each agent makes one or
two model calls (``1 + index % 2``) through ``fleet.slot("model")`` with the ``openai``
SDK, as ``example_project.tasks`` does. The variant comes from the environment:

- ``BEAT_VARIANT=plain``: the bare crontab; the kickoff calls ``apply_async`` per agent;
- ``BEAT_VARIANT=jitter``: ``jittered(crontab(minute="*"), max_delay=BEAT_JITTER)``; the
  kickoff calls ``agent.fan_out(items, over=BEAT_OVER)``.

Unset, no entries are configured (a worker does not need them). What the benchmark
measures goes to the list ``BEAT_EVENTS`` in the fleet's Redis, one JSON record each, with
the wall-clock time ``t`` of this host (one host, so the clocks are the same):

- ``publish`` (``before_task_publish``, in beat for kickoffs, in the worker for agents):
  task id, ``parent`` (the kickoff of an agent) and the message's ``eta``;
- ``start`` (``task_prerun``), ``done`` / ``failed`` (``task_success`` / ``task_failure``);
- ``admit``: an agent's admitted slot, with its ``attempts`` (asks; more than one: it was
  refused and waited in place) and ``waited_s``;
- ``resched``: ``celery_fleet.signals.task_rescheduled`` (a refusal that republished the task).

Run: ``celery -A benchmarks.harness.beat_agents beat`` and
``celery -A example_project.app worker -I benchmarks.harness.beat_agents``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import redis
from celery import signals
from celery.schedules import crontab

from celery_fleet import FleetTask, fleet_task, jittered
from celery_fleet.signals import task_rescheduled
from example_project import model
from example_project.app import app

__all__ = ["app", "agent", "kickoff"]

ENTRIES = int(os.environ.get("BEAT_ENTRIES", "3"))
AGENTS = int(os.environ.get("BEAT_AGENTS", "20"))
EVENTS = os.environ.get("BEAT_EVENTS", "beat:events")
OURS = {f"{__name__}.agent": "agent", f"{__name__}.kickoff": "kickoff"}


@functools.lru_cache(maxsize=2)
def _client(pid: int) -> redis.Redis:
    # Fleet(app) moved any password out of the URL (it stays out of `celery report`)
    return redis.Redis.from_url(
        app.conf.fleet_redis_url, password=app.conf.get("fleet_redis_password")
    )


def note(ev: str, task_id: str | None, **fields: Any) -> None:
    """Append one event record (see the module docstring) to the ``BEAT_EVENTS`` list."""
    record = {"ev": ev, "id": task_id, "t": time.time(), **fields}
    _client(os.getpid()).rpush(EVENTS, json.dumps(record))


@fleet_task(app=app, bind=True)
def agent(self: FleetTask, entry: str, index: int, calls: int) -> int:
    """``calls`` model calls, each in a slot of the ``model`` limit; returns the tokens used."""
    notes: list[str] = []
    tokens = 0
    for step in range(calls):
        messages = model.messages_for(f"{entry} agent {index}", step, notes)
        with self.fleet.slot("model", tokens=model.estimate_tokens(messages)) as slot:
            note("admit", self.request.id, attempts=slot.attempts, waited_s=slot.waited_s)
            raw = model.ask_raw(messages, self.request.id)
            slot.observe(raw.headers)
            resp = raw.parse()
            slot.settle(tokens=resp.usage.total_tokens)
        notes.append(resp.choices[0].message.content or "")
        tokens += resp.usage.total_tokens
    return tokens


@app.task
def kickoff(entry: str, variant: str, agents: int, over_s: float) -> int:
    """Publish ``agents`` agents: all at once (``plain``) or ``fan_out`` over ``over_s``."""
    items = [(entry, i, 1 + i % 2) for i in range(agents)]
    if variant == "jitter":
        agent.fan_out(items, over=over_s)
    else:
        for item in items:
            agent.apply_async(item)
    return agents


def beat_schedule(variant: str, jitter_s: float, over_s: float) -> dict[str, dict[str, Any]]:
    """``ENTRIES`` entries on the same crontab, jittered in the ``jitter`` variant."""
    if variant == "jitter":

        def every_minute() -> Any:
            return jittered(crontab(minute="*"), max_delay=jitter_s)
    else:

        def every_minute() -> Any:
            return crontab(minute="*")

    return {
        f"nightly-{i}": {
            "task": kickoff.name,
            "schedule": every_minute(),
            "args": (f"nightly-{i}", variant, AGENTS, over_s),
        }
        for i in range(ENTRIES)
    }


if os.environ.get("BEAT_VARIANT"):
    app.conf.beat_schedule = beat_schedule(
        os.environ["BEAT_VARIANT"],
        float(os.environ.get("BEAT_JITTER", "20")),
        float(os.environ.get("BEAT_OVER", "30")),
    )


@signals.before_task_publish.connect(weak=False)
def _on_publish(sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    if sender in OURS and headers:
        parent = headers.get("parent_id")
        note("publish", headers.get("id"), task=OURS[sender], parent=parent, eta=headers.get("eta"))


@signals.task_prerun.connect(weak=False)
def _on_start(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if getattr(sender, "name", None) in OURS:
        note("start", task_id, task=OURS[sender.name])


@signals.task_success.connect(weak=False)
def _on_done(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) in OURS:
        note("done", sender.request.id, task=OURS[sender.name])


@signals.task_failure.connect(weak=False)
def _on_failure(sender: Any = None, task_id: str | None = None, **kw: Any) -> None:
    if getattr(sender, "name", None) in OURS:
        note("failed", task_id, task=OURS[sender.name], error=repr(kw.get("exception")))


@task_rescheduled.connect(weak=False)
def _on_rescheduled(sender: Any = None, request: Any = None, exc: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) in OURS:
        note("resched", getattr(request, "id", None), reason=getattr(exc, "reason", None))
