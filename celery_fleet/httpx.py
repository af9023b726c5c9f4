"""httpx transports that put every model call of an SDK under the fleet's limits.

``FleetTransport`` (``httpx.Client``) and ``AsyncFleetTransport`` (``httpx.AsyncClient``):
one slot per model call, response headers observed, usage settled from the JSON body or
the stream's events, 429/503/529/5xx reported to the fleet. See
:mod:`celery_fleet.contrib.httpx_transport` for what they do, and
:mod:`celery_fleet.httpx2` for the same over httpx2 (what the SDKs use by default).
Needs httpx (``pip install celery-fleet[httpx]``)::

    import httpx, openai
    from celery_fleet.httpx import FleetTransport

    client = openai.OpenAI(
        max_retries=0,  # the fleet waits and reschedules: one retry loop, not two
        http_client=httpx.Client(transport=FleetTransport(fleet, "openai")),
    )
"""

from __future__ import annotations

try:
    import httpx  # the real httpx: imports are absolute
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("celery_fleet.httpx needs httpx: pip install 'celery-fleet[httpx]'") from exc

from .contrib.httpx_transport import (
    DEFAULT_PATHS,
    AsyncTransportMixin,
    SlotSource,
    TransportMixin,
)

__all__ = ["AsyncFleetTransport", "DEFAULT_PATHS", "FleetTransport", "SlotSource"]


class FleetTransport(TransportMixin, httpx.BaseTransport, lib=httpx):
    """An ``httpx.Client`` transport holding a slot of ``limit`` for each model call; the
    parameters are :class:`~celery_fleet.contrib.httpx_transport.TransportMixin`'s.

    Example::

        http_client = httpx.Client(transport=FleetTransport(fleet, "openai"))
        client = openai.OpenAI(http_client=http_client, max_retries=0)
    """


class AsyncFleetTransport(AsyncTransportMixin, httpx.AsyncBaseTransport, lib=httpx):
    """:class:`FleetTransport` for ``httpx.AsyncClient``: waits with ``fleet.aslot``,
    never blocking the loop; ``transport`` defaults to ``httpx.AsyncHTTPTransport()``.

    Example::

        http_client = httpx.AsyncClient(transport=AsyncFleetTransport(fleet, "openai"))
        client = openai.AsyncOpenAI(http_client=http_client, max_retries=0)
    """
