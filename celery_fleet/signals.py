"""The fleet's Celery signals, under the name the README has always used.

The signals live in :mod:`celery_fleet.celery.signals` with the rest of the Celery glue;
connect to them here or there (they are the same objects)::

    from celery_fleet.signals import task_rescheduled, slot_refused
"""

from .celery.signals import (
    breaker_state_changed,
    slot_admitted,
    slot_refused,
    task_rescheduled,
    task_throttled,
)

__all__ = [
    "breaker_state_changed",
    "slot_admitted",
    "slot_refused",
    "task_rescheduled",
    "task_throttled",
]
