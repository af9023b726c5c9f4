"""The agents of the goodput benchmark (``benchmarks/goodput.py``), and what they report.

Both agents make ``steps`` model calls, each in its own ``fleet.slot("model")`` as the
README shows, and use only what the package had before issue 8 as well
(``@fleet_task(bind=True)``, ``fleet.slot``), so the same module runs on the old package
(the benchmark's baseline) and on the new one:

- ``plain_agent``: a loop of slots; a reschedule starts it over (its calls are paid again
  unless the package keeps it waiting in place after its first call).
- ``durable_agent``: the same calls, each wrapped in ``self.step(f"call-{i}", ...)``
  (new package only), so a re-run replays the stored answers instead of paying again.

Every model request carries ``<task id>/call-<i>`` as its ``x-fleet-task-id``, so the
provider's own log tells paid calls from useful ones. What the benchmark needs besides
goes to the fleet's Redis under the worker's namespace (the ``{<ns>:goodput}`` hash tag):

- ``admissions``: a JSON record per admitted slot: task, admission round trips, seconds
  waited, the Redis-clock ``at_ms`` of the admission and, on the new package, the run's
  ``since_ms`` (its age in line);
- ``ages``: task id -> Redis-clock ms just before its first ask (its age, on any package);
- ``reschedules``: a counter, from the ``task_rescheduled`` signal (the old package
  rescheduled with Celery's ``Retry``, so there ``task_retry`` counts them).

A worker loads it with
``celery -A example_project.app worker -I benchmarks.harness.goodput_agents``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import redis
from celery import signals

import celery_fleet
from celery_fleet import FleetTask, fleet_task
from example_project import model
from example_project.app import app

from .goodput import keys

STEPS = 3
AGENTS = ("plain_agent", "durable_agent")
PREFIX = __name__ + "."


@functools.lru_cache(maxsize=2)
def _client(pid: int) -> redis.Redis:
    # Fleet(app) moved any password out of the URL (it stays out of `celery report`)
    return redis.Redis.from_url(
        app.conf.fleet_redis_url, password=app.conf.get("fleet_redis_password")
    )


#: HSETNX of the Redis clock (ms): the age of a task on the clock admission decisions use.
_STAMP = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%.3f', t[1] * 1000 + t[2] / 1000))
end
"""


def _key(name: str) -> str:
    return keys(app.conf.fleet_namespace)[name]


def note_ask(task: FleetTask) -> None:
    """Stamp the task's first ask (called before every slot; only the first one counts)."""
    client = _client(os.getpid())
    client.eval(_STAMP, 1, _key("ages"), task.request.id)


def note_admission(task: FleetTask, slot: Any) -> None:
    """Record one admitted slot (called first thing inside the ``with`` block)."""
    run = getattr(slot, "run", None)  # the new package's Run: the age the line used
    record = {
        "task": task.request.id,
        "attempts": slot.attempts,
        "waited_s": slot.waited_s,
        "at_ms": slot.decision.at_ms,
        "since_ms": getattr(run, "since_ms", None),
    }
    _client(os.getpid()).rpush(_key("admissions"), json.dumps(record))


def call_model(task: FleetTask, goal: str, i: int, notes: list[str]) -> dict[str, Any]:
    """The plain agent's step as a function returning plain data (what a step stores)."""
    note_ask(task)
    with task.fleet.slot("model") as slot:
        note_admission(task, slot)
        resp = model.ask(model.messages_for(goal, i, notes), f"{task.request.id}/call-{i}")
    return {
        "content": resp.choices[0].message.content or "",
        "total_tokens": resp.usage.total_tokens,
    }


def _done(task: FleetTask, goal: str, steps: int, tokens: int, started_at: float) -> dict[str, Any]:
    throttling = getattr(task, "throttling", None)  # the new package's fleet header
    return {
        **model.summary(goal, steps, tokens, started_at),
        "reschedules": throttling.reschedules if throttling is not None else None,
    }


@fleet_task(app=app, bind=True)
def plain_agent(self: FleetTask, goal: str, steps: int = STEPS) -> dict[str, Any]:
    """``steps`` model calls, one slot each (the README's loop); a reschedule starts over."""
    started_at, tokens = time.time(), 0
    notes: list[str] = []
    for i in range(steps):
        note_ask(self)
        with self.fleet.slot("model") as slot:
            note_admission(self, slot)
            resp = model.ask(model.messages_for(goal, i, notes), f"{self.request.id}/call-{i}")
        notes.append(resp.choices[0].message.content or "")
        tokens += resp.usage.total_tokens
    return _done(self, goal, steps, tokens, started_at)


@fleet_task(app=app, bind=True)
def durable_agent(self: FleetTask, goal: str, steps: int = STEPS) -> dict[str, Any]:
    """The same calls as durable steps: a re-run returns the stored answers, unpaid."""
    started_at, tokens = time.time(), 0
    notes: list[str] = []
    for i in range(steps):
        out = self.step(f"call-{i}", call_model, self, goal, i, notes)
        notes.append(out["content"])
        tokens += out["total_tokens"]
    return _done(self, goal, steps, tokens, started_at)


@app.task
def whoami() -> dict[str, Any]:
    """Which celery_fleet this worker imported (the baseline must run the old one)."""
    return {"celery_fleet": celery_fleet.__file__, "pid": os.getpid()}


def _ours(sender: Any) -> bool:
    return str(getattr(sender, "name", "")).removeprefix(PREFIX) in AGENTS


def _count_reschedule(sender: Any = None, **_: Any) -> None:
    if _ours(sender):
        _client(os.getpid()).incr(_key("reschedules"))


try:  # the new package announces reschedules; the old one raised Celery's Retry
    from celery_fleet.signals import task_rescheduled
except ImportError:
    signals.task_retry.connect(_count_reschedule, weak=False)
else:
    task_rescheduled.connect(_count_reschedule, weak=False)
