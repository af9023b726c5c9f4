"""A run: what one piece of work has done with the fleet, so that waiting never wastes it.

A Celery task, an agent loop or a script opens several slots one after another. The
:class:`Run` they share (through a context variable, so nested code finds it without
plumbing) remembers three things that change how the next slot waits:

- ``since_ms``: the Redis-clock time of the run's first ask, its *age in line*. Every slot
  of the run queues with this age, and a rescheduled task carries it in its headers, so
  work that started earlier is served earlier and a reschedule does not lose its place.
- ``calls``: slots released after a call in this run. Once the run has paid for a call,
  giving up its worker to reschedule would make it pay again (a plain task restarts from
  the top), so with ``wait_after_call`` later slots wait in place instead.
- ``deadline``: the local (monotonic) time at which the run's patience ends
  (``max_throttled``): no wait, in place or by reschedule, goes past it.

:class:`Throttling` is what a run waited so far, as it travels between re-runs (a task's
``fleet`` message header). This module knows nothing about Celery: ``FleetTask`` builds the
Run from its message headers; a plain process may use :func:`running` around a loop of slots.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

from ..checks import MAX_NAME_LENGTH, MAX_SECONDS, MAX_UNITS
from .line import LANE_SPAN

__all__ = ["Run", "Throttling", "current_run", "running"]


@dataclass
class Run:
    """The fleet's memory of one unit of work (see the module docstring).

    Attributes:
        max_wait_s: default ``max_wait`` of the run's slots (None: the fleet's setting).
        since_ms: age in line, Redis-clock ms of the first ask (0 until the first ask).
        calls: slots this run held and released (calls made and paid for).
        wait_after_call: once ``calls > 0``, slots wait in place (up to ``deadline``).
        deadline: monotonic time when the run stops waiting (None: no limit).
        waited_s: seconds this run's slots spent waiting for admission, in place.
        key: the key its slots of limits with keys use when they name none.
    """

    max_wait_s: float | None = None
    since_ms: int = 0
    calls: int = 0
    wait_after_call: bool = False
    deadline: float | None = None
    waited_s: float = 0.0
    #: the key (tenant) of its slots on limits with keys (``@fleet_task(key=...)``)
    key: str | None = None
    #: per limit with keys: the fair-share place (virtual start tag) its waiting slot
    #: held, kept for its next ticket (a reschedule); dropped once admitted
    places: dict[str, float] = field(default_factory=dict)

    def slot_max_wait(self, now: float) -> float | None:
        """The ``max_wait`` the next slot gets when the caller names none.

        After a paid call (with ``wait_after_call``), the rest of the run's patience: all
        of it when it has no ``deadline``. Otherwise ``max_wait_s``, cut to the deadline.
        """
        left = math.inf if self.deadline is None else max(0.0, self.deadline - now)
        if self.wait_after_call and self.calls > 0:
            return left
        if self.max_wait_s is None:
            return None if self.deadline is None else left
        return min(self.max_wait_s, left)


#: The Run of the code running now (a FleetTask sets it around its body).
current_run: ContextVar[Run | None] = ContextVar("celery_fleet_run", default=None)


@contextmanager
def running(run: Run | None = None) -> Iterator[Run]:
    """Make ``run`` (default: a new one) the current Run for the block.

    Example (an agent loop outside Celery)::

        with running(Run(wait_after_call=True)):
            for step in plan:
                with fleet.slot("openai") as slot:
                    ...
    """
    run = run if run is not None else Run()
    token = current_run.set(run)
    try:
        yield run
    finally:
        current_run.reset(token)


@dataclass(frozen=True)
class Throttling:
    """What a task has waited so far, from its ``fleet`` header (all zero on a first run).

    ``since_ms``: its age in line (Redis-clock ms of its first ask); ``reschedules``: how
    often backpressure republished it; ``throttled_s``: seconds spent waiting for
    admission, in place and in reschedule countdowns; ``limit``, ``reason``, ``wait_ms``:
    the last refusal; ``countdown_s``: the last reschedule's countdown (decorrelated backoff
    grows from it).
    """

    since_ms: int = 0
    reschedules: int = 0
    throttled_s: float = 0.0
    limit: str = ""
    reason: str = ""
    wait_ms: int = 0
    countdown_s: float = 0.0
    #: per limit with keys: the place in line its last refused slot held (see Run.places)
    places: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_header(cls, header: object) -> Throttling:
        """Read the header leniently: a missing or foreign one is a first run, and each
        number out of its range (a hand-written header, another version) reads as 0, so a
        bad header never fails the task."""
        if not isinstance(header, dict):
            return cls()

        def bounded(key: str, hi: float) -> float:
            try:
                value = float(header.get(key) or 0)
            except (TypeError, ValueError, OverflowError):
                return 0.0
            return value if 0.0 <= value < hi else 0.0  # NaN fails both comparisons

        return cls(
            since_ms=int(bounded("since_ms", LANE_SPAN)),
            reschedules=int(bounded("reschedules", MAX_UNITS)),
            throttled_s=bounded("throttled_s", MAX_SECONDS),
            limit=str(header.get("limit") or "")[:MAX_NAME_LENGTH],
            reason=str(header.get("reason") or "")[:MAX_NAME_LENGTH],
            wait_ms=int(bounded("wait_ms", MAX_SECONDS * 1000)),
            countdown_s=bounded("countdown_s", MAX_SECONDS),
            places=_places(header.get("places")),
        )

    def as_header(self) -> dict[str, Any]:
        return asdict(self)


def _places(raw: object) -> dict[str, float]:
    """The header's kept places, leniently: at most 16 limits, names and tags bounded."""
    if not isinstance(raw, dict):
        return {}
    out: dict[str, float] = {}
    for name, tag in list(raw.items())[:16]:
        try:
            value = float(tag)
        except (TypeError, ValueError, OverflowError):
            continue
        if isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and 0 <= value < 2**32:
            out[name] = value
    return out
