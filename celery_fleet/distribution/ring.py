"""The fixed hash ring of affinity queues: which queue an affinity key goes to.

Example::

    queue_of("customer:42", 32)                 # -> 17, the same in every process
    affinity_queue_name("fleet", 17)            # -> "fleet.affinity.17"

The hash is BLAKE2b of the key's UTF-8 bytes (8 bytes, read big-endian) modulo the number
of queues: stable across processes, Python versions and restarts, unlike ``hash()``,
which Python salts per process. Queue names are ``<namespace>.affinity.<n>``: with the
default namespace ``fleet`` they are ``fleet.affinity.0`` ... ``fleet.affinity.31``, and
two fleets sharing a broker (two namespaces) keep their queues apart.

Changing the number of queues moves most keys to another queue: keep
``fleet_affinity_queues`` the same in every process of a fleet, and drain the old queues
(any worker started in any mode drains non-empty affinity queues it finds) when changing it.

This module knows nothing about Celery.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = [
    "MODES",
    "DEFAULT_AFFINITY_QUEUES",
    "DEFAULT_STEAL_THRESHOLD",
    "DEFAULT_AFFINITY_LEASE_S",
    "MAX_AFFINITY_QUEUES",
    "DistributionConfig",
    "queue_of",
    "affinity_queue_name",
    "affinity_queue_index",
    "stable_hash",
]

#: ``fleet_distribution``: plain Celery, affinity queues without stealing, or with it.
MODES = ("shared", "dedicated", "steal")
DEFAULT_AFFINITY_QUEUES = 32
DEFAULT_STEAL_THRESHOLD = 4
#: How long a worker's presence and its queues' leases live without renewal (s).
DEFAULT_AFFINITY_LEASE_S = 10.0
#: The most affinity queues: each is one key in the homes script's single round trip.
MAX_AFFINITY_QUEUES = 1024


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process (BLAKE2b, 8 bytes)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def queue_of(key: str, queues: int = DEFAULT_AFFINITY_QUEUES) -> int:
    """The affinity queue (0 .. ``queues - 1``) of an affinity key.

    Example: ``queue_of("customer:42", 32)`` is the same number in every process."""
    if not isinstance(key, str):
        raise ConfigError(f"an affinity key must be a str, got {type(key).__name__}")
    if isinstance(queues, bool) or not isinstance(queues, int) or queues < 1:
        raise ConfigError(f"the number of affinity queues must be an int >= 1, got {queues!r}")
    return stable_hash(key) % queues


def affinity_queue_name(namespace: str, index: int) -> str:
    """The broker queue of affinity queue ``index``: ``<namespace>.affinity.<index>``."""
    return f"{namespace}.affinity.{index}"


def affinity_queue_index(namespace: str, name: str) -> int | None:
    """The index of an affinity queue's broker name, or None for any other queue."""
    prefix = f"{namespace}.affinity."
    if not isinstance(name, str) or not name.startswith(prefix):
        return None
    tail = name[len(prefix) :]
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True)
class DistributionConfig:
    """The validated distribution settings of one fleet.

    Args:
        mode: ``"shared"``, ``"dedicated"`` or ``"steal"`` (``fleet_distribution``).
        queues: the number of affinity queues (``fleet_affinity_queues``).
        steal_threshold: a peer queue deeper than this may be stolen from
            (``fleet_steal_threshold``); stealing stops below half of it.
        lease_s: the lease of a worker's presence and of each queue's home
            (``fleet_affinity_lease``).
        namespace: the fleet's namespace, the prefix of the queue names.
    """

    mode: str = "shared"
    queues: int = DEFAULT_AFFINITY_QUEUES
    steal_threshold: int = DEFAULT_STEAL_THRESHOLD
    lease_s: float = DEFAULT_AFFINITY_LEASE_S
    namespace: str = "fleet"

    @property
    def routes(self) -> bool:
        """True when tasks with an affinity key go to their affinity queue."""
        return self.mode != "shared"

    @property
    def steals(self) -> bool:
        """True when an idle worker consumes deep peer queues."""
        return self.mode == "steal"

    @property
    def low_mark(self) -> int:
        """A stolen queue is given back once its depth falls below this (hysteresis):
        half the threshold, at least 1 (an emptied queue is always given back)."""
        return max(1, self.steal_threshold // 2)

    def queue_name(self, index: int) -> str:
        """The broker name of affinity queue ``index``."""
        return affinity_queue_name(self.namespace, index)

    def queue_for(self, key: str) -> str:
        """The broker name of the affinity queue of ``key``."""
        return self.queue_name(queue_of(key, self.queues))

    def index_of(self, name: str) -> int | None:
        """The index of an affinity queue's broker name (None: not one of this fleet's)."""
        index = affinity_queue_index(self.namespace, name)
        return index if index is not None and index < self.queues else None
