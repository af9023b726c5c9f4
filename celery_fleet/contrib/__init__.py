"""Adapters to other libraries' interfaces, each needing its own extra.

``pybreaker``: ``fleet.circuit_breaker(name)``, pybreaker's interface on the fleet-wide
breaker (``pip install celery-fleet[pybreaker]``).

``langchain``: ``with_fleet(model, fleet, limit)``, a chat model whose every call holds a
slot, and ``FleetRateLimiter``, LangChain's rate limiter on a fleet limit
(``pip install celery-fleet[langchain]``); ``langchain_usage`` reads a LangChain call's
estimate and usage for it.

``litellm``: ``FleetHook``, a LiteLLM callback holding a slot around every
``litellm.completion`` / ``acompletion`` (``pip install celery-fleet[litellm]``);
``litellm_calls`` reads what LiteLLM tells its callbacks about a call, and watches streams.

``held``: the slots of calls a library starts and ends through callbacks, released after
``max_hold`` when the end never comes (shared by the callback adapters).

``sdk``: ``fleet.wrap(client, limit=...)``, an ``openai``/``anthropic`` client whose model
calls each hold a slot (``sdk_calls``, ``sdk_streams``: its proxies and streams; the SDK is
never imported, the user has it).

``usage``: the tokens every SDK adapter reserves before a call and settles after it;
``stream_usage``: the same read from a response's raw bytes (JSON or server-sent events).

``httpx_transport`` and ``httpx_streams``: the transports behind :mod:`celery_fleet.httpx`
and :mod:`celery_fleet.httpx2` (one slot per model call); they import no HTTP library
themselves (``pip install celery-fleet[httpx]`` / ``[httpx2]``).

``django_celery_beat``: ``JitteredDatabaseScheduler``, django-celery-beat's database
scheduler with beat jitter from a periodic task's headers
(``pip install celery-fleet[django-celery-beat]``).

May import: ``admission``, ``errors``, ``checks``, and ``celery.beat``/``celery.stagger``
(the jitter a beat scheduler applies); the adapted library lazily (a module named after it
may import it at its top: nothing imports that module but the user).
"""
