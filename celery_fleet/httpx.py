"""httpx transports that put every model call of an SDK under the fleet's limits.

The implementation lives in :mod:`celery_fleet.contrib.httpx_transport`; this is its
public name. Needs httpx (``pip install celery-fleet[httpx]``)::

    import httpx, openai
    from celery_fleet.httpx import AsyncFleetTransport, FleetTransport

    client = openai.OpenAI(
        max_retries=0,
        http_client=httpx.Client(transport=FleetTransport(fleet, "openai")),
    )
"""

from __future__ import annotations

try:
    import httpx  # noqa: F401  (the real httpx: imports are absolute)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("celery_fleet.httpx needs httpx: pip install 'celery-fleet[httpx]'") from exc

from .contrib.httpx_transport import (
    DEFAULT_PATHS,
    AsyncFleetTransport,
    FleetTransport,
    SlotSource,
)

__all__ = ["AsyncFleetTransport", "DEFAULT_PATHS", "FleetTransport", "SlotSource"]
