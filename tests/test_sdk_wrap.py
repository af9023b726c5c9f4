"""``fleet.wrap(client, limit=...)`` with the real openai and anthropic SDKs against ProviderSim.

The fleet's token budget is a day window (refill ~12 tokens/s), so what a herd charged can
be compared with the usage the provider reported: settled, the two agree within the
refill; unsettled, the fleet would hold the estimates (max_tokens each), far more.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest

from celery_fleet import ConfigError, Fleet, Throttled
from celery_fleet.observability.status import limit_status
from celery_fleet.testing import ProviderSim

pytest_plugins = ["celery_fleet.testing.pytest_plugin"]

MakeFleet = Callable[..., Fleet]
MakeSim = Callable[..., ProviderSim]
DAY_TOKENS = 1_000_000
LIMIT = {"rpm": 600, "tokens": f"{DAY_TOKENS}/day", "burst": 1.0, "max_in_flight": 4}
REFILL_PER_S = DAY_TOKENS / 86_400


def ask(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}: what limits a fleet of agents?"}]


def tokens_charged(fleet: Fleet) -> int:
    window = limit_status(fleet, "llm").windows[-1]
    return window.full - window.left


def in_flight(fleet: Fleet) -> int:
    return limit_status(fleet, "llm").in_flight


@pytest.fixture
def sim(make_provider_sim: MakeSim) -> ProviderSim:
    """The provider allows what the fleet does: 600 rpm, 4 in flight."""
    return make_provider_sim(rpm=600, tpm=None, max_in_flight=4, latency=0.03, seed=7)


@pytest.fixture
def fleet(make_fleet: MakeFleet) -> Iterator[Fleet]:
    # a long max_wait: the line estimates its waits from the slow day window refill
    made = make_fleet({"llm": LIMIT}, max_wait=600)
    yield made


def assert_settled(fleet: Fleet, reported: list[int], started: float) -> None:
    charged = tokens_charged(fleet)
    slack = REFILL_PER_S * (time.monotonic() - started) + 2
    assert sum(reported) - slack <= charged <= sum(reported) + 1, (charged, sum(reported))


def test_a_herd_of_threads_through_a_wrapped_openai_client(fleet: Fleet, sim: ProviderSim) -> None:
    client = fleet.wrap(openai.OpenAI(base_url=sim.base_url, api_key="x"), limit="llm")
    used: list[int] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(40)
    started = time.monotonic()

    def agent(i: int) -> None:
        gate.wait()
        try:
            for step in range(2):
                reply = client.chat.completions.create(
                    model="sim", messages=ask(i * 10 + step), max_tokens=200
                )
                used.append(reply.usage.total_tokens)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    stats = sim.stats()
    assert not errors, errors[:3]
    assert stats["ok"] == 80 and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] <= 4  # the fleet's cap held at the provider
    assert len(used) == 80 and in_flight(fleet) == 0
    assert_settled(fleet, used, started)  # not the 80 x ~211 tokens reserved


def test_an_asyncio_herd_through_a_wrapped_async_anthropic_client(
    fleet: Fleet, sim: ProviderSim
) -> None:
    used: list[int] = []
    started = time.monotonic()

    async def main() -> None:
        raw = anthropic.AsyncAnthropic(base_url=sim.url, api_key="x")
        async with fleet.wrap(raw, limit="llm") as client:

            async def agent(i: int) -> None:
                reply = await client.messages.create(
                    model="sim", max_tokens=150, system="be brief", messages=ask(i)
                )
                used.append(reply.usage.input_tokens + reply.usage.output_tokens)

            await asyncio.gather(*(agent(i) for i in range(60)))
        await fleet.aclose()

    asyncio.run(main())
    stats = sim.stats()
    assert stats["ok"] == 60 and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] <= 4
    assert_settled(fleet, used, started)


def test_other_calls_pass_through_without_a_slot(fleet: Fleet, sim: ProviderSim) -> None:
    raw = openai.OpenAI(base_url=sim.base_url, api_key="x")
    client = fleet.wrap(raw, limit="llm", max_wait=0)
    assert client.models is raw.models and client.api_key == "x" and client.unwrapped is raw
    holders = [fleet.slot("llm").acquire() for _ in range(4)]  # the cap is full
    try:
        with pytest.raises(openai.NotFoundError):  # reached the sim: no slot asked
            client.models.list()
        with pytest.raises(Throttled):  # a model call waits for a slot
            client.chat.completions.create(model="sim", messages=ask(0), max_tokens=5)
    finally:
        for slot in holders:
            slot.release()
    assert sim.stats()["requests"] == 0


def call_for(sdk: str, sim: ProviderSim, fleet: Fleet | None) -> Callable[[], Any]:
    """One small model call through ``sdk``, wrapped by ``fleet`` (None: unwrapped)."""
    # The SDKs' default retries (2): wrap() turns them off for model calls.
    retries = 0 if fleet is None else 2
    if sdk == "openai":
        oai = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=retries)
        client = oai if fleet is None else fleet.wrap(oai, limit="llm")
        return lambda: client.chat.completions.create(model="sim", messages=ask(0), max_tokens=5)
    claude = anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=retries)
    wrapped = claude if fleet is None else fleet.wrap(claude, limit="llm")
    return lambda: wrapped.messages.create(model="sim", messages=ask(0), max_tokens=5)


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_rate_limit_headers_lower_the_fleet_budget(
    sdk: str, make_fleet: MakeFleet, make_provider_sim: MakeSim
) -> None:
    sim = make_provider_sim(rpm=6, tpm=None, max_in_flight=None, burst_s=30, latency=0.0)
    fleet = make_fleet({"llm": LIMIT}, max_wait=0)  # the fleet thinks 600 rpm are fine
    call_for(sdk, sim, fleet)()

    assert limit_status(fleet, "llm").windows[0].left <= 2  # the provider said 2 remain


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_a_provider_429_raises_throttled_and_pauses_the_limit(
    sdk: str, make_fleet: MakeFleet, make_provider_sim: MakeSim
) -> None:
    sim = make_provider_sim(rpm=6, tpm=None, max_in_flight=None, burst_s=10, latency=0.0)
    fleet = make_fleet({"llm": LIMIT}, max_wait=0)  # the fleet thinks 600 rpm are fine
    call_for(sdk, sim, None)()  # another tenant takes the sim's only request
    call = call_for(sdk, sim, fleet)
    with pytest.raises(Throttled) as refused:
        call()
    with pytest.raises(Throttled) as paused:
        call()

    sdk_error = openai.RateLimitError if sdk == "openai" else anthropic.RateLimitError
    assert isinstance(refused.value.__cause__, sdk_error)  # the SDK's error, as the cause
    assert "429" in refused.value.reason and refused.value.wait_ms >= 1000
    assert paused.value.reason == "paused"  # fleet-wide, without asking the provider
    assert limit_status(fleet, "llm").paused_s > 0
    assert sim.stats()["requests"] == 2  # the tenant's and one 429; the SDK did not retry


def test_an_anthropic_529_is_an_overload(make_fleet: MakeFleet, make_provider_sim: MakeSim) -> None:
    from celery_fleet.testing import Phase

    sim = make_provider_sim(
        rpm=None, tpm=None, max_in_flight=None, latency=0.0,
        phases=[Phase(start=0, end=600, status=529)],
    )  # fmt: skip
    adaptive = {"max_in_flight": 16, "adaptive": True, "initial_in_flight": 16, "decrease": 0.5}
    fleet = make_fleet({"llm": adaptive}, max_wait=0)
    client = fleet.wrap(anthropic.Anthropic(base_url=sim.url, api_key="x"), limit="llm")
    with pytest.raises(Throttled) as overloaded:
        client.messages.create(model="sim", messages=ask(0), max_tokens=5)

    assert isinstance(overloaded.value.__cause__, anthropic.OverloadedError)
    assert overloaded.value.reason == "provider 529"
    assert fleet.adaptive_state("llm")["cap"] == pytest.approx(8.0)  # cut as an overload


def test_messages_stream_holds_the_slot_until_it_is_left(fleet: Fleet, sim: ProviderSim) -> None:
    client = fleet.wrap(anthropic.Anthropic(base_url=sim.url, api_key="x"), limit="llm")
    started = time.monotonic()
    with client.messages.stream(model="sim", max_tokens=300, messages=ask(1)) as stream:
        assert in_flight(fleet) == 1
        text = "".join(stream.text_stream)
    final = stream.get_final_message()

    assert text and in_flight(fleet) == 0
    assert_settled(fleet, [final.usage.input_tokens + final.usage.output_tokens], started)


def test_a_stream_true_call_settles_at_its_end_and_a_dropped_one_gives_back(
    fleet: Fleet, make_provider_sim: MakeSim
) -> None:
    sim = make_provider_sim(rpm=None, tpm=None, max_in_flight=None, latency=0.5, seed=2)
    client = fleet.wrap(anthropic.Anthropic(base_url=sim.url, api_key="x"), limit="llm")
    started = time.monotonic()
    events = list(client.messages.create(model="sim", max_tokens=300, messages=ask(2), stream=True))
    reported = events[0].message.usage.input_tokens + events[-2].usage.output_tokens
    assert in_flight(fleet) == 0
    assert_settled(fleet, [reported], started)

    dropped = client.messages.create(model="sim", max_tokens=300, messages=ask(3), stream=True)
    assert next(iter(dropped)).type == "message_start" and in_flight(fleet) == 1
    dropped.close()  # the caller stops reading
    assert in_flight(fleet) == 0
    # settled to what message_start reported (the input): not the 300-token reservation
    assert tokens_charged(fleet) < reported + 20 + REFILL_PER_S * (time.monotonic() - started)


def test_an_async_stream_holds_the_slot_until_it_ends(fleet: Fleet, sim: ProviderSim) -> None:
    async def main() -> tuple[int, int, int]:
        client = fleet.wrap(anthropic.AsyncAnthropic(base_url=sim.url, api_key="x"), limit="llm")
        async with client.messages.stream(model="sim", max_tokens=50, messages=ask(4)) as s:
            during = in_flight(fleet)
            async for _ in s.text_stream:
                pass
        stream = await client.messages.create(
            model="sim", max_tokens=50, messages=ask(5), stream=True
        )
        first = await stream.__anext__()
        held = in_flight(fleet) if first.type == "message_start" else -1
        await stream.close()
        await fleet.aclose()
        return during, held, in_flight(fleet)

    assert asyncio.run(main()) == (1, 1, 0)


def test_bad_arguments_fail_at_wrap_time(fleet: Fleet, sim: ProviderSim) -> None:
    raw = openai.OpenAI(base_url=sim.base_url, api_key="x")
    with pytest.raises(ConfigError, match="'nope'"):
        fleet.wrap(raw, limit="nope")
    with pytest.raises(ConfigError, match="openai.OpenAI"):
        fleet.wrap(object(), limit="llm")
    with pytest.raises(ConfigError, match="tokens"):
        fleet.wrap(raw, limit="llm", tokens=-1)
    with pytest.raises(ConfigError, match="max_retries"):
        fleet.wrap(raw, limit="llm", max_retries=-1)
    with pytest.raises(ConfigError, match="max_wait"):
        fleet.wrap(raw, limit="llm", max_wait=math.nan)


def test_tokens_and_max_retries_options(fleet: Fleet, sim: ProviderSim) -> None:
    seen: list[dict[str, Any]] = []

    def reserve(kwargs: dict[str, Any]) -> int:
        seen.append(kwargs)
        return 10

    client = fleet.wrap(openai.OpenAI(base_url=sim.base_url, api_key="x"), "llm", tokens=reserve)
    client.chat.completions.create(model="sim", messages=ask(6), max_tokens=5)
    assert seen[0]["max_tokens"] == 5
    assert client.with_options(timeout=5).unwrapped.timeout == 5
    assert client._inner.max_retries == 0 and client.unwrapped.max_retries == 2


def test_an_openai_stream_settles_from_its_usage_chunk(fleet: Fleet, sim: ProviderSim) -> None:
    client = fleet.wrap(openai.OpenAI(base_url=sim.base_url, api_key="x"), limit="llm")
    started = time.monotonic()
    try:
        stream = client.chat.completions.create(
            model="sim",
            messages=ask(7),
            max_tokens=300,
            stream=True,
            stream_options={"include_usage": True},
        )
    except openai.BadRequestError:
        pytest.skip("this ProviderSim does not stream chat completions")
    assert in_flight(fleet) == 1
    chunks = list(stream)

    assert chunks[-1].usage is not None and in_flight(fleet) == 0
    assert_settled(fleet, [chunks[-1].usage.total_tokens], started)


def test_a_stream_cut_by_the_provider_gives_the_slot_back(
    fleet: Fleet, make_provider_sim: MakeSim
) -> None:
    sim = make_provider_sim(rpm=None, tpm=None, max_in_flight=None, latency=5.0, seed=3)
    client = fleet.wrap(anthropic.Anthropic(base_url=sim.url, api_key="x"), limit="llm")
    stream = client.messages.create(model="sim", max_tokens=300, messages=ask(8), stream=True)
    assert next(stream).type == "message_start" and in_flight(fleet) == 1
    sim.stop()  # the provider goes away between two events

    with pytest.raises(Exception) as cut:  # whatever the SDK raises for a broken stream
        list(stream)
    assert not isinstance(cut.value, Throttled)
    assert in_flight(fleet) == 0


def test_a_stream_dropped_unread_gives_its_slot_back_when_collected(
    fleet: Fleet, sim: ProviderSim
) -> None:
    import gc

    client = fleet.wrap(anthropic.Anthropic(base_url=sim.url, api_key="x"), limit="llm")
    stream = client.messages.create(model="sim", max_tokens=30, messages=ask(9), stream=True)
    assert in_flight(fleet) == 1
    del stream
    gc.collect()
    assert in_flight(fleet) == 0


def test_a_copied_proxy_still_works(fleet: Fleet, sim: ProviderSim) -> None:
    import copy

    client = fleet.wrap(anthropic.Anthropic(base_url=sim.url, api_key="x"), limit="llm")
    twin = copy.copy(client)
    twin.messages.create(model="sim", max_tokens=5, messages=ask(10))
    assert sim.stats()["ok"] == 1 and in_flight(fleet) == 0
