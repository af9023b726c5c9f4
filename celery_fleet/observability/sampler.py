"""The readings behind the fleet page (:mod:`celery_fleet.observability.web`).

A :class:`Sampler` reads every limit's status (:func:`fleet_status`: one read-only round
trip per limit) and its counters (one ``HGETALL``) every ``interval_s`` on a daemon
thread, and keeps the readings of the last ``history_s`` seconds in a ring buffer: the
page's sparklines, and the admissions and waits of the last minute, come from it. However
many browsers watch, Redis is read once per interval. An error (Redis away) is kept as the
reading's error and the thread goes on, so the page recovers by itself.

Example::

    sampler = Sampler(fleet, ["llm"], interval_s=1.0, history_s=300.0)
    sampler.read_once()
    status, body = sampler.document()      # 200 and the /api/status JSON
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .counters import read_counters
from .status import LimitStatus, StatusSource, fleet_status

__all__ = ["ACTIVITY_S", "PageSource", "Reading", "Sampler"]

log = logging.getLogger("celery_fleet")

#: The shortest age (s) of the last reading that makes the page say Redis does not answer.
STALE_MIN_S = 3.0
#: How far back the ``activity`` figures (admissions, refusals, mean wait) look, in seconds.
ACTIVITY_S = 60.0


class PageSource(StatusSource, Protocol):
    """What the page reads of a :class:`~celery_fleet.Fleet`: its status (as
    :func:`fleet_status` does) and its namespace (for the counters)."""

    @property
    def namespace(self) -> str: ...


@dataclass(frozen=True)
class Reading:
    """One reading of the fleet: when (``at``: monotonic s, ``wall``: Unix s, for people)
    and either every limit's status and counters, or the error that prevented it."""

    at: float
    wall: float
    limits: list[LimitStatus] | None
    counters: dict[str, dict[str, float]]
    error: str | None = None


def _point(status: LimitStatus) -> dict[str, Any]:
    """What the sparklines draw of one limit in one reading."""
    return {
        "in_flight": status.in_flight,
        "cap": status.cap,
        "waiting": status.waiting,
        "left": [w.left for w in status.windows],
        "full": [w.full for w in status.windows],
        "lanes": [x.in_flight for x in status.lanes],  # in the order of status.lanes
    }


def _activity(old: Reading, new: Reading, name: str) -> dict[str, Any]:
    """Admissions, refusals and mean wait of ``name`` between two readings (per minute)."""
    a, b = old.counters.get(name, {}), new.counters.get(name, {})
    span_s = max(new.at - old.at, 1e-9)
    admitted = b.get("admitted|", 0.0) - a.get("admitted|", 0.0)
    waited = b.get("wait_sum|", 0.0) - a.get("wait_sum|", 0.0)

    def refused(c: dict[str, float]) -> float:
        return sum(v for k, v in c.items() if k.startswith("refused|"))

    return {
        "span_s": round(span_s, 1),
        "admitted_per_min": round(max(admitted, 0.0) * 60 / span_s, 1),
        "refused_per_min": round(max(refused(b) - refused(a), 0.0) * 60 / span_s, 1),
        "mean_wait_s": round(waited / admitted, 3) if admitted > 0 else None,
    }


class Sampler:
    """Reads the fleet every ``interval_s`` on a daemon thread; keeps the latest reading and
    the readings of the last ``history_s`` seconds (a ring buffer).

    Each reading is one :func:`fleet_status` round trip per limit and one ``HGETALL`` of
    its counters; any exception is kept as the reading's error, so the thread never dies
    with Redis.
    """

    def __init__(
        self,
        fleet: PageSource,
        names: Sequence[str],
        interval_s: float = 1.0,
        history_s: float = 300.0,
    ) -> None:
        self.fleet, self.names = fleet, list(names)
        self.interval_s, self.history_s = interval_s, history_s
        #: A last reading older than this says Redis accepts but does not answer (a frozen
        #: server, under socket and health timeouts longer than this): the page says so
        #: meanwhile rather than showing the old reading as live.
        self.stale_after_s = max(STALE_MIN_S, 3 * interval_s)
        self.readings: deque[Reading] = deque(maxlen=max(2, int(history_s / interval_s) + 1))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read_once(self) -> Reading:
        """Read every limit now and keep the reading (also what the thread does)."""
        at, wall = time.monotonic(), time.time()  # wall: shown to people only
        try:
            rows = fleet_status(self.fleet, self.names)
            ns = self.fleet.namespace
            counters = {n: read_counters(self.fleet.store, ns, n) for n in self.names}
            reading = Reading(at, wall, rows, counters)
        except Exception as exc:  # Redis away, or anything else: the page says so
            reading = Reading(at, wall, None, {}, error=str(exc) or type(exc).__name__)
        with self._lock:
            self.readings.append(reading)
        return reading

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.interval_s
            error = self.read_once().error
            if error is not None:
                log.warning("celery-fleet web: %s", error)
            next_at = max(next_at, time.monotonic())  # after a slow read, no burst

    def start(self) -> None:
        """Start the reading thread (once): its first reading one interval from now."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fleet-web", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def document(self) -> tuple[int, dict[str, Any]]:
        """The ``/api/status`` reply: (HTTP status, JSON body); 503 while Redis is away."""
        with self._lock:
            readings = list(self.readings)
        if not readings:
            return 503, {"ok": False, "error": "no reading yet", "limits": [], "history": {}}
        last = readings[-1]
        good = [r for r in readings if r.limits is not None]
        latest = good[-1] if good else None
        error = last.error
        age_s = time.monotonic() - last.at
        if error is None and age_s > self.stale_after_s:  # a reading hangs: Redis is frozen
            error = f"no answer from Redis for {age_s:.0f} s (a reading is still waiting)"
        body: dict[str, Any] = {
            "ok": error is None,
            "error": error,
            "read_at": latest.wall if latest else None,
            "interval_s": self.interval_s,
            "history_s": self.history_s,
            "limits": [s.as_dict() for s in latest.limits or []] if latest else [],
            "activity": self._activity(good),
            "history": self._history(readings),
        }
        return (200 if body["ok"] else 503), body

    def _activity(self, good: list[Reading]) -> dict[str, Any]:
        if len(good) < 2:
            return {}
        new = good[-1]
        old = next((r for r in good if new.at - r.at <= ACTIVITY_S), good[0])
        if old is new:
            old = good[-2]
        return {name: _activity(old, new, name) for name in self.names}

    def _history(self, readings: list[Reading]) -> dict[str, Any]:
        """Columns for the sparklines: times, and per limit a point per reading (``None``
        where Redis did not answer, so a gap shows as a gap)."""
        series: dict[str, list[dict[str, Any] | None]] = {n: [] for n in self.names}
        for r in readings:
            got = {s.limit: s for s in r.limits or []}
            for name in self.names:
                s = got.get(name)
                series[name].append(None if s is None else _point(s))
        return {"t": [round(r.wall, 3) for r in readings], "limits": series}
