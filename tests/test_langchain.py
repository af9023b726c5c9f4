"""celery_fleet.contrib.langchain with the real langchain-core and langchain-openai.

Every test points a real ``ChatOpenAI`` at :class:`ProviderSim` (a real HTTP server
speaking OpenAI's API, refusing like OpenAI) and counts what the provider saw: herds of
40 calls from threads (``batch``) and from coroutines (``ainvoke``) draw no 429 and never
exceed the cap, the tokens charged to the fleet are the usage the answers reported, a
provider 429 pauses the limit fleet-wide. The rate limiter's two-process test is in
``tests/integration/test_langchain_processes.py``.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

pytest.importorskip("langchain_openai")

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from celery_fleet import FOREVER, CircuitOpen, ConfigError, Fleet, Throttled
from celery_fleet.contrib.langchain import (
    FleetRateLimiter,
    FleetRunnable,
    estimate_input_tokens,
    with_fleet,
)
from celery_fleet.observability.status import limit_status
from celery_fleet.testing import ProviderSim

MakeFleet = Callable[..., Fleet]
HERD = 40
CAP = 4
#: A tokens window whose refill (11.6 tokens/s) is small beside what a herd uses, and whose
#: burst (100,000) never refuses: what it has used shows as ``full - left``.
SLOW_TOKENS = "1000000/day"


@pytest.fixture
def sim() -> Iterator[ProviderSim]:
    provider = ProviderSim(rpm=None, tpm=None, max_in_flight=CAP, latency=0.05, seed=7).start()
    yield provider
    provider.stop()


def chat(sim: ProviderSim, **options: Any) -> ChatOpenAI:
    options.setdefault("max_tokens", 64)
    return ChatOpenAI(model="sim", base_url=sim.base_url, api_key="x", max_retries=0, **options)


def used_tokens(fleet: Fleet, limit: str) -> int:
    """Tokens the fleet's slow tokens window holds charged (its burst minus what is left)."""
    (window,) = [w for w in limit_status(fleet, limit).windows if "tokens" in w.window]
    return window.full - window.left


def reported(replies: list[Any]) -> int:
    return sum(r.usage_metadata["total_tokens"] for r in replies)


def refill_bound(elapsed_s: float) -> int:
    """Tokens the slow window can have got back in ``elapsed_s`` (its refill rate)."""
    return math.ceil(elapsed_s * 1_000_000 / 86_400) + 1


def assert_settled(fleet: Fleet, replies: list[Any], elapsed_s: float) -> None:
    used, want = used_tokens(fleet, "openai"), reported(replies)
    # Reserved, it would be HERD * (prompt + 64) (~2,700); settled, it is the usage (~1,400).
    assert want - refill_bound(elapsed_s) <= used <= want, (used, want)


def test_a_thread_herd_through_batch_holds_the_cap_and_settles_usage(
    make_fleet: MakeFleet, sim: ProviderSim
) -> None:
    fleet = make_fleet({"openai": {"max_in_flight": CAP, "tokens": SLOW_TOKENS}})
    model = with_fleet(chat(sim), fleet, "openai", max_wait=FOREVER)
    sim.reset_stats()
    t0 = sim.elapsed_s()
    replies = model.batch([f"question {i}" for i in range(HERD)], {"max_concurrency": HERD})
    stats = sim.stats()
    assert stats["ok"] == HERD and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] == CAP, stats  # a herd that filled the cap
    assert all(isinstance(r, AIMessage) for r in replies)
    assert_settled(fleet, replies, sim.elapsed_s() - t0)
    assert fleet.admission.in_flight("openai") == 0


def test_a_coroutine_herd_through_ainvoke_holds_the_cap_and_settles_usage(
    make_fleet: MakeFleet, sim: ProviderSim
) -> None:
    fleet = make_fleet({"openai": {"max_in_flight": CAP, "tokens": SLOW_TOKENS}})
    model = with_fleet(chat(sim), fleet, "openai", max_wait=FOREVER)

    async def main() -> list[Any]:
        try:
            return await asyncio.gather(*(model.ainvoke(f"question {i}") for i in range(HERD)))
        finally:
            await fleet.aclose()

    t0 = sim.elapsed_s()
    replies = asyncio.run(main())
    stats = sim.stats()
    assert stats["ok"] == HERD and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] == CAP, stats
    assert_settled(fleet, replies, sim.elapsed_s() - t0)


def test_without_the_fleet_the_same_herd_draws_429s(sim: ProviderSim) -> None:
    """The herd above is a real one: unguarded, the provider refuses part of it."""
    replies = chat(sim).batch(
        [f"question {i}" for i in range(HERD)], {"max_concurrency": HERD}, return_exceptions=True
    )
    assert sim.stats()["rate_limited"]["concurrency"] > 0
    assert any(isinstance(r, Exception) for r in replies)


