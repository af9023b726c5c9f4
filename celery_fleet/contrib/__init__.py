"""Adapters to other libraries' interfaces, each needing its own extra.

``pybreaker``: ``fleet.circuit_breaker(name)``, pybreaker's interface on the fleet-wide
breaker (``pip install celery-fleet[pybreaker]``).

May import: ``admission``, ``errors``, ``checks``; the adapted library lazily.
"""
