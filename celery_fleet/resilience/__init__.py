"""What admission does while the fleet's Redis is away, and how it comes back.

Holds the one interface admission asks about the store (``strategy``: Redis alone, or Redis
with a store-down policy), the store-down policy (``fallback``: ``local``, ``open``,
``closed``), the local limiter that keeps each process inside its share of the budgets
(``local_limiter``), the count of live fleet processes that sets that share
(``presence``), and the replay of what was owed to Redis once it answers again
(``replay``).

May import: ``store``, the limiter's value types (``admission.config``,
``admission.decision``), ``errors``, ``checks``. Never Celery.
"""
