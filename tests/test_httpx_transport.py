"""``celery_fleet.httpx``: the real ``openai`` SDK over FleetTransport, against ProviderSim.

Real Redis, a real HTTP server (ProviderSim) and the real SDKs; the sim's log tells how
many requests were in flight and refused, the fleet's status what it holds and charged.
The token window is a day's budget held whole (``burst=1``), so what it lost is what the
fleet charged: it refills by about 12 tokens a second, far less than a reservation.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from celery_fleet import ConfigError, Fleet, Throttled
from celery_fleet.httpx import AsyncFleetTransport, FleetTransport
from celery_fleet.observability.status import limit_status
from celery_fleet.testing import ProviderSim

MakeFleet = Callable[..., Fleet]
DAY = 1_000_000  # tokens per day: the window that shows what was charged
MESSAGES = [{"role": "user", "content": "tell me about token buckets " * 4}]


def fleet_for(make_fleet: MakeFleet, cap: int = 4, **limit: Any) -> Fleet:
    spec = {"max_in_flight": cap, "tokens": f"{DAY}/day", "burst": 1, **limit}
    # a wait in line is estimated from the day window (~20 s a place): long, but only a bound
    return make_fleet({"llm": spec}, max_wait=600)


def charged(fleet: Fleet) -> int:
    """Tokens the fleet's day window lost so far (what it charged, less a little refill)."""
    (window,) = [w for w in limit_status(fleet, "llm").windows if "tokens" in w.window]
    return window.full - window.left


def in_flight(fleet: Fleet) -> int:
    return limit_status(fleet, "llm").in_flight


def sync_client(sim: ProviderSim, fleet: Fleet, **kwargs: Any) -> openai.OpenAI:
    transport = FleetTransport(fleet, "llm", **kwargs)
    return openai.OpenAI(
        base_url=sim.base_url,
        api_key="x",
        max_retries=0,
        http_client=httpx.Client(transport=transport),
    )


@pytest.fixture
def sim() -> Iterator[ProviderSim]:
    with ProviderSim(rpm=None, tpm=None, max_in_flight=4, latency=0.02, seed=7) as server:
        yield server


def test_a_thread_herd_holds_the_cap_gets_no_429_and_settles_to_usage(
    make_fleet: MakeFleet, sim: ProviderSim
) -> None:
    fleet = fleet_for(make_fleet)
    client = sync_client(sim, fleet)
    used: list[int] = []

    def agent(i: int) -> None:
        reply = client.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=200)
        assert reply.usage is not None
        used.append(reply.usage.total_tokens)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    stats = sim.stats()
    assert len(used) == 40 and stats["ok"] == 40, stats
    assert sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] <= 4, stats
    reserved = 40 * (len(MESSAGES[0]["content"]) // 4 + 1 + 200)
    assert sum(used) < reserved - 2000  # settling matters: usage is well below the estimate
    assert sum(used) - 200 <= charged(fleet) <= sum(used)
    assert in_flight(fleet) == 0


def test_an_asyncio_herd_with_async_openai(make_fleet: MakeFleet, sim: ProviderSim) -> None:
    fleet = fleet_for(make_fleet)

    async def main() -> list[int]:
        transport = AsyncFleetTransport(fleet, "llm")
        async with openai.AsyncOpenAI(
            base_url=sim.base_url,
            api_key="x",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=transport),
        ) as client:

            async def agent() -> int:
                reply = await client.chat.completions.create(
                    model="sim", messages=MESSAGES, max_tokens=200
                )
                assert reply.usage is not None
                return reply.usage.total_tokens

            try:
                return await asyncio.gather(*(agent() for _ in range(40)))
            finally:
                await fleet.aclose()

    used = asyncio.run(main())
    stats = sim.stats()
    assert stats["ok"] == 40 and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] <= 4, stats
    assert sum(used) - 200 <= charged(fleet) <= sum(used)
    assert in_flight(fleet) == 0