def test_stream_and_astream_hold_a_slot_and_settle_from_the_chunks(
    make_fleet: MakeFleet, sim: ProviderSim
) -> None:
    # ProviderSim answers no stream=true: disable_streaming makes LangChain's real stream()
    # path yield the whole answer as one chunk, usage included.
    fleet = make_fleet({"openai": {"max_in_flight": 1, "tokens": SLOW_TOKENS}})
    model = with_fleet(chat(sim, disable_streaming=True), fleet, "openai")
    held = []
    for chunk in model.stream([SystemMessage("be brief"), HumanMessage("hello")]):
        held.append(fleet.admission.in_flight("openai"))
        first = chunk

    async def astream() -> list[Any]:
        try:
            return [c async for c in model.astream("hello again")]
        finally:
            await fleet.aclose()

    chunks = asyncio.run(astream())
    assert held == [1]  # the slot is held while the chunks are read
    assert fleet.admission.in_flight("openai") == 0
    assert_settled(fleet, [first, *chunks], sim.elapsed_s())


def test_a_consumer_that_stops_reading_gives_the_slot_back(
    make_fleet: MakeFleet, sim: ProviderSim
) -> None:
    fleet = make_fleet({"openai": {"max_in_flight": 1}})
    model = with_fleet(chat(sim, disable_streaming=True), fleet, "openai", max_wait=0)
    stream = model.stream("hello")
    next(stream)
    assert fleet.admission.in_flight("openai") == 1
    stream.close()
    assert fleet.admission.in_flight("openai") == 0
    model.invoke("the slot is free again")  # max_wait=0: would raise if still held

    async def astream() -> int:
        try:
            chunks = model.astream("hello")
            await anext(chunks)
            held = fleet.admission.in_flight("openai")
            await chunks.aclose()  # type: ignore[attr-defined]
            await model.ainvoke("free again")
            return held
        finally:
            await fleet.aclose()

    assert asyncio.run(astream()) == 1
    assert fleet.admission.in_flight("openai") == 0


def test_a_provider_429_becomes_throttled_and_pauses_the_limit_fleet_wide(
    make_fleet: MakeFleet,
) -> None:
    sim = ProviderSim(rpm=6, tpm=None, burst_s=10, latency=0.0).start()  # capacity 1
    try:
        fleet = make_fleet({"openai": {"rpm": 600}}, max_wait=0)
        model = with_fleet(chat(sim), fleet, "openai")
        model.invoke("one")
        with pytest.raises(Throttled) as info:
            model.invoke("two")
        assert "429" in info.value.reason
        assert isinstance(info.value.__cause__, openai.RateLimitError)  # the SDK's, chained
        with pytest.raises(Throttled) as paused:  # refused by the fleet, never sent
            model.invoke("three")
        assert paused.value.reason == "paused"
        assert sim.stats()["requests"] == 2
    finally:
        sim.stop()


def test_bind_tools_and_bind_stay_on_the_fleet(make_fleet: MakeFleet, sim: ProviderSim) -> None:
    fleet = make_fleet({"openai": {"max_in_flight": 1, "tokens": SLOW_TOKENS}})
    model = with_fleet(chat(sim), fleet, "openai", max_wait=0)
    tool = {
        "type": "function",
        "function": {"name": "search", "parameters": {"type": "object", "properties": {}}},
    }
    with_tools = model.bind_tools([tool])
    assert isinstance(with_tools, FleetRunnable) and with_tools.limit == "openai"
    assert model.model_name == "sim"  # plain attributes read through
    # Tools count as prompt, a bound max_tokens replaces the model's.
    assert with_tools.reserve("hi", {}) > model.reserve("hi", {})
    assert model.bind(max_tokens=5).bound.reserve("hi", {"max_tokens": 5}) == 1 + 5
    fleet.try_acquire("openai")  # the cap is full: a call through any of them must wait
    for runnable in (with_tools, model.bind(max_tokens=5), model | (lambda m: m)):
        with pytest.raises(Throttled):
            runnable.invoke("hi")
    assert sim.stats()["requests"] == 0


def test_the_estimate_reads_messages_budget_and_choices() -> None:
    model = ChatOpenAI(model="m", api_key="x", max_tokens=100)
    assert estimate_input_tokens(model, "x" * 40) == 10 + 100
    assert estimate_input_tokens(model, [("system", "x" * 20), ("user", "y" * 20)]) == 110
    assert estimate_input_tokens(model, "x" * 40, {"max_tokens": 7}) == 17
    assert estimate_input_tokens(ChatOpenAI(model="m", api_key="x", n=3), "") == 3 * 1024


