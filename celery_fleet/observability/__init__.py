"""Seeing the fleet: event counters flushed to Redis (``counters``), the
status rows every view shares (``status``), Prometheus metrics and the worker's
``inspect fleet`` (``metrics``), the ``celery fleet`` command (``cli``, the entry point
Celery loads in every ``celery`` process, which imports nothing of the package until the
command runs its ``commands``) and its live page
(``web``, reading through ``sampler``).

May import: the core packages, ``settings``, the facade (``fleet``) and Celery itself;
not the Celery glue (``celery_fleet.celery``).
"""
