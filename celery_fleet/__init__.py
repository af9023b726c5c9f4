"""celery-fleet: keep a fleet of LLM agents running as Celery tasks inside a provider's limits.

Example::

    from celery import Celery
    from celery_fleet import Fleet, fleet_task

    app = Celery("proj", broker="redis://127.0.0.1:6379/0")
    app.conf.fleet_limits = {"openai": {"rpm": 500, "tpm": 200_000, "max_in_flight": 20}}
    fleet = Fleet(app)

    @fleet_task(limit="openai", tokens=1500)
    def summarize(doc_id): ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name and the module that defines it. They are imported on first use
# (PEP 562), so ``import celery_fleet`` is cheap and a process that only needs the
# facade (``Fleet``) or ProviderSim never imports Celery.
_EXPORTS: dict[str, str] = {
    "Breaker": ".admission.breaker",
    "BreakerState": ".admission.breaker",
    "LimitConfig": ".admission.config",
    "Backpressure": ".errors",
    "CircuitOpen": ".errors",
    "ConfigError": ".errors",
    "Decision": ".admission.core",
    "Fleet": ".fleet",
    "fleet_task": ".celery.task",
    "FleetError": ".errors",
    "FleetTask": ".celery.task",
    "FOREVER": ".fleet",
    "jitter_options": ".celery.stagger",
    "Jittered": ".celery.beat",
    "jittered": ".celery.beat",
    "Leader": ".coordination.election",
    "LeaseLost": ".errors",
    "Lock": ".coordination.locks",
    "LockLost": ".errors",
    "LockNotAcquired": ".errors",
    "QualityDegraded": ".errors",
    "QualityState": ".quality.breaker",
    "QuotaExhausted": ".errors",
    "Record": ".coordination.records",
    "Release": ".admission.core",
    "Run": ".admission.run",
    "run_async": ".celery.loops",
    "running": ".admission.run",
    "Slot": ".admission.slot",
    "StepError": ".errors",
    "Steps": ".durability.steps",
    "StoreUnavailable": ".errors",
    "THROTTLED": ".celery.task",
    "Throttled": ".errors",
    "ThrottledTooLong": ".errors",
    "Throttling": ".celery.task",
    "Verdict": ".quality.judge",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .admission.breaker import Breaker, BreakerState
    from .admission.config import LimitConfig
    from .admission.core import Decision, Release
    from .admission.run import Run, running
    from .admission.slot import Slot
    from .celery.beat import Jittered, jittered
    from .celery.loops import run_async
    from .celery.stagger import jitter_options
    from .celery.task import THROTTLED, FleetTask, Throttling, fleet_task
    from .coordination.election import Leader
    from .coordination.locks import Lock
    from .coordination.records import Record
    from .durability.steps import Steps
    from .errors import (
        Backpressure,
        CircuitOpen,
        ConfigError,
        FleetError,
        LeaseLost,
        LockLost,
        LockNotAcquired,
        QualityDegraded,
        QuotaExhausted,
        StepError,
        StoreUnavailable,
        Throttled,
        ThrottledTooLong,
    )
    from .fleet import FOREVER, Fleet
    from .quality.breaker import QualityState
    from .quality.judge import Verdict


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'celery_fleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
