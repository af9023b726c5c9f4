"""The Celery glue, and only that: everything that needs a Celery app.

Holds the binding of a Fleet to an app (``app``), the task base class and decorator
(``task``) and the decorator's options (``options``), backpressure reschedules
(``reschedule``), the signals (``signals``), pool checks (``pools``), the deferred-task
pump bootstep (``pump``), beat jitter (``beat``), staggered fan-out (``stagger``),
idempotency keys at publish (``idempotency``), async task bodies (``loops``), and affinity
queues: routing at publish and the worker bootstep (``affinity``) running the distribution
loop (``distributor``).

May import: anything in the package. Imported by the facade only through ``app.bind``
(when a Fleet is given an app), by the public aliases and by ``celery_fleet.testing``.
"""
