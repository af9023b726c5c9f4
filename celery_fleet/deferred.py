"""Deferred messages: kept in the fleet's Redis until due, then handed to one publisher.

A task rescheduled with a countdown is normally an ETA message held, unacknowledged, in the
memory of whichever worker prefetched it: when that worker dies, the task waits for the
broker's ``visibility_timeout`` (an hour by default) before anyone sees it again. Kept
here instead, it waits in Redis, which outlives any worker, and the fleet's leader publishes
it when due (:mod:`celery_fleet.pump`).

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

This module knows nothing about Celery.
"""

from __future__ import annotations

from .checks import MAX_SECONDS, check_name, number
from .store import RedisStore

__all__ = ["Deferred", "DEFAULT_CLAIM_S"]

#: A publisher that took items and neither acknowledged them nor died within this long
#: loses them to the next publisher (seconds).
DEFAULT_CLAIM_S = 30.0
#: The longest item id (a task id and a reschedule count are far shorter).
MAX_ITEM_ID = 512


class Deferred:
    """The fleet's deferred messages in one Redis, under ``namespace``.

    Example::

        deferred = Deferred(store, "fleet")
        deferred.add("task-id:1", 2.5, b"...message...")
        for item_id, message in deferred.take(100):   # 2.5 s later
            publish(message)
        deferred.ack([item_id for item_id, _ in taken])
    """

    def __init__(self, store: RedisStore, namespace: str) -> None:
        self.store = store
        tag = f"{{{check_name(namespace, 'fleet_namespace')}:_deferred}}"
        self.due_key, self.items_key, self.taken_key, self.published_key = (
            f"{tag}:due",
            f"{tag}:items",
            f"{tag}:taken",
            f"{tag}:published",
        )

    def add(self, item_id: str, delay_s: float, message: bytes) -> float:
        """Keep ``message`` until ``delay_s`` from now (Redis clock); returns the due time
        in ms. Adding the same ``item_id`` again replaces it."""
        if not isinstance(item_id, str) or not 0 < len(item_id) <= MAX_ITEM_ID:
            raise ValueError(f"a deferred item id must be a str of 1..{MAX_ITEM_ID} characters")
        delay = number(delay_s, "deferral delay", lo=0.0, hi=MAX_SECONDS)
        due = self.store.run(
            "defer_add",
            keys=[self.due_key, self.items_key],
            args=[item_id, int(delay * 1000), message],
        )
        return float(due)

    def take(self, limit: int = 100, claim_s: float = DEFAULT_CLAIM_S) -> list[tuple[str, bytes]]:
        """Claim up to ``limit`` due items, oldest first: ``[(item id, message), ...]``.
        Nobody else gets them unless this claim lapses (``claim_s``) unacknowledged."""
        reply = self.store.run(
            "defer_take",
            keys=[self.due_key, self.items_key, self.taken_key],
            args=[int(limit), int(claim_s * 1000)],
        )
        out = []
        for i in range(0, len(reply), 2):
            item = reply[i]
            out.append((item.decode() if isinstance(item, bytes) else str(item), reply[i + 1]))
        return out

    def ack(self, item_ids: list[str]) -> int:
        """Forget published items; returns how many were still claimed."""
        if not item_ids:
            return 0
        keys = [self.taken_key, self.items_key, self.published_key]
        return int(self.store.run("defer_ack", keys=keys, args=item_ids))

    def fate(self, item_id: str) -> str:
        """``"waiting"`` (due, or being published), ``"published"`` (within the last day),
        or ``"unknown"``: never deferred here, or lost (Redis restarted empty)."""
        keys = [self.due_key, self.taken_key, self.published_key]
        reply = self.store.run("defer_fate", keys=keys, args=[item_id])
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def pending(self) -> int:
        """How many items wait (due or not), not counting claimed ones."""
        return int(self.store.call("ZCARD", self.due_key))

    def due_in_ms(self, item_id: str) -> float | None:
        """When ``item_id`` is due (Redis ms), or None if it is not waiting."""
        score = self.store.call("ZSCORE", self.due_key, item_id)
        return None if score is None else float(score)
