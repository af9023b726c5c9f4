"""The fleet's tasks: a multi-step research agent and the nightly fan-out.

Every model call holds a slot of the ``model`` limit (requests, tokens and in-flight
budgets, fleet-wide), settles the tokens the provider reports and passes its rate-limit
headers on; the search tool holds a slot of its own limit. A 429 that gets through anyway
leaves the slot as ``Throttled`` (and pauses the limit for the provider's Retry-After): the
task is rescheduled under the same id, never failed, never counted as a retry.

Each model call and each search is a durable step (``self.step``): when the agent runs again
under the same task id (a reschedule, a redelivery after its worker died) the steps it had
done return their stored results, and only the rest is paid for.
"""

from __future__ import annotations

import time
from typing import Any

from celery_fleet import FleetTask, fleet_task

from . import model
from .app import app, fleet

STEPS = 5


@fleet_task(app=app, bind=True, max_retries=3)
def research_agent(self: FleetTask, goal: str, steps: int = STEPS) -> dict[str, Any]:
    """Plan, search and write in ``steps`` model calls; returns a summary and its cost."""
    started_at = time.time()
    notes: list[str] = []
    tokens = 0
    for step in range(steps):
        messages = model.messages_for(goal, step, notes)
        answer = self.step(f"model-{step}", _ask_model, messages, self.request.id)
        tokens += answer["tokens"]
        notes.append(answer["content"])
        notes.extend(self.step(f"search-{step}", _search, f"{goal} {step}"))
    return model.summary(goal, steps, tokens, started_at)


def _ask_model(messages: list[dict[str, str]], task_id: str | None) -> dict[str, Any]:
    """One model call in a slot of the ``model`` limit; returns plain data (a step's result)."""
    with fleet.slot("model", tokens=model.estimate_tokens(messages)) as slot:
        raw = model.ask_raw(messages, task_id)
        slot.observe(raw.headers)
        resp = raw.parse()
        slot.validate(resp)  # an empty answer counts against the breaker
        slot.settle(tokens=resp.usage.total_tokens)
    return {"content": resp.choices[0].message.content or "", "tokens": resp.usage.total_tokens}


def _search(query: str) -> list[str]:
    with fleet.slot("search-api"):
        return model.search(query)


@fleet_task(app=app)
def nightly_batch(topics: list[str]) -> list[str]:
    """Fan the nightly batch out: one research agent per topic (beat runs this at 02:00),
    spread over a minute so the agents do not start in the same millisecond."""
    return [r.id for r in research_agent.fan_out(topics, over=60.0).results]
