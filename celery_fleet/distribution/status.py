"""What the affinity queues look like now: each queue's home, depth and counts.

Example::

    for row in affinity_status(fleet.store, fleet.distribution, depths={0: 3}):
        print(row.queue, row.home, row.depth, row.stolen)

The counts are fleet totals kept in the hash ``{<ns>:affinity}:stats``: each worker adds,
about every half second, how many tasks it received from each affinity queue as that
queue's home (``local|<n>``, locality hits) and as a thief or a leftover consumer
(``stolen|<n>``). A worker killed with SIGKILL loses its last half second of counts.

This module knows nothing about Celery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .ring import DistributionConfig

__all__ = ["QueueStatus", "affinity_status", "stats_key", "home_key", "read_stats", "STATS_TTL_MS"]

#: The stats hash expires this long after its last update (ms).
STATS_TTL_MS = 7 * 86_400_000


class _Commands(Protocol):
    def call(self, command: str, *args: Any) -> Any: ...


def stats_key(namespace: str) -> str:
    """The hash of the fleet's affinity counts."""
    return f"{{{namespace}:affinity}}:stats"


def home_key(namespace: str, queue: int) -> str:
    """The lease of queue ``queue``'s home (see :mod:`.homes`)."""
    return f"{{{namespace}:affinity}}:home:{queue}"


@dataclass(frozen=True)
class QueueStatus:
    """One affinity queue: its broker name, home worker ("" none), depth (None: not
    sampled), and the fleet's counts of tasks run by its home and stolen from it."""

    queue: int
    name: str
    home: str
    depth: int | None
    local: int
    stolen: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_stats(store: _Commands, namespace: str) -> dict[str, int]:
    """The fleet's affinity counts (``{"local|3": 120, "stolen|3": 7, ...}``)."""
    raw = store.call("HGETALL", stats_key(namespace)) or {}
    return {(k.decode() if isinstance(k, bytes) else str(k)): int(float(v)) for k, v in raw.items()}


def affinity_status(
    store: _Commands, config: DistributionConfig, depths: Mapping[int, int] | None = None
) -> list[QueueStatus]:
    """Every affinity queue now: its home (the worker's nodename), depth and counts."""
    keys = [home_key(config.namespace, q) for q in range(config.queues)]
    holders = store.call("MGET", *keys) or [None] * config.queues
    stats = read_stats(store, config.namespace)
    rows = []
    for q, holder in enumerate(holders):
        owner = holder.decode() if isinstance(holder, bytes) else (holder or "")
        rows.append(
            QueueStatus(
                queue=q,
                name=config.queue_name(q),
                home=owner.rsplit("/", 1)[0],
                depth=None if depths is None else depths.get(q),
                local=stats.get(f"local|{q}", 0),
                stolen=stats.get(f"stolen|{q}", 0),
            )
        )
    return rows
