"""Adapters to other libraries' interfaces, each needing its own extra.

``pybreaker``: ``fleet.circuit_breaker(name)``, pybreaker's interface on the fleet-wide
breaker (``pip install celery-fleet[pybreaker]``).

``litellm``: ``FleetHook``, a LiteLLM callback holding a slot around every
``litellm.completion`` / ``acompletion`` (``pip install celery-fleet[litellm]``).

``held``: the slots of calls a library starts and ends through callbacks, released after
``max_hold`` when the end never comes (shared by the callback adapters).

``usage``: the tokens every SDK adapter reserves before a call and settles after it.

May import: ``admission``, ``errors``, ``checks``; the adapted library lazily.
"""
