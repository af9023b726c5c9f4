"""The idempotency ledger: one record per idempotency key, so a key's work runs once.

A key (``"summarize:doc-42"``) names a unit of work. Its record lives under a hash tag
derived from the key and the namespace, ``{<namespace>:run:<record id>}``
(:func:`record_id_for`):

- ``...:ledger``: ``state`` (``queued`` -> ``running`` -> ``succeeded`` | ``failed``), the
  key, the task, ``run_id`` (the Celery task id of the key's current run), ``attempts``,
  the running attempt's ``owner`` and ``lease_until``, ``publish_until`` (the lease of a
  publish not confirmed yet), times (ms), the stored ``result`` (JSON) or ``error``, and
  ``released`` (a failure gave the key up, so it may be published and run again);
- ``...:history``: a capped stream of every event (queued, running, taken_over, succeeded,
  failed, released, publish_failed, worker_lost), :meth:`Ledger.history`.

Both expire ``ttl_s`` after their last write: that is how long a key dedupes.

A run's task id is new each time a publish starts one (a random UUID the publisher offers,
kept by the script only when the key is free): publishes, retries, reschedules and
redeliveries of one run share it, but a key run again (released after a failure, or its
record lost with a flushed Redis) never inherits an old run's result from the backend.

- :meth:`Ledger.enqueue`: a publish starts a run only if the key is free (atomic across
  processes: one script). The run is queued under a publish lease (``publish_lease_s``)
  until :meth:`Ledger.published` confirms the broker took the message, or undoes the run
  when the publish raised; an unconfirmed run whose lease lapsed frees the key again.
- :meth:`Ledger.claim`: an attempt may run the body when the key is not done and no live
  lease of another attempt holds it; it then holds a lease (ms) that :class:`ClaimKeeper`
  renews, so an attempt whose process died is taken over once the lease lapses (and a key
  whose claim lapsed may be published again).
- :meth:`Ledger.finish`: fenced by the owner: an attempt whose claim was taken over
  records nothing. :meth:`Ledger.lost`: the worker lost the attempt's process.

This module knows nothing about Celery.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from ..background import BackgroundLoop
from ..checks import MAX_SECONDS, number
from ..errors import ConfigError, FleetError
from ..store.specs import (
    LEDGER_CLAIM,
    LEDGER_ENQUEUE,
    LEDGER_FINISH,
    LEDGER_LOST,
    LEDGER_PUBLISHED,
    LEDGER_RENEW,
)
from ..store.sync import RedisStore

__all__ = [
    "Claim",
    "ClaimKeeper",
    "Enqueued",
    "Ledger",
    "record_id_for",
    "MAX_KEY",
    "DEFAULT_LEASE_S",
    "PUBLISH_LEASE_S",
]

log = logging.getLogger("celery_fleet")

#: The namespace of the record ids derived from idempotency keys (fixed: records must be
#: found again; before run ids were per run, this was also the task id).
KEY_NAMESPACE = uuid.UUID("5b8e3f0c-7d1a-4f58-9a55-6c0f1e2d3b4a")
#: The longest idempotency key (it travels in headers and Redis fields).
MAX_KEY = 500
#: How long an attempt's claim lives without renewal; the keeper renews it every third.
DEFAULT_LEASE_S = 15.0
#: How long a publish holds its key before the publisher confirms it (the broker took the
#: message): a publisher that died, or gave up on a frozen Redis, frees the key after it.
PUBLISH_LEASE_S = 30.0
#: Outcomes :meth:`Ledger.finish` records.
OUTCOMES = ("succeeded", "failed", "released", "queued")


def check_key(key: object, where: str = "idempotency key") -> str:
    """A key: a non-empty str of at most :data:`MAX_KEY` characters."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        shown = repr(key) if len(repr(key)) < 60 else f"{repr(key)[:40]}..."
        raise ConfigError(
            f"the {where} must be a non-empty str of at most {MAX_KEY} characters, got {shown}"
        )
    return key


def record_id_for(key: str) -> str:
    """Where the ledger record of idempotency key ``key`` lives (the same everywhere; the
    namespace is in the hash tag). Not a task id: each run has its own (``run_id``)."""
    return str(uuid.uuid5(KEY_NAMESPACE, check_key(key)))


@dataclass(frozen=True)
class Enqueued:
    """What :meth:`Ledger.enqueue` answered: ``new`` (this publish starts run ``run_id``:
    publish it, then confirm) or not (the key is ``state``, run ``run_id``: publish nothing)."""

    new: bool
    run_id: str
    state: str


@dataclass(frozen=True)
class Claim:
    """What :meth:`Ledger.claim` answered.

    ``verdict``: ``"run"`` (this attempt holds the key), ``"done"`` (it succeeded before:
    ``result`` is the stored value), ``"failed"`` (it failed and was kept: ``error``),
    ``"busy"`` (another attempt holds a live lease for ``wait_ms`` more).
    """

    verdict: str
    attempts: int = 0
    taken_over: bool = False
    result: Any = None
    error: str = ""
    wait_ms: int = 0


