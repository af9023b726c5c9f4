"""Test helpers for celery-fleet, chiefly an OpenAI-compatible provider simulator.

:class:`ProviderSim` serves ``/v1/chat/completions`` with OpenAI's rate-limit behaviour
(RPM and TPM token buckets, a max-in-flight limit, 429s with ``retry-after-ms`` and
``x-ratelimit-*`` headers, or none with ``rate_limit_headers=False``) plus scripted
:class:`Phase` outages, capacity changes (above a user's declared limit too) and garbage
answers of several kinds (:mod:`celery_fleet.testing.garbage`), so tests, the demo and the
benchmarks can watch a fleet against real limits. It also serves Anthropic's
``/v1/messages`` on the same limits (:mod:`celery_fleet.testing.messages`; give
``anthropic.Anthropic(base_url=sim.url)``). Standard library only.

Example::

    from celery_fleet.testing import Phase, ProviderSim

    with ProviderSim(rpm=600, tpm=90_000, max_in_flight=8, latency=0.3,
                     phases=[Phase(start=30, end=40, status=503)]) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)

In pytest: ``pytest_plugins = ["celery_fleet.testing.pytest_plugin"]`` in a conftest gives
the ``provider_sim`` and ``make_provider_sim`` fixtures. From a shell:
``python -m celery_fleet.testing.provider --help``. (:mod:`celery_fleet.testing.redis_server`
finds or starts a Redis for the same tests and benchmarks; :mod:`celery_fleet.testing.chaos`
and :mod:`celery_fleet.testing.faults` are the chaos suite's harness and fault injectors,
Linux only, not imported here.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .buckets import TokenBucket
    from .phases import Limits, Phase, parse_phase
    from .provider import KEEP, ProviderSim, RequestRecord
    from .wire import format_duration, parse_duration

__all__ = [
    "ProviderSim",
    "Phase",
    "Limits",
    "RequestRecord",
    "KEEP",
    "TokenBucket",
    "parse_phase",
    "format_duration",
    "parse_duration",
]

# Imported on first use, so `python -m celery_fleet.testing.provider` does not find its own
# module already imported (runpy warns about that) and importing the package costs nothing.
_HOMES = {
    "ProviderSim": "provider",
    "RequestRecord": "provider",
    "KEEP": "provider",
    "Phase": "phases",
    "Limits": "phases",
    "parse_phase": "phases",
    "TokenBucket": "buckets",
    "format_duration": "wire",
    "parse_duration": "wire",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
