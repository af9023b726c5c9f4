"""Who runs where: affinity queues, their home workers, and stealing from them.

A task with an affinity key (``@fleet_task(affinity="customer:{customer_id}")``) goes to
one of a fixed number of affinity queues, chosen by a stable hash of the key
(:mod:`.ring`). Each affinity queue has one home worker at a time, chosen by rendezvous
hashing over the live workers and held as a lease in the fleet's Redis (:mod:`.homes`).
The Celery glue (:mod:`celery_fleet.celery.affinity`) routes tasks at publish and runs
the worker's loop that consumes the queues it holds and, in ``"steal"`` mode, steals
from deep peer queues while idle (:mod:`.steal` decides which, from the broker depths
:mod:`.depths` samples). :mod:`.status` reads each queue's home, depth and counts.

May import: ``store`` and the shared modules (``errors``, ``checks``, ``clock``,
``background``). Never Celery, nor the limiter.
"""

from .homes import Homes, assign, home_scores, queues_of
from .ring import (
    DEFAULT_AFFINITY_LEASE_S,
    DEFAULT_AFFINITY_QUEUES,
    DEFAULT_STEAL_THRESHOLD,
    MODES,
    DistributionConfig,
    affinity_queue_index,
    affinity_queue_name,
    queue_of,
)
from .status import QueueStatus, affinity_status
from .steal import StealPlanner

__all__ = [
    "DEFAULT_AFFINITY_LEASE_S",
    "DEFAULT_AFFINITY_QUEUES",
    "DEFAULT_STEAL_THRESHOLD",
    "MODES",
    "DistributionConfig",
    "Homes",
    "QueueStatus",
    "StealPlanner",
    "affinity_queue_index",
    "affinity_queue_name",
    "affinity_status",
    "assign",
    "home_scores",
    "queue_of",
    "queues_of",
]
