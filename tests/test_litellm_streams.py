"""``FleetHook`` and ``stream=True``: the real LiteLLM streaming from ProviderSim.

A streamed ``litellm.completion`` / ``acompletion`` holds its slot while the stream is
open and until it is read to its end; it is settled from the provider's usage chunk
(``stream_options={"include_usage": True}``) and otherwise keeps its reservation (the
count LiteLLM makes of the text itself is not the provider's); a stream the caller leaves
early (closed, broken out of, dropped) or the provider cuts gives its slot back; and a
herd of streams gets no provider 429 with the cap held.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from celery_fleet import Fleet
from tests.test_litellm import (
    DAY_TOKENS,
    MESSAGES,
    MS_PER_TOKEN,
    CustomLogger,
    FleetHook,  # imported there after LiteLLM's environment is set (no network at import)
    ProviderSim,
    _callbacks,  # noqa: F401 - the autouse fixture restoring litellm's global lists
    _install,
    _kw,
    _tokens_ahead_ms,
    _until,
    litellm,
    pytestmark,
)

pytest_plugins = ["celery_fleet.testing.pytest_plugin"]
MakeFleet = Callable[..., Fleet]
MakeSim = Callable[..., ProviderSim]
USAGE = {"stream_options": {"include_usage": True}}
T = TypeVar("T")
SEED = 2
pytestmark = [
    *pytestmark,
    # LiteLLM's stream chunk handling, not ours (pydantic 2.11 on its ModelResponseStream)
    pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning"),
    # a loop LiteLLM's logging leaves open, found when the tests collect garbage
    pytest.mark.filterwarnings("ignore:unclosed event loop:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <function BaseEventLoop.__del__"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
]


@pytest.fixture(autouse=True)
def _collect_litellms_leftovers() -> Iterator[None]:
    """Collect what LiteLLM's sync streams leave in cycles (an event loop of its logging
    among them) while this test's warning filters still apply."""
    yield
    gc.collect()


def _fleet(make_fleet: MakeFleet, cap: int = 4) -> Fleet:
    limits = {"sim": {"max_in_flight": cap, "rpm": 6000, "tokens": f"{DAY_TOKENS}/day"}}
    return make_fleet(limits, max_wait=120)


def _held(fleet: Fleet, hook: FleetHook) -> int:
    assert len(hook.holding) == fleet.admission.in_flight("sim")
    return len(hook.holding)


def _released(fleet: Fleet, hook: FleetHook, collect: bool = False) -> None:
    """Poll until the hook holds nothing; with ``collect``, collecting garbage each time."""
    _until(
        lambda: (
            (not collect or gc.collect() >= 0)
            and hook.holding == []
            and fleet.admission.in_flight("sim") == 0
        )
    )


def _assert_charged(fleet: Fleet, tokens: int, t0: float) -> None:
    """The day window charged ``tokens`` (it has refilled at most the test's duration)."""
    charged_ms = tokens * MS_PER_TOKEN
    elapsed_ms = (time.monotonic() - t0) * 1000
    ahead = _tokens_ahead_ms(fleet)
    assert charged_ms - elapsed_ms - 50 <= ahead <= charged_ms + 50, (ahead, charged_ms)


def _arun(fleet: Fleet, coro: Coroutine[Any, Any, T], hook: FleetHook | None = None) -> T:
    """Run ``coro``; with ``hook``, keep the loop running until the hook holds nothing (a
    stream's end is logged by a task LiteLLM starts on the caller's loop); then close the
    fleet's asyncio store on the same loop."""

    async def main() -> T:
        try:
            result = await coro
            deadline = time.monotonic() + 20
            while hook is not None and (hook.holding or fleet.admission.in_flight("sim")):
                assert time.monotonic() < deadline, "still held"
                await asyncio.sleep(0.01)
            return result
        finally:
            await fleet.aclose()

    return asyncio.run(main())


