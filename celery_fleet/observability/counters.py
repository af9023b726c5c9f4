"""Fleet-wide event counters for metrics, counted in-process and flushed to Redis in batches.

Admissions, refusals by reason, provider pushback, reschedules and idempotency hits are
counted in a dict of this process (no Redis call on the hot path) and added to Redis by a
daemon thread every :data:`FLUSH_S` seconds, with one ``HINCRBY`` per counter that moved,
all in one pipeline, into a hash per limit, ``{<namespace>:<limit>}:counters`` (field
``name|label``). Every process of the fleet adds its own deltas, so the hash holds the
fleet's totals whichever worker Prometheus scrapes, under prefork too. A process killed
with SIGKILL loses at most its last :data:`FLUSH_S` seconds of counts.

Wait times of admitted slots are counted into fixed buckets (:data:`WAIT_BUCKETS_S`; each
wait into the first bucket whose bound it does not exceed, made cumulative at scrape time),
the form a Prometheus histogram needs.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from ..background import BackgroundLoop

__all__ = ["Counters", "FLUSH_S", "KEYS_LIMIT", "WAIT_BUCKETS_S", "read_counters"]

log = logging.getLogger("celery_fleet")

#: Seconds between two flushes of a process's counts to Redis.
FLUSH_S = 2.0
#: Upper bounds (s) of the wait-time buckets of admitted slots (+Inf is implied).
WAIT_BUCKETS_S = (0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0)
#: The pseudo-limit idempotency counts are kept under (``dedupe|publish``, ``dedupe|replay``).
KEYS_LIMIT = "_keys"
#: The counter hashes expire this long after their last flush.
TTL_MS = 7 * 86_400_000


class _Pipelines(Protocol):
    """A store that sends the flush's writes in one round trip (:class:`RedisStore`)."""

    def write_many(self, commands: Sequence[tuple[Any, ...]]) -> None: ...


class _Renewing(Protocol):
    """This process's presence record, renewed with each flush (:class:`Presence`)."""

    def renew(self) -> object: ...


class _Commands(Protocol):
    """A store that sends one Redis command (:meth:`RedisStore.call`)."""

    def call(self, command: str, *args: Any) -> Any: ...


def counters_key(namespace: str, limit: str) -> str:
    return f"{{{namespace}:{limit}}}:counters"


class Counters:
    """This process's counts not yet flushed (thread-safe), and the thread that flushes.

    Cheap on the hot path: one lock and a few dict updates per event, no system call. A
    forked child starts with no counts (its parent flushes its own) and its own thread.
    """

    def __init__(
        self, store: _Pipelines, namespace: str, presence: _Renewing | None = None
    ) -> None:
        self.store = store
        self.namespace = namespace
        #: Renewed at every flush: this process counts among the live ones while it admits.
        self.presence = presence
        self._counts: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._first_round = True
        self._background = BackgroundLoop(
            self,
            Counters._flush_round,
            "fleet-counters",
            retry_s=FLUSH_S,
            after_fork=Counters._after_fork,
        )

    def add(self, limit: str, field: str, n: float = 1) -> None:
        """Count ``n`` more of ``field`` (``"admitted|"``, ``"refused|in_flight"``...)."""
        with self._lock:
            self._counts[limit, field] = self._counts.get((limit, field), 0) + n
            self._background.start()

    def waited(self, limit: str, seconds: float) -> None:
        """Count one admitted slot, its wait, and the wait's bucket (the first bound it is
        under; the scrape makes them cumulative), under one lock."""
        bucket = _BUCKET_FIELDS[bisect.bisect_left(WAIT_BUCKETS_S, seconds)]
        counts = self._counts
        with self._lock:
            counts[limit, "admitted|"] = counts.get((limit, "admitted|"), 0) + 1
            counts[limit, "wait_sum|"] = counts.get((limit, "wait_sum|"), 0) + seconds
            counts[limit, bucket] = counts.get((limit, bucket), 0) + 1
            self._background.start()

    def _flush_round(self) -> float:
        """The thread's round: flush (not in the first round, which runs at once so that
        the live count is known from the start), renew presence; every :data:`FLUSH_S`."""
        if not self._first_round:
            self.flush()
        self._first_round = False
        if self.presence is not None:
            self.presence.renew()
        return FLUSH_S

    def _after_fork(self) -> None:
        self._counts, self._lock, self._first_round = {}, threading.Lock(), True

    def flush(self) -> int:
        """Add the counts to Redis (one round trip); returns how many fields moved (0 when
        Redis did not take them: they are kept for the next flush)."""
        with self._lock:
            counts, self._counts = self._counts, {}
        if not counts:
            return 0
        touched: set[str] = set()
        commands: list[tuple[Any, ...]] = []
        for (limit, field), n in counts.items():
            key = counters_key(self.namespace, limit)
            touched.add(key)
            if float(n).is_integer():
                commands.append(("HINCRBY", key, field, int(n)))
            else:
                commands.append(("HINCRBYFLOAT", key, field, float(n)))
        # one TTL per hash, after its writes (it exists then)
        commands += [("PEXPIRE", key, TTL_MS) for key in touched]
        try:
            # on the store's wire: a frozen Redis costs the health deadline, not the 5 s
            # socket timeout (Fleet.close() flushes on its way out)
            self.store.write_many(commands)
        except Exception as exc:  # Redis away: keep the counts for the next flush
            with self._lock:
                for k, n in counts.items():
                    self._counts[k] = self._counts.get(k, 0) + n
            log.debug("celery-fleet: could not flush counters: %s", exc)
            return 0
        return len(counts)


#: The field of each wait bucket, and one past the last bound (+Inf).
_BUCKET_FIELDS = (*(f"wait_in|{b:g}" for b in WAIT_BUCKETS_S), "wait_in|+Inf")


def read_counters(store: _Commands, namespace: str, limit: str) -> dict[str, float]:
    """The fleet's totals of ``limit`` (``{"admitted|": 12, "refused|in_flight": 3...}``)."""
    raw = store.call("HGETALL", counters_key(namespace, limit)) or {}
    out = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        out[key] = float(v)
    return out


def watcher(counters: Counters) -> Any:
    """A slot watcher (``Admission.watchers``) that counts admissions with their waits,
    refusals by reason, provider pushback by status and judged calls by verdict."""

    def count(event: str, limit: str, fields: dict[str, Any]) -> None:
        if event == "admitted":
            counters.waited(limit, float(fields.get("waited_s") or 0.0))
        elif event == "refused":
            counters.add(limit, f"refused|{fields.get('reason', '')}")
        elif event == "pushback":
            counters.add(limit, f"pushback|{fields.get('status', '')}")
        elif event == "judged":
            counters.add(limit, f"judged|{fields.get('verdict', '')}")

    return count