class Ledger:
    """The ledger records of one fleet's namespace (see the module docstring)."""

    def __init__(
        self,
        store: RedisStore,
        namespace: str,
        ttl_s: float,
        publish_lease_s: float = PUBLISH_LEASE_S,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.ttl_ms = int(number(ttl_s, "fleet_dedupe_ttl", lo=1.0, hi=MAX_SECONDS) * 1000)
        self.publish_lease_s = publish_lease_s

    def keys(self, record_id: str) -> list[str]:
        tag = f"{{{self.namespace}:run:{record_id}}}"
        return [f"{tag}:ledger", f"{tag}:history"]

    def enqueue(self, record_id: str, key: str, task: str, run_id: str | None = None) -> Enqueued:
        """Start a run of ``key`` under ``run_id`` (default: a new UUID) if the key is free.

        Not new when the key is queued (confirmed, or under a live publish lease), running
        under a live claim, succeeded, or failed and kept: publish nothing then, the answer
        names the live run. A new run holds the key ``publish_lease_s`` unless
        :meth:`published` confirms it.
        """
        run_id = run_id or str(uuid.uuid4())
        lease_ms = max(1, int(self.publish_lease_s * 1000))
        args = [key, task, self.ttl_ms, run_id, lease_ms]
        reply = LEDGER_ENQUEUE.run(self.store, self.keys(record_id), args)
        if reply.started:
            return Enqueued(True, reply.run_id, reply.state)
        # a record written before run ids were per run: its run id was the record id
        return Enqueued(False, reply.run_id or record_id, reply.state)

    def published(self, record_id: str, run_id: str, sent: bool, error: str = "") -> bool:
        """Confirm (``sent``) or undo (the publish raised: failed and released) the run
        :meth:`enqueue` started; False when the key is no longer queued under ``run_id``."""
        args = [run_id, "sent" if sent else "failed", error, self.ttl_ms]
        return LEDGER_PUBLISHED.run(self.store, self.keys(record_id), args)

    def lost(self, record_id: str, task_id: str, release: bool, error: str) -> bool:
        """End the claim an attempt of task ``task_id`` holds, its process lost (SIGKILL,
        OOM) and its message not redelivered: failed, released when ``release``."""
        args = [task_id, "1" if release else "0", error, self.ttl_ms]
        return LEDGER_LOST.run(self.store, self.keys(record_id), args)

    def claim(
        self,
        record_id: str,
        key: str,
        task: str,
        owner: str,
        lease_s: float,
        singleton: bool,
        task_id: str = "",
    ) -> Claim:
        """May attempt ``owner`` (of task ``task_id``) run the body of ``key``? (See
        :class:`Claim`.)"""
        args = [owner, int(lease_s * 1000), self.ttl_ms, key, task, "1" if singleton else "0"]
        args.append(task_id or owner.split("/", 1)[0])
        reply = LEDGER_CLAIM.run(self.store, self.keys(record_id), args)
        if reply.verdict == "run":
            return Claim("run", attempts=int(reply.detail), taken_over=reply.taken_over)
        if reply.verdict == "done":
            raw = _text(reply.detail)
            return Claim("done", result=json.loads(raw) if raw else None)
        if reply.verdict == "failed":
            return Claim("failed", error=_text(reply.detail))
        return Claim("busy", wait_ms=int(reply.detail))

    def finish(self, record_id: str, owner: str, outcome: str, payload: str = "") -> bool:
        """Record how attempt ``owner`` ended; False when its claim was no longer its own."""
        if outcome not in OUTCOMES:
            raise FleetError(f"ledger outcome must be one of {OUTCOMES}, got {outcome!r}")
        args = [owner, outcome, payload, self.ttl_ms]
        return LEDGER_FINISH.run(self.store, self.keys(record_id), args)

    def renew(self, claims: list[tuple[str, str]], lease_s: float) -> list[bool]:
        """Extend the leases of ``(record_id, owner)`` claims in one round trip."""
        if not claims:
            return []
        keys = [self.keys(record_id)[0] for record_id, _ in claims]
        args = [owner for _, owner in claims] + [int(lease_s * 1000)]
        return LEDGER_RENEW.run(self.store, keys, args)

    def record(self, record_id: str) -> dict[str, str]:
        """The ledger hash of ``record_id`` as text (empty when unknown or expired)."""
        raw = self.store.call("HGETALL", self.keys(record_id)[0]) or {}
        return {_text(k): _text(v) for k, v in raw.items()}

    def history(self, record_id: str) -> list[dict[str, str]]:
        """Every event of the key, oldest first: ``{"id", "event", "at", ...}``."""
        entries = self.store.call("XRANGE", self.keys(record_id)[1], "-", "+") or []
        return [
            {"id": _text(entry_id), **{_text(k): _text(v) for k, v in fields.items()}}
            for entry_id, fields in entries
        ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ClaimKeeper:
    """One daemon thread per process renewing the ledger claims its attempts hold.

    Renews every ``lease_s / 3``; a claim it finds no longer its own (taken over after this
    process stalled past the lease) is logged and dropped.
    """

    def __init__(self, ledger: Ledger, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.ledger = ledger
        self.lease_s = lease_s
        self._held: dict[tuple[str, str], None] = {}
        self._lock = threading.Lock()
        self._background = BackgroundLoop(
            self, ClaimKeeper._renew_round, "fleet-claims", retry_s=lease_s / 3.0
        )

    def hold(self, record_id: str, owner: str) -> None:
        with self._lock:
            self._held[record_id, owner] = None
            self._background.start()

    def drop(self, record_id: str, owner: str) -> None:
        with self._lock:
            self._held.pop((record_id, owner), None)

    def renew_now(self) -> None:
        with self._lock:
            claims = list(self._held)
        if not claims:
            return
        try:
            kept = self.ledger.renew(claims, self.lease_s)
        except FleetError:
            log.warning("celery-fleet: could not renew %d ledger claim(s)", len(claims))
            return
        for claim, ok in zip(claims, kept, strict=True):
            if not ok:
                self.drop(*claim)
                log.error(
                    "celery-fleet: the ledger claim of run %s is no longer this attempt's "
                    "(it lapsed and another attempt took it over, or it finished)",
                    claim[0],
                )

    def _renew_round(self) -> float:
        """The thread's round: renew every held claim at once, then pause a third of
        the lease."""
        every_s = self.lease_s / 3.0
        self.renew_now()
        return every_s
