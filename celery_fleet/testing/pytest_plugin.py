"""Pytest fixtures that start provider simulators and always stop them.

Opt in from a ``conftest.py`` (so the ``provider_sim`` marker is known before collection)::

    pytest_plugins = ["celery_fleet.testing.pytest_plugin"]

    def test_agent(provider_sim):
        client = openai.OpenAI(base_url=provider_sim.base_url, api_key="x", max_retries=0)

    @pytest.mark.provider_sim(max_in_flight=2, latency=0.05)
    def test_tight(provider_sim): ...

    def test_two(make_provider_sim):
        a, b = make_provider_sim(rpm=60), make_provider_sim(tpm=1000)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .provider import ProviderSim

__all__ = ["provider_sim", "make_provider_sim"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "provider_sim(**kwargs): ProviderSim keyword arguments for the provider_sim fixture",
    )


@pytest.fixture
def make_provider_sim() -> Iterator[Callable[..., ProviderSim]]:
    """A factory ``make_provider_sim(**kwargs) -> ProviderSim`` (started); stops them at teardown.

    Keyword arguments are those of :class:`ProviderSim`.
    """
    started: list[ProviderSim] = []

    def make(**kwargs: Any) -> ProviderSim:
        sim = ProviderSim(**kwargs).start()
        started.append(sim)
        return sim

    yield make
    for sim in reversed(started):
        sim.stop()


@pytest.fixture
def provider_sim(
    request: pytest.FixtureRequest, make_provider_sim: Callable[..., ProviderSim]
) -> ProviderSim:
    """A running :class:`ProviderSim` with default limits (rpm 600, tpm 90000, 8 in flight, 0.3 s).

    ``@pytest.mark.provider_sim(**kwargs)`` on the test overrides the arguments.
    """
    marker = request.node.get_closest_marker("provider_sim")
    return make_provider_sim(**(marker.kwargs if marker else {}))
