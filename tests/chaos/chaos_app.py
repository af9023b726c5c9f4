"""The Celery app the chaos scenarios run in real `celery worker` processes.

Configured from ``CHAOS_*`` environment variables set by the scenario (``scenarios.py``):
the broker, the fleet's Redis and the probe Redis are private redis-servers, so a scenario
can stop, empty, freeze or slow one without touching anything else. Tasks record what
they did in the probe Redis (:class:`celery_fleet.testing.chaos.Probe`), never in the
fleet's, which the faults hit.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from celery_fleet import Fleet, FleetTask, Throttled, fleet_task
from celery_fleet.testing.chaos import Probe

BROKER = os.environ.get("CHAOS_BROKER", "redis://127.0.0.1:6379/10")
PROBE = os.environ.get("CHAOS_PROBE", BROKER)
NAMESPACE = os.environ.get("CHAOS_NS", "chaos")
CAP = int(os.environ.get("CHAOS_CAP", "4"))
LEASE_S = float(os.environ.get("CHAOS_LEASE", "2"))
PROVIDER = os.environ.get("CHAOS_PROVIDER", "http://127.0.0.1:1/v1")
RESET_S = float(os.environ.get("CHAOS_RESET", "2"))

LIMITS: dict[str, Any] = {
    "cap": {"max_in_flight": CAP, "lease": LEASE_S},
    "llm": {
        "max_in_flight": 8,
        "breaker": {"failure_rate": 0.5, "min_calls": 4, "window": 10, "reset_timeout": RESET_S},
    },
}

app = Celery("fleet_chaos", broker=BROKER, backend=PROBE)
app.conf.update(
    fleet_redis_url=os.environ.get("CHAOS_FLEET", BROKER),
    fleet_namespace=NAMESPACE,
    fleet_limits=LIMITS,
    fleet_claim_lease=3,  # a killed attempt's key is taken over within 3 s
    fleet_max_countdown=float(os.environ.get("CHAOS_MAX_COUNTDOWN", "10")),
    task_default_queue=os.environ.get("CHAOS_QUEUE", "fleet-chaos"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
fleet = Fleet(app)
probe = Probe(PROBE, NAMESPACE)


def _guarded(field: str, hold_s: float) -> None:
    """Holds a slot of 'cap' for ``hold_s`` inside the probe's section, then counts one
    completion of ``field`` unless the killer chose this process first."""
    with fleet.slot("cap", max_wait=120):
        probe.enter()
        try:
            time.sleep(hold_s)
        except BaseException:
            probe.out()
            raise
        if not probe.leave(field):
            time.sleep(120)  # doomed: the killer's SIGKILL is on its way


# -- SIGKILL storm, duplicate storm, broker down: keyed tasks, early and late ack ------------


@fleet_task(app=app, shared=False, idempotency_key="early:{tag}:{i}")
def keyed_early(tag: str, i: int, hold_s: float) -> int:
    """Celery's default early ack: a SIGKILLed run is lost unless published again."""
    _guarded(f"early:{i}", hold_s)
    return i


@fleet_task(
    app=app,
    shared=False,
    idempotency_key="late:{tag}:{i}",
    acks_late=True,
    reject_on_worker_lost=True,
)
def keyed_late(tag: str, i: int, hold_s: float) -> int:
    """At-least-once delivery: a SIGKILLed run is redelivered by the broker."""
    _guarded(f"late:{i}", hold_s)
    return i


# -- the fleet's Redis restarted empty, frozen, slowed --------------------------------------


@fleet_task(app=app, shared=False)
def patient(i: int, hold_s: float, max_wait: float) -> int:
    """Asks for a slot of 'cap' with ``max_wait``; records how long the ask took, whether
    the slot was local (the store-down policy's), and counts holders per kind."""
    asked = time.monotonic()
    try:
        with fleet.slot("cap", max_wait=max_wait) as slot:
            waited = time.monotonic() - asked
            local = bool(slot.lease_id and str(slot.lease_id).startswith("local."))
            section = "local" if local else "inside"
            probe.enter(section)
            probe.enter("all")  # Redis and local holders together (the hand-over's overlap)
            try:
                time.sleep(hold_s)
            finally:
                probe.out(section)
                probe.out("all")
    except Throttled:
        _record_wait(time.monotonic() - asked, max_wait, "throttled", False)
        raise
    except Exception as exc:
        probe.client.rpush(probe.key("errors"), f"{type(exc).__name__}: {exc}"[:300])
        raise
    _record_wait(waited, max_wait, "admitted", local)
    probe.client.hincrby(probe.key("done"), f"patient:{i}", 1)
    return i


def _record_wait(waited_s: float, max_wait: float, outcome: str, local: bool) -> None:
    record = {
        "waited_s": round(waited_s, 3),
        "max_wait": max_wait,
        "outcome": outcome,
        "local": local,
        "pid": os.getpid(),
        "ended": round(time.time(), 3),  # wall clock: matched against the faults' times
    }
    probe.client.rpush(probe.key("waits"), json.dumps(record))


# -- provider outage: 503s open the breaker fleet-wide --------------------------------------


@fleet_task(app=app, shared=False)
def call_provider(i: int) -> int:
    """One chat completion through a slot of 'llm'; a 503 leaves the slot as an overload
    (Throttled: the task reschedules), an open breaker refuses admission (CircuitOpen)."""
    import httpx

    body = {"model": "sim", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 8}
    with fleet.slot("llm", max_wait=30):
        response = httpx.post(f"{PROVIDER}/chat/completions", json=body, timeout=30)
        response.raise_for_status()
    probe.client.hincrby(probe.key("done"), f"call:{i}", 1)
    return i


# -- Celery time limits inside fleet.slot ------------------------------------------------


@fleet_task(app=app, shared=False, soft_time_limit=1, time_limit=30)
def soft_overrun(i: int, hold_s: float) -> str:
    """Holds a slot past its soft time limit: SoftTimeLimitExceeded is raised in the slot."""
    with fleet.slot("cap", max_wait=60):
        probe.client.hincrby(probe.key("done"), f"soft:{i}", 1)
        try:
            time.sleep(hold_s)
        except SoftTimeLimitExceeded:
            probe.client.incr(probe.key("soft_limits"))
            raise
    return "finished"


@fleet_task(app=app, shared=False, time_limit=1)
def hard_overrun(i: int, hold_s: float) -> str:
    """Holds a slot past its hard time limit: the pool kills the child inside the slot."""
    with fleet.slot("cap", max_wait=60):
        probe.client.hincrby(probe.key("done"), f"hard:{i}", 1)
        time.sleep(hold_s)
    return "finished"


__all__ = ["FleetTask", "app", "fleet", "probe"]
