"""httpx2 transports that put every model call of an SDK under the fleet's limits.

``FleetTransport`` (``httpx2.Client``) and ``AsyncFleetTransport`` (``httpx2.AsyncClient``):
one slot per model call, response headers observed, usage settled from the JSON body or
the stream's events, 429/503/529/5xx reported to the fleet. See
:mod:`celery_fleet.contrib.httpx_transport` for what they do, and
:mod:`celery_fleet.httpx` for the same over httpx. The openai (3.x) and anthropic (2.x)
SDKs make their clients with httpx2; anthropic's accepts no other ``http_client``.
Needs httpx2 (``pip install celery-fleet[httpx2]``)::

    import httpx2, openai
    from celery_fleet.httpx2 import FleetTransport

    client = openai.OpenAI(
        max_retries=0,  # the fleet waits and reschedules: one retry loop, not two
        http_client=httpx2.Client(transport=FleetTransport(fleet, "openai")),
    )
"""

from __future__ import annotations

try:
    import httpx2  # the real httpx2: imports are absolute
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "celery_fleet.httpx2 needs httpx2: pip install 'celery-fleet[httpx2]'"
    ) from exc

from .contrib.httpx_transport import (
    DEFAULT_PATHS,
    AsyncTransportMixin,
    SlotSource,
    TransportMixin,
)

__all__ = ["AsyncFleetTransport", "DEFAULT_PATHS", "FleetTransport", "SlotSource"]


class FleetTransport(TransportMixin, httpx2.BaseTransport, lib=httpx2):
    """An ``httpx2.Client`` transport holding a slot of ``limit`` for each model call; the
    parameters are :class:`~celery_fleet.contrib.httpx_transport.TransportMixin`'s.

    Example::

        http_client = httpx2.Client(transport=FleetTransport(fleet, "openai"))
        client = openai.OpenAI(http_client=http_client, max_retries=0)
    """


class AsyncFleetTransport(AsyncTransportMixin, httpx2.AsyncBaseTransport, lib=httpx2):
    """:class:`FleetTransport` for ``httpx2.AsyncClient``: waits with ``fleet.aslot``,
    never blocking the loop; ``transport`` defaults to ``httpx2.AsyncHTTPTransport()``.

    Example::

        http_client = httpx2.AsyncClient(transport=AsyncFleetTransport(fleet, "openai"))
        client = openai.AsyncOpenAI(http_client=http_client, max_retries=0)
    """