@pytest.mark.parametrize(
    ("pushback", "raised"), [("raise", Throttled), ("return", openai.RateLimitError)]
)
def test_a_provider_429_pauses_the_limit_fleet_wide(
    make_fleet: MakeFleet, pushback: str, raised: type[Exception]
) -> None:
    fleet = make_fleet({"llm": {"rpm": 600}}, max_wait=0)
    # 60 tokens at once, 10 more a second: one call of ~53 passes, the next waits ~4.6 s
    with ProviderSim(rpm=None, tpm=600, burst_s=6, latency=0.0) as sim:
        client = sync_client(sim, fleet, pushback=pushback)
        client.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=25)
        with pytest.raises(raised) as pushed:  # Throttled, or the SDK's error: the response
            client.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=25)
        if pushback == "raise":
            assert isinstance(pushed.value, Throttled) and "429" in pushed.value.reason
            assert pushed.value.wait_ms > 1000  # the provider's Retry-After
        assert fleet.adaptive_state("llm")["pause_until"] > 0
        with pytest.raises(Throttled) as paused:  # refused by the fleet, not sent
            client.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=25)
        assert paused.value.reason == "paused"
        client.close()
        assert sim.stats()["requests"] == 2
    assert in_flight(fleet) == 0


def test_each_sdk_retry_takes_a_new_slot_and_waits_out_the_pause(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"rpm": 600}}, max_wait=30)
    admitted: list[str] = []
    fleet.admission.watchers.append(lambda event, limit, fields: admitted.append(event))
    # 60 tokens at once, 100 more a second: the second call of ~53 waits about 0.46 s
    with ProviderSim(rpm=None, tpm=6000, burst_s=0.6, latency=0.0) as sim:
        transport = FleetTransport(fleet, "llm", pushback="return")  # the SDK sees the 429
        with openai.OpenAI(
            base_url=sim.base_url,
            api_key="x",
            max_retries=1,  # the SDK's own retry: it goes through the fleet again
            http_client=httpx.Client(transport=transport),
        ) as client:
            for _ in range(2):
                client.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=25)
        outcomes = [r.outcome for r in sim.log]
    assert outcomes == ["ok", "429", "ok"], outcomes
    assert admitted.count("admitted") == 3  # one slot per HTTP request, retries included
    assert in_flight(fleet) == 0


def stream(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(
        model="sim",
        messages=MESSAGES,
        max_tokens=200,
        stream=True,
        stream_options={"include_usage": True},
    )


def test_a_stream_holds_its_slot_until_it_ends_and_settles_from_the_usage_chunk(
    make_fleet: MakeFleet, sim: ProviderSim
) -> None:
    fleet = fleet_for(make_fleet)
    client = sync_client(sim, fleet)
    chunks = stream(client)
    events = iter(chunks)
    next(events)
    assert in_flight(fleet) == 1  # the answer is still coming
    reserved = charged(fleet)
    rest = list(events)
    usage = rest[-1].usage
    assert usage is not None and usage.total_tokens < reserved - 20
    assert in_flight(fleet) == 0
    assert usage.total_tokens - 50 <= charged(fleet) <= usage.total_tokens
    client.close()


def test_a_stream_closed_early_is_released_and_keeps_its_reservation(
    make_fleet: MakeFleet, sim: ProviderSim, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = fleet_for(make_fleet)
    client = sync_client(sim, fleet)
    chunks = stream(client)
    next(iter(chunks))
    reserved = charged(fleet)
    chunks.close()  # the caller walks away
    assert in_flight(fleet) == 0
    assert charged(fleet) >= reserved - 50  # no usage seen: the estimate stands
    again = stream(client)  # the connection and the cap are free for the next call
    assert list(again)[-1].usage is not None
    client.close()
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_a_connection_broken_mid_stream_releases_the_slot(make_fleet: MakeFleet) -> None:
    fleet = fleet_for(make_fleet)
    sim = ProviderSim(rpm=None, tpm=None, max_in_flight=4, latency=5.0).start()
    body = {"model": "sim", "messages": MESSAGES, "stream": True}
    with httpx.Client(transport=FleetTransport(fleet, "llm")) as client:
        request = client.build_request("POST", f"{sim.base_url}/chat/completions", json=body)
        response = client.send(request, stream=True)
        chunks = response.iter_raw()
        next(chunks)
        assert in_flight(fleet) == 1
        sim.stop()  # cuts the connection while the answer streams
        with pytest.raises(httpx.RemoteProtocolError):
            list(chunks)
        assert in_flight(fleet) == 0  # released by the error, before anybody closes
        response.close()


def test_an_async_stream_settles_and_releases(make_fleet: MakeFleet, sim: ProviderSim) -> None:
    fleet = fleet_for(make_fleet)

    async def main() -> tuple[int, int, int]:
        transport = AsyncFleetTransport(fleet, "llm")
        client = openai.AsyncOpenAI(
            base_url=sim.base_url,
            api_key="x",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=transport),
        )
        try:
            chunks = await client.chat.completions.create(
                model="sim",
                messages=MESSAGES,
                max_tokens=200,
                stream=True,
                stream_options={"include_usage": True},
            )
            held, last = -1, None
            async for chunk in chunks:
                if held < 0:
                    held = in_flight(fleet)
                last = chunk
            assert last is not None and last.usage is not None
            early = await client.chat.completions.create(
                model="sim", messages=MESSAGES, stream=True
            )
            async for _ in early:
                break
            await early.close()
            return held, last.usage.total_tokens, in_flight(fleet)
        finally:
            await client.close()
            await fleet.aclose()

    held, used, after = asyncio.run(main())
    assert (held, after) == (1, 0)
    assert charged(fleet) >= used + 200  # the early-closed stream keeps its estimate


def test_requests_that_are_not_model_calls_take_no_slot(
    make_fleet: MakeFleet, sim: ProviderSim
) -> None:
    fleet = make_fleet({"llm": {"max_in_flight": 1}}, max_wait=0)
    client = sync_client(sim, fleet)
    with fleet.slot("llm"):  # the cap is full
        with pytest.raises(openai.NotFoundError):  # the sim has no /models: but it was asked
            client.models.list()
        with pytest.raises(Throttled):
            client.chat.completions.create(model="sim", messages=MESSAGES)
    client.close()
    assert [r.status for r in sim.log] == []  # /models is not a chat request in its log


def test_tokens_option_and_paths_option(make_fleet: MakeFleet, sim: ProviderSim) -> None:
    fleet = fleet_for(make_fleet)
    client = sync_client(sim, fleet, tokens=lambda body: 5000 * len(body["messages"]))
    seen: list[int] = []
    events = iter(stream(client))
    next(events)
    seen.append(charged(fleet))
    list(events)
    assert 5000 - 50 <= seen[0] <= 5000
    client.close()
    fixed = sync_client(sim, fleet, tokens=0, paths=("/embeddings",))
    with fleet.slot("llm", max_wait=0):
        for _ in range(4):  # a full cap does not matter: chat is not in paths
            fixed.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=5)
    fixed.close()


