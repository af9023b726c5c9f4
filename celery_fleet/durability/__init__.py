"""Work that must survive a crash or run once: the idempotency ledger
(``ledger``), durable steps of a run (``steps``) and rescheduled tasks kept in Redis until
due (``deferred``).

May import: ``store``, the shared ``errors``, ``checks``, ``clock``, ``background``. Never
Celery (the Celery side of the ledger is ``celery_fleet.celery.idempotency``).
"""
