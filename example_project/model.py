"""How the agents talk to the model and to the search tool.

The model is any OpenAI-compatible endpoint (``OPENAI_BASE_URL``; the demo points it at
``celery_fleet.testing.ProviderSim``). One client per process, created lazily because
Celery forks its workers after importing this module.
"""

from __future__ import annotations

import functools
import math
import os
import random
import threading
import time
from typing import Any

import openai
import openai.resources.chat  # noqa: F401  (imported before Celery forks, not in every child)
from openai.types.chat import ChatCompletion  # noqa: F401

MODEL = os.environ.get("EXAMPLE_MODEL", "sim-model")
MAX_TOKENS = 200


#: Threads (``-P threads``) that all start with a call would each build a client (~30 ms of
#: CPU apiece under the GIL: 0.8 s for 30 threads, a stall that bunches their requests).
_client_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _client(pid: int, max_retries: int) -> Any:
    return openai.OpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
        api_key=os.environ.get("OPENAI_API_KEY", "sim"),
        max_retries=max_retries,
        timeout=30.0,
    )


def client(max_retries: int = 0) -> Any:
    """This process's OpenAI client. Under the fleet ``max_retries=0``: one retry loop."""
    with _client_lock:
        return _client(os.getpid(), max_retries)


def messages_for(goal: str, step: int, notes: list[str]) -> list[dict[str, str]]:
    context = "\n".join(notes[-3:])
    return [
        {"role": "system", "content": "You are a careful research agent. Be brief."},
        {"role": "user", "content": f"Goal: {goal}\nStep {step}.\nNotes so far:\n{context}"},
    ]


def estimate_tokens(messages: list[dict[str, str]], max_tokens: int = MAX_TOKENS) -> int:
    """What the provider will charge on arrival: prompt characters / 4 + max_tokens."""
    chars = sum(len(m["content"]) for m in messages)
    return math.ceil(chars / 4) + max_tokens


def ask(messages: list[dict[str, str]], task_id: str | None, max_retries: int = 0) -> Any:
    """One chat completion; the task id travels in a header so the provider log shows it."""
    return client(max_retries).chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=MAX_TOKENS,
        extra_headers={"x-fleet-task-id": task_id or "direct"},
    )


def ask_raw(messages: list[dict[str, str]], task_id: str | None) -> Any:
    """The same call, keeping the HTTP response so its rate-limit headers can be read."""
    return client(0).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,
        max_tokens=MAX_TOKENS,
        extra_headers={"x-fleet-task-id": task_id or "direct"},
    )


def has_content(resp: Any) -> bool:
    """The ``validate`` hook: a 200 whose answer is empty is garbage."""
    return bool(resp.choices and (resp.choices[0].message.content or "").strip())


def summary(goal: str, steps: int, tokens: int, started_at: float) -> dict[str, Any]:
    """What an agent returns: its goal, cost and the wall-clock span it ran in."""
    return {
        "goal": goal,
        "steps": steps,
        "tokens": tokens,
        "started_at": started_at,
        "finished_at": time.time(),
    }


def search(query: str) -> list[str]:
    """A fake search API: 20-60 ms, three results."""
    time.sleep(random.uniform(0.02, 0.06))
    return [f"{query} result {i}" for i in range(3)]
