"""LiteLLM's ``FleetHook`` judges answers itself on a limit with ``quality`` (issue 25).

The real LiteLLM against ProviderSim answering garbage of one kind: ``completion`` and
``acompletion`` are judged with the body LiteLLM sent, streams on the complete response
LiteLLM assembles for its success event, and each verdict rides on its slot's release.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_fleet import Fleet
from celery_fleet.testing import Phase
from tests.test_litellm import (
    FleetHook,  # imported there after LiteLLM's environment is set (no network at import)
    ProviderSim,
    _callbacks,  # noqa: F401 - the autouse fixture restoring litellm's global lists
    _install,
    _kw,
    litellm,
)
from tests.test_litellm_streams import pytestmark  # noqa: F401 - LiteLLM's own warnings

pytest_plugins = ["celery_fleet.testing.pytest_plugin"]
MakeFleet = Callable[..., Fleet]
MakeSim = Callable[..., ProviderSim]
QUALITY = {"min_calls": 1000, "detectors": ["empty", "truncated", "refusal", "json", "schema"]}


@pytest.fixture(autouse=True)
def _collect_litellms_leftovers() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture
def fleet(make_fleet: MakeFleet) -> Fleet:
    return make_fleet({"sim": {"rpm": 10**6, "max_in_flight": 8, "quality": QUALITY}}, max_wait=30)


def sim(make_provider_sim: MakeSim, garbage: str = "") -> ProviderSim:
    phases = [Phase(0, 10**6, garbage=garbage)] if garbage else []
    return make_provider_sim(rpm=None, tpm=None, max_in_flight=None, latency=0.01, phases=phases)


def kw(server: ProviderSim, **extra: Any) -> dict[str, Any]:
    return {**_kw(server), **extra}


def counted(fleet: Fleet, hook: FleetHook, calls: int) -> tuple[int, int, dict[str, int]]:
    """The breaker's count once ``calls`` were counted (a stream's end is logged later)."""
    deadline = time.monotonic() + 20
    while True:
        fleet.store.drain()
        q = fleet.quality("sim")
        if (q.calls >= calls and not hook.holding) or time.monotonic() > deadline:
            return q.calls, q.garbage, dict(q.reasons)
        time.sleep(0.02)


def test_completion_and_its_stream_are_judged(fleet: Fleet, make_provider_sim: MakeSim) -> None:
    hook = FleetHook(fleet, limit="sim")
    _install(hook)
    good, refusing = sim(make_provider_sim), sim(make_provider_sim, "refusal")
    try:
        for server in (good, refusing):
            reply = litellm.completion(**kw(server, max_tokens=40))
            assert reply.choices[0].message.content
            chunks = list(litellm.completion(**kw(server, max_tokens=40, stream=True)))
            assert chunks
        assert counted(fleet, hook, 4) == (4, 2, {"refusal": 2})
        litellm.completion(**kw(good, max_tokens=40, response_format={"type": "json_object"}))
        assert counted(fleet, hook, 5) == (5, 3, {"refusal": 2, "json": 1})
    finally:
        hook.close()


def test_acompletion_and_its_stream_are_judged(fleet: Fleet, make_provider_sim: MakeSim) -> None:
    hook = FleetHook(fleet, limit="sim")
    _install(hook)
    cut = sim(make_provider_sim, "truncated")

    async def main() -> None:
        try:
            await litellm.acompletion(**kw(cut, max_tokens=200))
            stream = await litellm.acompletion(
                **kw(cut, max_tokens=200, stream=True, stream_options={"include_usage": True})
            )
            async for _ in stream:
                pass
            deadline = time.monotonic() + 20  # the stream's end is logged by a task,
            # whose release is awaited after the hook lets go of the call: wait for both
            while hook.holding or fleet.admission.in_flight("sim"):
                assert time.monotonic() < deadline, "still held"
                await asyncio.sleep(0.01)
        finally:
            await fleet.aclose()

    try:
        asyncio.run(main())
        assert counted(fleet, hook, 2) == (2, 2, {"truncated": 2})
    finally:
        hook.close()


def test_a_call_on_a_limit_without_quality_is_not_judged(
    make_fleet: MakeFleet, make_provider_sim: MakeSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_fleet.admission.slot import Slot

    judged: list[Any] = []
    monkeypatch.setattr(Slot, "judge", lambda self, resp, **asked: judged.append(resp))
    fleet = make_fleet({"sim": {"rpm": 10**6, "max_in_flight": 8}}, max_wait=30)
    hook = FleetHook(fleet, limit="sim")
    _install(hook)
    try:
        litellm.completion(**kw(sim(make_provider_sim, "refusal"), max_tokens=40))
    finally:
        hook.close()
    assert judged == []