@pytest.mark.fast
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("tokens", "many"),
        ("tokens", True),
        ("paths", "/chat/completions"),
        ("paths", ["chat"]),
        ("pushback", "ignore"),
    ],
)
def test_bad_options_are_config_errors_naming_them(option: str, value: Any) -> None:
    fleet = Fleet(limits={"llm": {"max_in_flight": 1}}, redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match=option):
        FleetTransport(fleet, "llm", **{option: value})
    with pytest.raises(ConfigError, match="unknown limit"):
        AsyncFleetTransport(fleet, "nope")
    with pytest.raises(ConfigError, match="transport"):
        FleetTransport(fleet, "llm", transport=httpx.AsyncHTTPTransport())  # type: ignore[arg-type]


@pytest.mark.fast
def test_arguments_swapped_or_no_fleet_is_a_config_error_naming_the_fleet() -> None:
    fleet = Fleet(limits={"llm": {"max_in_flight": 1}}, redis_url="redis://127.0.0.1:1/0")
    for transport in (FleetTransport, AsyncFleetTransport):
        with pytest.raises(ConfigError, match=r"celery_fleet\.Fleet first, got str"):
            transport("llm", fleet)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="got NoneType"):
            transport(None, "llm")  # type: ignore[arg-type]


def test_json_of_a_request_that_is_not_json_reserves_the_int(make_fleet: MakeFleet) -> None:
    fleet = fleet_for(make_fleet)
    seen: list[Any] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(charged(fleet))
        return httpx.Response(200, content=json.dumps({"usage": {"total_tokens": 3}}).encode())

    transport = FleetTransport(
        fleet, "llm", tokens=lambda body: 5000 if body == {} else 1,
        transport=httpx.MockTransport(answer),
    )  # fmt: skip
    with httpx.Client(transport=transport) as client:
        client.post("http://x/v1/chat/completions", content=b"not json")
    assert 5000 - 50 <= seen[0] <= 5000 and charged(fleet) <= 3


def test_a_stream_nobody_closes_is_released_when_collected(
    make_fleet: MakeFleet, sim: ProviderSim, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = fleet_for(make_fleet)
    body = {"model": "sim", "messages": MESSAGES, "stream": True}
    with httpx.Client(transport=FleetTransport(fleet, "llm")) as client:
        request = client.build_request("POST", f"{sim.base_url}/chat/completions", json=body)
        response = client.send(request, stream=True)
        next(response.iter_raw())
        assert in_flight(fleet) == 1
        del response  # dropped unread and unclosed
        gc.collect()
        assert in_flight(fleet) == 0
    assert "never closed" in caplog.text
