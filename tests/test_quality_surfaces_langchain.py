"""``with_fleet(model, ...)`` judges the model's messages on a limit with ``quality`` (issue 25).

A real ``ChatOpenAI`` against ProviderSim answering garbage of one kind: ``invoke`` and
``ainvoke`` are judged with the model's ``max_tokens`` and a bound ``response_format``,
``stream``/``astream`` on the message their chunks add up to once read to the end, and a
stream left early is not judged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

pytest.importorskip("langchain_openai")

from langchain_openai import ChatOpenAI

from celery_fleet import Fleet
from celery_fleet.contrib.langchain import with_fleet
from celery_fleet.testing import Phase, ProviderSim

pytest_plugins = ["celery_fleet.testing.pytest_plugin"]
MakeFleet = Callable[..., Fleet]
MakeSim = Callable[..., ProviderSim]
QUALITY = {"min_calls": 1000, "detectors": ["empty", "truncated", "refusal", "json", "schema"]}
ASK = "name three rivers of france and say where each one ends"


@pytest.fixture
def fleet(make_fleet: MakeFleet) -> Fleet:
    return make_fleet({"llm": {"rpm": 10**6, "max_in_flight": 8, "quality": QUALITY}}, max_wait=30)


def chat(make_provider_sim: MakeSim, garbage: str = "", max_tokens: int = 40) -> ChatOpenAI:
    phases = [Phase(0, 10**6, garbage=garbage)] if garbage else []
    sim = make_provider_sim(rpm=None, tpm=None, max_in_flight=None, latency=0.01, phases=phases)
    return ChatOpenAI(
        model="sim", base_url=sim.base_url, api_key="x", max_retries=0, max_tokens=max_tokens,
        stream_usage=True,
    )  # fmt: skip


def counted(fleet: Fleet) -> tuple[int, int, dict[str, int]]:
    fleet.store.drain()
    q = fleet.quality("llm")
    return q.calls, q.garbage, dict(q.reasons)


def test_invoke_and_stream_are_judged(fleet: Fleet, make_provider_sim: MakeSim) -> None:
    good = with_fleet(chat(make_provider_sim), fleet, "llm")
    refusing = with_fleet(chat(make_provider_sim, "refusal"), fleet, "llm")
    for model in (good, refusing):
        assert model.invoke(ASK).content
        assert list(model.stream(ASK))
    assert counted(fleet) == (4, 2, {"refusal": 2})
    cut = with_fleet(chat(make_provider_sim, "truncated", max_tokens=200), fleet, "llm")
    cut.invoke(ASK)  # the model's own max_tokens says how far below it stopped
    good.bind(response_format={"type": "json_object"}).invoke(ASK)  # prose, JSON was asked
    assert counted(fleet) == (6, 4, {"refusal": 2, "truncated": 1, "json": 1})
    for _ in refusing.stream(ASK):
        break  # left early: what was read is not the answer
    assert counted(fleet) == (6, 4, {"refusal": 2, "truncated": 1, "json": 1})


def test_ainvoke_and_astream_are_judged(fleet: Fleet, make_provider_sim: MakeSim) -> None:
    empty = with_fleet(chat(make_provider_sim, "empty"), fleet, "llm")

    async def main() -> None:
        try:
            await empty.ainvoke(ASK)
            async for _ in empty.astream(ASK):
                pass
        finally:
            await fleet.aclose()

    asyncio.run(main())
    assert counted(fleet) == (2, 2, {"empty": 2})