def test_the_rate_limiter_charges_a_request_and_holds_nothing(
    make_fleet: MakeFleet, sim: ProviderSim
) -> None:
    fleet = make_fleet({"openai": {"requests": "2/minute", "burst": 1, "max_in_flight": 1}})
    limiter = FleetRateLimiter(fleet, "openai", max_wait=0)
    model = chat(sim, rate_limiter=limiter)
    model.invoke("one")
    assert fleet.admission.in_flight("openai") == 0  # nothing held after acquire
    assert limiter.acquire(blocking=False) is True
    assert limiter.acquire(blocking=False) is False  # two requests a minute, both taken
    with pytest.raises(Throttled):
        model.invoke("three")

    async def refused() -> bool:
        try:
            return await limiter.aacquire(blocking=False)
        finally:
            await fleet.aclose()

    assert asyncio.run(refused()) is False
    assert sim.stats()["requests"] == 1


def test_the_rate_limiter_waits_in_asyncio(make_fleet: MakeFleet, sim: ProviderSim) -> None:
    fleet = make_fleet({"openai": {"requests": "20/second", "burst": 0.05}})
    model = chat(sim, rate_limiter=FleetRateLimiter(fleet, "openai", max_wait=FOREVER))

    async def main() -> list[Any]:
        try:
            return await asyncio.gather(*(model.ainvoke(f"q{i}") for i in range(6)))
        finally:
            await fleet.aclose()

    assert len(asyncio.run(main())) == 6
    times = sorted(r.t_s for r in sim.log)
    # one request each 50 ms at most: six spread over at least 5 gaps (rate, not speed)
    assert times[-1] - times[0] >= 5 * 0.05 * 0.9, times


def test_bad_arguments_are_config_errors(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"openai": {"rpm": 60}})
    model = ChatOpenAI(model="m", api_key="x")
    with pytest.raises(ConfigError, match="unknown limit"):
        with_fleet(model, fleet, "nope")
    with pytest.raises(ConfigError, match="unknown limit"):
        FleetRateLimiter(fleet, "nope")
    with pytest.raises(ConfigError, match="max_wait"):
        with_fleet(model, fleet, "openai", max_wait=-1)
    with pytest.raises(ConfigError, match="tokens"):
        FleetRateLimiter(fleet, "openai", tokens=-5)
    with pytest.raises(ConfigError, match="Runnable"):
        with_fleet(lambda m: m, fleet, "openai")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Fleet"):
        FleetRateLimiter(object(), "openai")  # type: ignore[arg-type]


@pytest.mark.fast
def test_without_langchain_the_import_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['langchain_core'] = None\n"
        "import celery_fleet\n"
        "try:\n    import celery_fleet.contrib.langchain\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'celery-fleet[langchain]'" in out.stdout, out


def sim_streams() -> bool:
    from celery_fleet.testing import wire

    return hasattr(wire, "stream_frames")


@pytest.mark.skipif(not sim_streams(), reason="this ProviderSim answers no stream=true")
def test_real_sse_streams_from_threads_hold_the_cap_and_settle_from_the_usage_chunk(
    make_fleet: MakeFleet, sim: ProviderSim
) -> None:
    fleet = make_fleet({"openai": {"max_in_flight": CAP, "tokens": SLOW_TOKENS}})
    model = with_fleet(chat(sim, stream_usage=True), fleet, "openai", max_wait=FOREVER)

    def read(i: int) -> Any:
        whole = None
        for chunk in model.stream(f"question {i}"):
            whole = chunk if whole is None else whole + chunk
        return whole

    with ThreadPoolExecutor(HERD) as pool:
        replies = list(pool.map(read, range(HERD)))
    stats = sim.stats()
    assert stats["ok"] == HERD and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] == CAP, stats
    assert_settled(fleet, replies, sim.elapsed_s())


def test_a_provider_that_hangs_times_out_frees_the_slot_and_opens_the_breaker(
    make_fleet: MakeFleet,
) -> None:
    sim = ProviderSim(rpm=None, tpm=None, max_in_flight=None, latency=2.0, latency_sigma=0).start()
    try:
        breaker = {"failure_rate": 0.5, "min_calls": 2, "reset_timeout": 60}
        fleet = make_fleet({"openai": {"max_in_flight": 1, "breaker": breaker}}, max_wait=0)
        model = with_fleet(chat(sim, timeout=0.2), fleet, "openai")
        for _ in range(2):
            with pytest.raises(openai.APITimeoutError):  # the SDK's own error, unchanged
                model.invoke("are you there?")
            assert fleet.admission.in_flight("openai") == 0
        assert fleet.breaker("openai").state().state == "open"
        with pytest.raises(CircuitOpen):  # refused by the fleet, never sent
            model.invoke("are you there?")
        assert sim.stats()["requests"] == 2
    finally:
        sim.stop()
