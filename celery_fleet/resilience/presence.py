"""Which fleet processes are alive: the count the store-down policy shares budgets by.

Every process that admits records itself in one sorted set, ``{<namespace>:_procs}:live``
(process id -> expiry), every time its counters are flushed (:data:`RENEW_S`), with the
slots it holds then (``{<namespace>:_procs}:held``, for ``celery inspect fleet``, which
cannot ask a prefork pool's processes), and reads back how many records are live and its
own rank among them (by id: the free in-flight slots that do not divide evenly during an
outage go to the lowest ranks). When
Redis later becomes unreachable, the local limiter gives each process ``1 / that count``
of every budget (see :mod:`celery_fleet.resilience.fallback`). A process that stops admitting drops
out after :data:`TTL_S`: the processes sharing the budgets are the ones that were using
them.

This module knows nothing about Celery.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..store.specs import PRESENCE

__all__ = ["Presence", "TTL_S", "live_key", "held_key"]

log = logging.getLogger("celery_fleet")

#: A process's record lives this long after its last renewal (seconds).
TTL_S = 30.0
#: How often a process renews its record, at most (seconds; the counters' flush period).
RENEW_S = 2.0


class _Store(Protocol):
    """What presence sends (:class:`~celery_fleet.store.sync.RedisStore`): its script,
    and plain commands to read the held slots and the server's ``run_id``."""

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any: ...

    def call(self, command: str, *args: Any) -> Any: ...


def live_key(namespace: str) -> str:
    return f"{{{namespace}:_procs}}:live"


def held_key(namespace: str) -> str:
    return f"{{{namespace}:_procs}}:held"


class Presence:
    """This process's record in the live set, and the last count read back."""

    def __init__(
        self,
        store: _Store,
        namespace: str,
        held: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.store = store
        self.namespace = namespace
        #: Returns the slots this process holds now (recorded with each renewal).
        self.held = held
        #: Live fleet processes at the last renewal (None: never read).
        self.last_count: int | None = None
        #: This process's place among them, in the order of their ids (None: never read).
        self.rank: int | None = None
        #: Called after each recorded renewal: Redis answered (the store-down policy may be
        #: waiting to hear it, see :meth:`celery_fleet.resilience.fallback.StoreDown.answered`).
        self.on_answer: Callable[[], object] | None = None
        #: The Redis server's ``run_id`` when this process first recorded itself: a
        #: different one later means Redis restarted (and may have lost the fleet's state).
        self.run_id: str | None = None
        self._id: str | None = None
        self._pid: int | None = None

    @property
    def process_id(self) -> str:
        """``<host>:<pid>:<random>``, new in every process (again after a fork)."""
        if self._pid != os.getpid() or self._id is None:
            self._pid = os.getpid()
            self._id = f"{socket.gethostname()}:{self._pid}:{os.urandom(4).hex()}"
        return self._id

    def renew(self) -> int | None:
        """Record this process as live and return the live count (None if Redis is away)."""
        from ..errors import FleetError

        slots = self.held() if self.held is not None else []
        # With the wall time of the record: it is read on this host only (held_by), by a
        # process that knows no other clock of this one.
        held = json.dumps({"at": time.time(), "slots": slots}) if slots else ""
        try:
            count, rank = PRESENCE.run(
                self.store,
                [live_key(self.namespace), held_key(self.namespace)],
                [self.process_id, int(TTL_S * 1000), held],
            )
        except FleetError as exc:
            log.debug("celery-fleet: could not record this process as live: %s", exc)
            return None
        count, self.rank = int(count), int(rank)
        self.last_count = count
        if self.run_id is None:
            self.run_id = self._read_run_id()
        if self.on_answer is not None:
            self.on_answer()
        return count

    def _read_run_id(self) -> str | None:
        try:
            info = self.store.call("INFO", "server")
        except Exception:  # not this round
            return None
        if isinstance(info, dict):  # redis-py parses INFO into a dict
            run_id = info.get("run_id")
            return str(run_id) if run_id else None
        text = info.decode() if isinstance(info, bytes) else str(info)
        for line in text.splitlines():
            if line.startswith("run_id:"):
                return line.split(":", 1)[1].strip()
        return None

    def redis_restarted(self) -> bool:
        """True when Redis's ``run_id`` differs from the one first recorded (it restarted
        since); remembers the new one. False when either is unknown."""
        now = self._read_run_id()
        before, self.run_id = self.run_id, now or self.run_id
        return before is not None and now is not None and now != before

    def held_by(self, pids: Iterable[int], host: str | None = None) -> dict[int, list[Any]]:
        """The slots the live processes ``pids`` of ``host`` (default: this one) held at
        their last renewal (up to :data:`RENEW_S` old), by pid: each as the process
        described it (``LeaseKeeper.describe``: limit, lease, task_id, task, ...), its
        ``held_s`` brought up to now (``renewed_s_ago`` is as of the record), with
        ``recorded_s_ago``, the age of the record (a slot released since still shows until
        the next renewal)."""
        host = host or socket.gethostname()
        wanted = {int(p) for p in pids}
        out: dict[int, list[Any]] = {}
        raw = self.store.call("HGETALL", held_key(self.namespace)) or {}
        now = time.time()
        for key, value in raw.items():
            proc = key.decode() if isinstance(key, bytes) else str(key)
            name, _, rest = proc.partition(":")
            pid = rest.split(":", 1)[0]
            if name == host and pid.isdigit() and int(pid) in wanted:
                out.setdefault(int(pid), []).extend(_aged(json.loads(value), now))
        return out


def _aged(record: Any, now: float) -> list[Any]:
    """The slots of a held record, aged to ``now`` (an older version recorded a bare list)."""
    if not isinstance(record, dict):
        return list(record)
    age = max(0.0, now - float(record.get("at") or now))
    slots = []
    for slot in record.get("slots") or []:
        slot = dict(slot, recorded_s_ago=round(age, 3))
        if isinstance(slot.get("held_s"), (int, float)):
            slot["held_s"] = round(slot["held_s"] + age, 3)
        slots.append(slot)
    return slots