def _read(mode: str, fleet: Fleet, hook: FleetHook, sim: ProviderSim, **extra: Any) -> list[Any]:
    """Open a stream, check its slot is held while it is open, read it to its end."""
    if mode == "sync":
        stream = litellm.completion(**_kw(sim, stream=True, **extra))
        first = next(stream)
        assert _held(fleet, hook) == 1
        return [first, *stream]

    async def read() -> list[Any]:
        stream = await litellm.acompletion(**_kw(sim, stream=True, **extra))
        first = await stream.__anext__()
        assert _held(fleet, hook) == 1
        return [first, *[chunk async for chunk in stream]]

    return _arun(fleet, read(), hook)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_holds_its_slot_until_read_and_settles_from_its_usage_chunk(
    make_fleet: MakeFleet, make_provider_sim: MakeSim, mode: str
) -> None:
    fleet = _fleet(make_fleet)
    hook = FleetHook(fleet, limit="sim")
    _install(hook)
    sim = make_provider_sim(rpm=None, tpm=None, latency=0.2, latency_sigma=0.0, seed=1)
    t0 = time.monotonic()
    try:
        chunks = _read(mode, fleet, hook, sim, **USAGE)  # in flight while it was open
        used = chunks[-1].usage.total_tokens
        reserved = hook.tokens_for("sim", {"messages": MESSAGES, "max_tokens": 200})
        assert used != reserved
        _released(fleet, hook)
        _assert_charged(fleet, used, t0)  # settled to the provider's count
    finally:
        hook.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_without_a_usage_chunk_keeps_its_reservation(
    make_fleet: MakeFleet, make_provider_sim: MakeSim, mode: str
) -> None:
    fleet = _fleet(make_fleet)
    logged, hook = _LoggedUsage(), FleetHook(fleet, limit="sim")
    _install(logged, hook)
    # a seed whose answer LiteLLM counts far from the reservation (seed 2's prose answer
    # came within 6 tokens of it), so the charge tells which of the two was used
    sim = make_provider_sim(rpm=None, tpm=None, latency=0.2, latency_sigma=0.0, seed=3)
    t0 = time.monotonic()
    try:
        chunks = _read(mode, fleet, hook, sim)  # no stream_options: no usage chunk
        assert len(chunks) > 2 and all(getattr(c, "usage", None) is None for c in chunks)
        _released(fleet, hook)
        # LiteLLM counts the streamed text itself and logs that as the usage: an estimate
        # like ours, not the provider's word; the reservation stands.
        reserved = hook.tokens_for("sim", {"messages": MESSAGES, "max_tokens": 200})
        _until(lambda: bool(logged.totals))  # the sync path logs it twice, sync and async
        assert all(abs(total - reserved) > 20 for total in logged.totals), (logged.totals, reserved)
        _assert_charged(fleet, reserved, t0)
    finally:
        hook.close()


class _LoggedUsage(CustomLogger):
    """Records the usage LiteLLM logs at a stream's end."""

    totals: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.totals = []

    def log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self.totals.append(int(response_obj.usage.total_tokens))

    async def async_log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self.totals.append(int(response_obj.usage.total_tokens))


def test_an_acompletion_stream_whose_loop_ends_at_once_still_gives_its_slot_back(
    make_fleet: MakeFleet, make_provider_sim: MakeSim
) -> None:
    fleet = _fleet(make_fleet)
    hook = FleetHook(fleet, limit="sim")
    _install(hook)
    sim = make_provider_sim(rpm=None, tpm=None, latency=0.2, latency_sigma=0.0, seed=SEED)

    async def read() -> list[Any]:
        stream = await litellm.acompletion(**_kw(sim, stream=True, **USAGE))
        return [chunk async for chunk in stream]

    try:
        # asyncio.run in a task: the loop (and the fleet's asyncio store) ends right after
        # the last chunk, before the task LiteLLM started to log the stream's end has run.
        chunks = _arun(fleet, read())
        assert chunks[-1].usage is not None
        _released(fleet, hook)
    finally:
        hook.close()


def _leave_sync(sim: ProviderSim, how: str) -> None:
    if how == "close":
        with litellm.completion(**_kw(sim, stream=True, **USAGE)) as stream:
            next(stream)  # the with block closes it
    elif how == "break":
        for _ in litellm.completion(**_kw(sim, stream=True, **USAGE)):
            break
    else:
        litellm.completion(**_kw(sim, stream=True, **USAGE))  # never read


async def _leave_async(sim: ProviderSim, how: str) -> None:
    if how == "close":
        async with await litellm.acompletion(**_kw(sim, stream=True, **USAGE)) as stream:
            await stream.__anext__()
    elif how == "break":
        async for _ in await litellm.acompletion(**_kw(sim, stream=True, **USAGE)):
            break
    else:
        await litellm.acompletion(**_kw(sim, stream=True, **USAGE))


