"""Deferred messages: kept in the fleet's Redis until due, then handed to one publisher.

A task rescheduled with a countdown is normally an ETA message held, unacknowledged, in the
memory of whichever worker prefetched it: when that worker dies, the task waits for the
broker's ``visibility_timeout`` (an hour by default) before anyone sees it again. Kept
here instead, it waits in Redis, which outlives any worker, and the fleet's leader publishes
it when due (:mod:`celery_fleet.celery.pump`).

=================================  ======================================================
``{ns:_deferred}:due``             zset: item id -> due time (ms, Redis clock)
``{ns:_deferred}:items``           hash: item id -> the message (opaque bytes)
``{ns:_deferred}:taken``           zset: item id -> when its publisher's claim lapses (ms)
``{ns:_deferred}:published``       zset: item id -> when it was published (kept a day)
=================================  ======================================================

:meth:`Deferred.take` moves due items to ``taken`` atomically, so two publishers never get
the same item; :meth:`Deferred.ack` forgets them once published. A publisher that dies in
between loses its claim after ``claim_s`` and the items are due again: each message is
published at least once, never lost (a duplicate needs a publisher to die after publishing
and before acknowledging).

Trust: whoever can write to the fleet's Redis could otherwise add an item that the pump
publishes as any registered task with any arguments. So each item is stored with an
HMAC-SHA256 of its id and message under the fleet's signing key
(``fleet_defer_signing_key``, see :func:`celery_fleet.settings.defer_signing_key`), and
:meth:`Deferred.take` hands out only items whose HMAC checks out: any other is dropped at
once (:meth:`Deferred.drop`) with a logged error, never retried. A genuine item dropped
this way (say a worker with another key) is not lost: its broker backup finds it unknown
and runs (:mod:`celery_fleet.celery.reschedule`).

This module knows nothing about Celery.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from ..checks import MAX_SECONDS, check_name, number
from ..errors import ConfigError
from ..store.specs import DEFER_ACK, DEFER_ADD, DEFER_FATE, DEFER_TAKE
from ..store.sync import RedisStore

__all__ = ["Deferred", "DEFAULT_CLAIM_S", "SIGNATURE_PREFIX"]

log = logging.getLogger("celery_fleet")

#: A stored item is ``SIGNATURE_PREFIX + 64 hex digits (HMAC-SHA256) + b"\n" + message``.
SIGNATURE_PREFIX = b"fleet-hmac1:"
_SIGNED_HEAD = len(SIGNATURE_PREFIX) + 64 + 1

#: A publisher that took items and neither acknowledged them nor died within this long
#: loses them to the next publisher (seconds).
DEFAULT_CLAIM_S = 30.0
#: The longest item id (a task id and a reschedule count are far shorter).
MAX_ITEM_ID = 512
#: The most items one :meth:`Deferred.take` claims.
MAX_TAKE = 10_000


class Deferred:
    """The fleet's deferred messages in one Redis, under ``namespace``.

    Example::

        deferred = Deferred(store, "fleet")
        deferred.add("task-id:1", 2.5, b"...message...")
        for item_id, message in deferred.take(100):   # 2.5 s later
            publish(message)
        deferred.ack([item_id for item_id, _ in taken])
    """

    def __init__(self, store: RedisStore, namespace: str, signing_key: bytes | None = None) -> None:
        self.store = store
        ns = check_name(namespace, "fleet_namespace")
        if signing_key is not None and (not isinstance(signing_key, bytes) or not signing_key):
            raise ConfigError("a deferred signing key must be non-empty bytes")
        #: The HMAC key of this fleet's items; without one (tests, a Fleet with no app) a
        #: key anyone can derive from the namespace: it only checks integrity.
        self.signing_key = signing_key or hashlib.sha256(b"celery-fleet:" + ns.encode()).digest()
        tag = f"{{{ns}:_deferred}}"
        self.due_key, self.items_key, self.taken_key, self.published_key = (
            f"{tag}:due",
            f"{tag}:items",
            f"{tag}:taken",
            f"{tag}:published",
        )

    def add(self, item_id: str, delay_s: float, message: bytes) -> float:
        """Keep ``message`` until ``delay_s`` from now (Redis clock); returns the due time
        in ms. Adding the same ``item_id`` again replaces it."""
        _check_ids([item_id])
        if not isinstance(message, bytes):
            raise ConfigError(f"a deferred message must be bytes, got {type(message).__name__}")
        delay = number(delay_s, "deferral delay", lo=0.0, hi=MAX_SECONDS)
        keys = [self.due_key, self.items_key]
        args = [item_id, int(delay * 1000), self.sign(item_id, message)]
        return float(DEFER_ADD.run(self.store, keys, args))

    def sign(self, item_id: str, message: bytes) -> bytes:
        """``message`` as stored: prefixed with the HMAC of the item id and the message."""
        return SIGNATURE_PREFIX + self._mac(item_id, message).encode() + b"\n" + message

    def verify(self, item_id: str, stored: bytes) -> bytes | None:
        """The message of a stored item, or None when its HMAC does not check out (forged,
        altered, another id's, or signed with another key)."""
        if not isinstance(stored, bytes) or not stored.startswith(SIGNATURE_PREFIX):
            return None
        mac, message = stored[len(SIGNATURE_PREFIX) : _SIGNED_HEAD - 1], stored[_SIGNED_HEAD:]
        if stored[_SIGNED_HEAD - 1 : _SIGNED_HEAD] != b"\n":
            return None
        if not hmac.compare_digest(mac, self._mac(item_id, message).encode()):
            return None
        return message

    def _mac(self, item_id: str, message: bytes) -> str:
        body = item_id.encode() + b"\0" + message
        return hmac.new(self.signing_key, body, hashlib.sha256).hexdigest()

    def take(self, limit: int = 100, claim_s: float = DEFAULT_CLAIM_S) -> list[tuple[str, bytes]]:
        """Claim up to ``limit`` due items, oldest first: ``[(item id, message), ...]``.
        Nobody else gets them unless this claim lapses (``claim_s``) unacknowledged."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_TAKE:
            raise ConfigError(f"take(limit=...) must be an int from 1 to {MAX_TAKE}, got {limit!r}")
        claim = number(claim_s, "take(claim_s=...)", lo=0.001, hi=MAX_SECONDS)
        keys = [self.due_key, self.items_key, self.taken_key]
        taken = DEFER_TAKE.run(self.store, keys, [limit, max(1, round(claim * 1000))])
        out, forged = [], []
        for item, stored in taken:
            message = self.verify(item, stored)
            if message is None:
                forged.append(item)
            else:
                out.append((item, message))
        if forged:
            self.drop(forged)
            log.error(
                "celery-fleet: dropped %d deferred item(s) whose signature does not check out "
                "(written to the fleet's Redis by something without fleet_defer_signing_key, "
                "or by a worker with another key; a genuine one runs from its broker "
                "backup): %s",
                len(forged),
                ", ".join(repr(i[:80]) for i in forged[:10]),
            )
        return out

    def drop(self, item_ids: list[str]) -> int:
        """Forget items without publishing them (forged, or refused by the broker);
        returns how many were still claimed. Their fate reads ``"unknown"``."""
        _check_ids(item_ids)
        if not item_ids:
            return 0
        # Three commands, not a script: a rare path, and each step alone is safe (an item
        # whose message is gone is never handed out: defer_take skips and forgets it).
        self.store.call("HDEL", self.items_key, *item_ids)
        self.store.call("ZREM", self.due_key, *item_ids)
        return int(self.store.call("ZREM", self.taken_key, *item_ids))

    def ack(self, item_ids: list[str]) -> int:
        """Forget published items; returns how many were still claimed."""
        _check_ids(item_ids)
        if not item_ids:
            return 0
        keys = [self.taken_key, self.items_key, self.published_key]
        return DEFER_ACK.run(self.store, keys, item_ids)

    def fate(self, item_id: str) -> str:
        """``"waiting"`` (due, or being published), ``"published"`` (within the last day),
        or ``"unknown"``: never deferred here, or lost (Redis restarted empty)."""
        _check_ids([item_id])
        keys = [self.due_key, self.taken_key, self.published_key]
        return DEFER_FATE.run(self.store, keys, [item_id])

    def pending(self) -> int:
        """How many items wait (due or not), not counting claimed ones."""
        return int(self.store.call("ZCARD", self.due_key))

    def due_in_ms(self, item_id: str) -> float | None:
        """When ``item_id`` is due (Redis ms), or None if it is not waiting."""
        _check_ids([item_id])
        score = self.store.call("ZSCORE", self.due_key, item_id)
        return None if score is None else float(score)


def _check_ids(item_ids: object) -> None:
    """Refuse anything but a list of item ids, each a str of 1..MAX_ITEM_ID characters."""
    if not isinstance(item_ids, (list, tuple)) or not all(
        isinstance(i, str) and 0 < len(i) <= MAX_ITEM_ID for i in item_ids
    ):
        raise ConfigError(
            f"deferred item ids must be a list of str of 1..{MAX_ITEM_ID} characters, "
            f"got {str(item_ids)[:60]!r}"
        )
