"""The same research agent written the ways people write it today, without celery-fleet.

- ``plain_agent``: a plain task; the OpenAI SDK's default retries (2, with backoff that
  honours ``retry-after``) are the only protection.
- ``autoretry_agent``: Celery's ``autoretry_for`` + ``retry_backoff`` + ``retry_jitter``,
  SDK retries off; a retry starts the agent over, as such tasks usually do.

Used by the demo and ``benchmarks/herd.py`` as the baselines; their workers load this
module with ``-I`` beside the example's app (``Herd.includes``).
"""

from __future__ import annotations

import time
from typing import Any

import openai
from celery import Task

from example_project import model
from example_project.app import app

RETRYABLE = (openai.RateLimitError, openai.APIStatusError, openai.APIConnectionError)


def _run(task: Task, goal: str, steps: int, max_retries: int) -> dict[str, Any]:
    started_at = time.time()
    notes: list[str] = []
    tokens = 0
    for step in range(steps):
        resp = model.ask(model.messages_for(goal, step, notes), task.request.id, max_retries)
        tokens += resp.usage.total_tokens
        notes.append(resp.choices[0].message.content or "")
        notes.extend(model.search(f"{goal} {step}"))
    return model.summary(goal, steps, tokens, started_at)


@app.task(bind=True)
def plain_agent(self: Task, goal: str, steps: int = 5) -> dict[str, Any]:
    return _run(self, goal, steps, max_retries=2)


@app.task(bind=True, autoretry_for=RETRYABLE, retry_backoff=True, retry_jitter=True, max_retries=5)
def autoretry_agent(self: Task, goal: str, steps: int = 5) -> dict[str, Any]:
    return _run(self, goal, steps, max_retries=0)
