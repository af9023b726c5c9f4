"""Adapters to other libraries' interfaces, each needing its own extra.

``pybreaker``: ``fleet.circuit_breaker(name)``, pybreaker's interface on the fleet-wide
breaker (``pip install celery-fleet[pybreaker]``).

``usage``: the tokens every SDK adapter reserves before a call and settles after it;
``stream_usage``: the same read from a response's raw bytes (JSON or server-sent events).

``httpx_transport`` and ``httpx_streams``: the transports behind :mod:`celery_fleet.httpx`
and :mod:`celery_fleet.httpx2` (one slot per model call); they import no HTTP library
themselves (``pip install celery-fleet[httpx]`` / ``[httpx2]``).

May import: ``admission``, ``errors``, ``checks``; the adapted library lazily.
"""