@pytest.mark.parametrize("how", ["close", "break", "drop"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_left_early_gives_its_slot_back(
    make_fleet: MakeFleet, make_provider_sim: MakeSim, mode: str, how: str
) -> None:
    fleet = _fleet(make_fleet, cap=1)
    hook = FleetHook(fleet, limit="sim")  # max_hold 900 s: only the stream's end releases
    _install(hook)
    sim = make_provider_sim(rpm=None, tpm=None, latency=5.0, latency_sigma=0.0)
    try:
        if mode == "sync":
            _leave_sync(sim, how)
        else:
            _arun(fleet, _leave_async(sim, how))
        # LiteLLM's sync call objects hold each other in cycles, and its logging thread
        # holds them until it has logged the chunks read: released at a collection after.
        _released(fleet, hook, collect=mode == "sync")
        assert sim.stats()["requests"] == 1
    finally:
        hook.close()


def test_two_hooks_on_one_stream_left_early_both_give_their_slots_back(
    make_fleet: MakeFleet, make_provider_sim: MakeSim
) -> None:
    """Two FleetHooks in ``litellm.callbacks`` (two fleets, or a hook a library left
    installed): each holds a slot of the call, and a stream let go releases both. The
    record's one guard ran the first hook's end alone: the other's slot stayed held."""
    first, second = _fleet(make_fleet, cap=2), _fleet(make_fleet, cap=2)
    hooks = FleetHook(first, limit="sim"), FleetHook(second, limit="sim")
    _install(*hooks)
    sim = make_provider_sim(rpm=None, tpm=None, latency=5.0, latency_sigma=0.0)
    try:
        _leave_sync(sim, "drop")
        _until(
            lambda: (
                gc.collect() >= 0
                and all(hook.holding == [] for hook in hooks)
                and first.admission.in_flight("sim") == 0
            )
        )
    finally:
        for hook in hooks:
            hook.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_cut_by_the_provider_gives_its_slot_back(
    make_fleet: MakeFleet, make_provider_sim: MakeSim, mode: str
) -> None:
    fleet = _fleet(make_fleet)
    hook = FleetHook(fleet, limit="sim")
    _install(hook)
    sim = make_provider_sim(rpm=None, tpm=None, latency=5.0, latency_sigma=0.0)
    try:
        if mode == "sync":
            stream = litellm.completion(**_kw(sim, stream=True, **USAGE))
            next(stream)
            assert _held(fleet, hook) == 1
            sim.stop()  # the provider goes away between two chunks
            with pytest.raises(Exception, match="Connection error"):
                list(stream)
            _released(fleet, hook)  # by the failure event: the stream is still referenced
        else:

            async def main() -> None:
                stream = await litellm.acompletion(**_kw(sim, stream=True, **USAGE))
                await stream.__anext__()
                assert _held(fleet, hook) == 1
                sim.stop()
                with pytest.raises(Exception, match="Connection error"):
                    [chunk async for chunk in stream]
                while hook.holding or fleet.admission.in_flight("sim"):  # stream referenced
                    await asyncio.sleep(0.01)  # a poll; _until's deadline is the test's

            _arun(fleet, asyncio.wait_for(main(), 20), hook)
    finally:
        hook.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_herd_of_streams_gets_no_429_and_the_cap_holds(
    make_fleet: MakeFleet, make_provider_sim: MakeSim, mode: str
) -> None:
    fleet = _fleet(make_fleet, cap=4)
    hook = FleetHook(fleet, limit="sim")
    _install(hook)
    sim = make_provider_sim(rpm=None, tpm=None, max_in_flight=4, latency=0.1)
    try:
        if mode == "sync":

            def call(_: int) -> int:
                chunks = list(litellm.completion(**_kw(sim, stream=True, **USAGE)))
                return int(chunks[-1].usage.total_tokens)

            with ThreadPoolExecutor(30) as pool:
                used = list(pool.map(call, range(30)))
        else:

            async def herd() -> list[int]:
                async def call() -> int:
                    stream = await litellm.acompletion(**_kw(sim, stream=True, **USAGE))
                    chunks = [chunk async for chunk in stream]
                    return int(chunks[-1].usage.total_tokens)

                return list(await asyncio.gather(*(call() for _ in range(30))))

            used = _arun(fleet, herd(), hook)
        stats = sim.stats()
        assert stats["ok"] == 30 and sum(stats["rate_limited"].values()) == 0, stats
        assert stats["max_in_flight_observed"] <= 4, stats
        assert len(used) == 30 and all(used)
        _released(fleet, hook)
    finally:
        hook.close()
