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

from .admission import Decision, Release
from .beat import Jittered, jittered
from .breaker import Breaker, BreakerState
from .config import LimitConfig
from .election import Leader
from .errors import (
    Backpressure,
    CircuitOpen,
    ConfigError,
    FleetError,
    LeaseLost,
    LockLost,
    LockNotAcquired,
    QuotaExhausted,
    StepError,
    StoreUnavailable,
    Throttled,
    ThrottledTooLong,
)
from .fleet import FOREVER, Fleet
from .locks import Lock
from .records import Record
from .run import Run, running
from .slot import Slot
from .stagger import jitter_options
from .steps import Steps
from .task import THROTTLED, FleetTask, Throttling, fleet_task

__version__ = "0.1.0"

__all__ = [
    "Backpressure",
    "Breaker",
    "BreakerState",
    "CircuitOpen",
    "ConfigError",
    "Decision",
    "FOREVER",
    "Fleet",
    "FleetError",
    "FleetTask",
    "Jittered",
    "LeaseLost",
    "Leader",
    "LimitConfig",
    "Lock",
    "LockLost",
    "LockNotAcquired",
    "QuotaExhausted",
    "Record",
    "Release",
    "Run",
    "Slot",
    "StepError",
    "Steps",
    "StoreUnavailable",
    "THROTTLED",
    "Throttled",
    "jitter_options",
    "jittered",
    "ThrottledTooLong",
    "Throttling",
    "fleet_task",
    "running",
]
