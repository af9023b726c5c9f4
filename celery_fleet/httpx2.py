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

from typing import Any, ClassVar

try:
    import httpx2  # the real httpx2: imports are absolute
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "celery_fleet.httpx2 needs httpx2: pip install 'celery-fleet[httpx2]'"
    ) from exc

from .contrib.httpx_streams import AsyncMeteredStream, MeteredStream
from .contrib.httpx_transport import (
    DEFAULT_PATHS,
    AsyncTransportMixin,
    SlotSource,
    TransportMixin,
)

__all__ = ["AsyncFleetTransport", "DEFAULT_PATHS", "FleetTransport", "SlotSource"]


class _Stream(MeteredStream, httpx2.SyncByteStream):
    pass


class _AsyncStream(AsyncMeteredStream, httpx2.AsyncByteStream):
    pass


class FleetTransport(TransportMixin, httpx2.BaseTransport):
    """An ``httpx2.Client`` transport holding a slot of ``limit`` for each model call.

    Example::

        http_client = httpx2.Client(transport=FleetTransport(fleet, "openai"))
        client = openai.OpenAI(http_client=http_client, max_retries=0)

    Parameters: ``fleet`` (a :class:`~celery_fleet.Fleet`), ``limit`` (one of its
    limits); keyword-only: ``tokens`` (an int, or a callable over the request's JSON body;
    default :func:`~celery_fleet.contrib.usage.estimate_tokens`; nothing is reserved on a
    limit without a token budget), ``max_wait`` (seconds a call waits for admission;
    default the running task's, else ``fleet_max_wait``), ``paths`` (path suffixes of
    model calls, :data:`DEFAULT_PATHS`), ``pushback`` (``"raise"``: a 429 or an overload
    raises ``Throttled`` once the fleet heard it, as ``fleet.slot`` does, so a task
    reschedules; ``"return"``: the SDK gets the response and raises its own error),
    ``transport`` (the inner transport, default
    ``httpx2.HTTPTransport()``). Checked here: :class:`~celery_fleet.ConfigError` names a
    bad one.
    """

    lib: ClassVar[Any] = httpx2
    stream_class = _Stream


class AsyncFleetTransport(AsyncTransportMixin, httpx2.AsyncBaseTransport):
    """:class:`FleetTransport` for ``httpx2.AsyncClient``: waits with ``fleet.aslot``,
    never blocking the loop; ``transport`` defaults to ``httpx2.AsyncHTTPTransport()``.

    Example::

        http_client = httpx2.AsyncClient(transport=AsyncFleetTransport(fleet, "openai"))
        client = openai.AsyncOpenAI(http_client=http_client, max_retries=0)
    """

    lib: ClassVar[Any] = httpx2
    stream_class = _AsyncStream
