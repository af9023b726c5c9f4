"""A plain Celery app whose tasks call ``litellm.completion``, under ``FleetHook``.

Run in real ``celery worker`` processes by ``tests/integration/test_litellm_worker.py``,
configured from the environment it sets (broker, namespace, queue, the simulator's URL).
The tasks know nothing of the fleet: the hook, installed once at import, admits their
calls.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
os.environ.setdefault("LITELLM_TELEMETRY", "False")

import litellm  # noqa: E402

from celery_fleet import Fleet, fleet_task  # noqa: E402
from celery_fleet.contrib.litellm import FleetHook  # noqa: E402
from tests.integration.apps import env_app  # noqa: E402

SIM_URL = os.environ.get("FLEET_IT_SIM_URL", "http://127.0.0.1:1/v1")

app = env_app(
    "fleet_litellm_it",
    "FLEET_IT",
    "it-litellm",
    {"sim": {"max_in_flight": 3, "rpm": 600, "burst": 1.0}},
)
fleet = Fleet(app)
litellm.callbacks = [FleetHook(fleet, limit="sim")]


@app.task(shared=False)  # re-imported by every test: never in the shared registry
def ask(i: int) -> int:
    """One model call, as any Celery task makes it: returns the tokens it used."""
    resp = litellm.completion(
        model="openai/sim",
        api_base=SIM_URL,
        api_key="x",
        num_retries=0,
        messages=[{"role": "user", "content": f"question {i}"}],
        max_tokens=50,
    )
    return int(resp.usage.total_tokens)


def _call(i: int) -> dict[str, Any]:
    return {
        "model": "openai/sim",
        "api_base": SIM_URL,
        "api_key": "x",
        "max_retries": 0,  # the SDK's own retries would hide the 429 inside the call
        "messages": [{"role": "user", "content": f"question {i}"}],
        "max_tokens": 50,
    }


@fleet_task(app=app, shared=False)
def ask_in_fleet_task(i: int) -> int:
    """The call in a fleet task's body, with no slot of its own: a provider 429, which
    LiteLLM raises as ``litellm.RateLimitError``, must reschedule the task, not fail it."""
    return int(litellm.completion(**_call(i)).usage.total_tokens)


@fleet_task(app=app, shared=False)
async def aask_in_fleet_task(i: int) -> int:
    """:func:`ask_in_fleet_task` with ``litellm.acompletion``."""
    return int((await litellm.acompletion(**_call(i))).usage.total_tokens)
