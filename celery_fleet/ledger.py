"""The idempotency ledger: one record per idempotency key, so a key's work runs once.

A key (``"summarize:doc-42"``) names a unit of work. Its run id is a UUID derived from it
(:func:`run_id_for`), which a Celery task uses as its task id, so every publish, retry,
reschedule and redelivery of the key is one run. The ledger of a run is a Redis hash beside
its durable steps, under the same hash tag ``{<namespace>:run:<run id>}``:

- ``...:ledger``: ``state`` (``queued`` -> ``running`` -> ``succeeded`` | ``failed``), the
  key, the task, ``attempts``, the running attempt's ``owner`` and ``lease_until``, times
  (ms), the stored ``result`` (JSON) or ``error``, and ``released`` (a failure gave the key
  up, so it may be published and run again);
- ``...:history``: a capped stream of every event (queued, running, taken_over, succeeded,
  failed, released, queued again), :meth:`Ledger.history`;
- ``...:steps``: the durable steps (:mod:`celery_fleet.steps`).

All three expire ``ttl_s`` after their last write: that is how long a key dedupes.

- :meth:`Ledger.enqueue`: a publish is new only if the key is not queued, running or done
  (atomic across processes: one script).
- :meth:`Ledger.claim`: an attempt may run the body when the key is not done and no live
  lease of another attempt holds it; it then holds a lease (ms) that :class:`ClaimKeeper`
  renews, so an attempt whose process died is taken over once the lease lapses.
- :meth:`Ledger.finish`: fenced by the owner: an attempt whose claim was taken over
  records nothing.

This module knows nothing about Celery.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from .checks import MAX_SECONDS, number
from .errors import ConfigError, FleetError
from .store import RedisStore

__all__ = ["Claim", "ClaimKeeper", "Ledger", "run_id_for", "MAX_KEY", "DEFAULT_LEASE_S"]

log = logging.getLogger("celery_fleet")

#: The namespace of the UUIDs derived from idempotency keys (fixed: ids must not change).
KEY_NAMESPACE = uuid.UUID("5b8e3f0c-7d1a-4f58-9a55-6c0f1e2d3b4a")
#: The longest idempotency key (it travels in headers and Redis fields).
MAX_KEY = 500
#: How long an attempt's claim lives without renewal; the keeper renews it every third.
DEFAULT_LEASE_S = 15.0
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


def run_id_for(key: str) -> str:
    """The run id (a Celery task id) of idempotency key ``key``: the same everywhere."""
    return str(uuid.uuid5(KEY_NAMESPACE, check_key(key)))


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

    def __init__(self, store: RedisStore, namespace: str, ttl_s: float) -> None:
        self.store = store
        self.namespace = namespace
        self.ttl_ms = int(number(ttl_s, "fleet_dedupe_ttl", lo=1.0, hi=MAX_SECONDS) * 1000)

    def keys(self, run_id: str) -> list[str]:
        tag = f"{{{self.namespace}:run:{run_id}}}"
        return [f"{tag}:ledger", f"{tag}:history"]

    def enqueue(self, run_id: str, key: str, task: str) -> bool:
        """Record a publish of ``key``; False when the key is already queued, running or
        done (publish nothing then)."""
        new, _ = self.store.run("ledger_enqueue", self.keys(run_id), [key, task, self.ttl_ms])
        return bool(new)

    def claim(
        self, run_id: str, key: str, task: str, owner: str, lease_s: float, singleton: bool
    ) -> Claim:
        """May attempt ``owner`` run the body of ``key``? (See :class:`Claim`.)"""
        args = [owner, int(lease_s * 1000), self.ttl_ms, key, task, "1" if singleton else "0"]
        reply = self.store.run("ledger_claim", self.keys(run_id), args)
        verdict = _text(reply[0])
        if verdict == "run":
            return Claim("run", attempts=int(reply[1]), taken_over=bool(int(reply[2])))
        if verdict == "done":
            raw = _text(reply[1])
            return Claim("done", result=json.loads(raw) if raw else None)
        if verdict == "failed":
            return Claim("failed", error=_text(reply[1]))
        return Claim("busy", wait_ms=int(reply[1]))

    def finish(self, run_id: str, owner: str, outcome: str, payload: str = "") -> bool:
        """Record how attempt ``owner`` ended; False when its claim was no longer its own."""
        if outcome not in OUTCOMES:
            raise FleetError(f"ledger outcome must be one of {OUTCOMES}, got {outcome!r}")
        args = [owner, outcome, payload, self.ttl_ms]
        return bool(self.store.run("ledger_finish", self.keys(run_id), args))

    def renew(self, claims: list[tuple[str, str]], lease_s: float) -> list[bool]:
        """Extend the leases of ``(run_id, owner)`` claims in one round trip."""
        if not claims:
            return []
        keys = [self.keys(run_id)[0] for run_id, _ in claims]
        args = [owner for _, owner in claims] + [int(lease_s * 1000)]
        return [bool(x) for x in self.store.run("ledger_renew", keys, args)]

    def record(self, run_id: str) -> dict[str, str]:
        """The ledger hash of ``run_id`` as text (empty when unknown or expired)."""
        raw = self.store.call("HGETALL", self.keys(run_id)[0]) or {}
        return {_text(k): _text(v) for k, v in raw.items()}

    def history(self, run_id: str) -> list[dict[str, str]]:
        """Every event of the run, oldest first: ``{"id", "event", "at", ...}``."""
        entries = self.store.call("XRANGE", self.keys(run_id)[1], "-", "+") or []
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
        self._thread: threading.Thread | None = None
        self._pid = 0

    def hold(self, run_id: str, owner: str) -> None:
        with self._lock:
            self._held[run_id, owner] = None
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=_keep, args=(weakref.ref(self),), name="fleet-claims", daemon=True
                )
                self._thread.start()

    def drop(self, run_id: str, owner: str) -> None:
        with self._lock:
            self._held.pop((run_id, owner), None)

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


def _keep(ref: weakref.ref[ClaimKeeper]) -> None:
    while True:
        keeper = ref()
        if keeper is None:
            return
        every = keeper.lease_s / 3.0
        keeper.renew_now()
        del keeper
        threading.Event().wait(every)
