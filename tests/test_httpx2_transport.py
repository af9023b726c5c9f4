"""``celery_fleet.httpx2``: the transports over httpx2, the HTTP client the SDKs now make.

The anthropic SDK accepts only an ``httpx2`` client. A herd of the real SDK runs over
``FleetTransport`` against ProviderSim's Messages API; the exact usage arithmetic and the
529 use ``httpx2.MockTransport`` answering in Anthropic's wire format (JSON and server-sent
events); the openai SDK runs against ProviderSim. Real Redis.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from celery import Celery

from celery_fleet import Fleet, Throttled, fleet_task
from celery_fleet.contrib.stream_usage import UsageMeter
from celery_fleet.httpx2 import AsyncFleetTransport, FleetTransport
from celery_fleet.observability.status import limit_status
from celery_fleet.testing import ProviderSim

MakeFleet = Callable[..., Fleet]
DAY = 1_000_000


def fleet_for(make_fleet: MakeFleet, **limit: Any) -> Fleet:
    spec = {"max_in_flight": 4, "tokens": f"{DAY}/day", "burst": 1, **limit}
    return make_fleet({"llm": spec}, max_wait=600)


def charged(fleet: Fleet) -> int:
    (window,) = [w for w in limit_status(fleet, "llm").windows if "tokens" in w.window]
    return window.full - window.left


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sim",
    "content": [],
    "stop_reason": None,
    "stop_sequence": None,
}
START = {**MESSAGE, "usage": {"input_tokens": 25, "output_tokens": 1}}
STREAM = sse(
    {"type": "message_start", "message": START},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    {"type": "message_stop"},
)  # fmt: skip


def anthropic_answer(request: httpx2.Request) -> httpx2.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=STREAM)
    reply = {
        **MESSAGE,
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 2},
    }
    return httpx2.Response(200, json=reply)


ASK: dict[str, Any] = {
    "model": "claude-sim",
    "max_tokens": 3000,
    "messages": [{"role": "user", "content": "hello"}],
}


def test_the_anthropic_sdk_settles_json_and_streamed_usage(make_fleet: MakeFleet) -> None:
    fleet = fleet_for(make_fleet)
    transport = FleetTransport(fleet, "llm", transport=httpx2.MockTransport(anthropic_answer))
    client = anthropic.Anthropic(
        api_key="x", max_retries=0, http_client=httpx2.Client(transport=transport)
    )
    reply = client.messages.create(**ASK)
    assert reply.usage.input_tokens == 10
    assert 17 - 5 <= charged(fleet) <= 17  # 10 + 5 + 2 cache writes, not the 3002 reserved
    before = charged(fleet)
    events = iter(client.messages.create(**ASK, stream=True))
    next(events)
    assert limit_status(fleet, "llm").in_flight == 1
    assert charged(fleet) - before >= 3000  # reserved while it streams
    assert [e.type for e in events][-1] == "message_stop"
    assert limit_status(fleet, "llm").in_flight == 0
    assert 40 - 5 <= charged(fleet) - before <= 40  # message_start 25 in + message_delta 15 out
    client.close()


def test_an_anthropic_529_counts_as_an_overload(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(
        {"llm": {"max_in_flight": 8, "adaptive": True, "initial_in_flight": 8}}, max_wait=0
    )

    def overloaded(request: httpx2.Request) -> httpx2.Response:
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return httpx2.Response(529, json=error)

    transport = FleetTransport(fleet, "llm", transport=httpx2.MockTransport(overloaded))
    with anthropic.Anthropic(
        api_key="x", max_retries=0, http_client=httpx2.Client(transport=transport)
    ) as client:
        with pytest.raises(anthropic.APIConnectionError) as info:  # it wraps what we raise
            client.messages.create(**ASK)
    assert isinstance(info.value.__cause__, Throttled)
    assert info.value.__cause__.reason == "provider 529"
    assert fleet.adaptive_state("llm")["cap"] < 8  # the fleet backed off
    assert limit_status(fleet, "llm").in_flight == 0


def test_async_anthropic_stream(make_fleet: MakeFleet) -> None:
    fleet = fleet_for(make_fleet)

    async def main() -> list[str]:
        transport = AsyncFleetTransport(
            fleet, "llm", transport=httpx2.MockTransport(anthropic_answer)
        )
        async with anthropic.AsyncAnthropic(
            api_key="x", max_retries=0, http_client=httpx2.AsyncClient(transport=transport)
        ) as client:
            try:
                stream = await client.messages.create(**ASK, stream=True)
                return [event.type async for event in stream]
            finally:
                await fleet.aclose()

    assert asyncio.run(main())[-1] == "message_stop"
    assert limit_status(fleet, "llm").in_flight == 0
    assert 40 - 5 <= charged(fleet) <= 40


def test_openai_over_httpx2_against_the_simulator(make_fleet: MakeFleet) -> None:
    fleet = fleet_for(make_fleet)
    with ProviderSim(rpm=None, tpm=None, max_in_flight=4, latency=0.01) as sim:
        client = openai.OpenAI(
            base_url=sim.base_url,
            api_key="x",
            max_retries=0,
            http_client=httpx2.Client(transport=FleetTransport(fleet, "llm")),
        )
        messages = [{"role": "user", "content": "hi"}]
        reply = client.chat.completions.create(model="sim", messages=messages, max_tokens=300)
        assert reply.usage is not None
        streamed = client.chat.completions.create(
            model="sim",
            messages=messages,
            max_tokens=300,
            stream=True,
            stream_options={"include_usage": True},
        )
        last = list(streamed)[-1].usage
        assert last is not None
        client.close()
    used = reply.usage.total_tokens + last.total_tokens
    assert used - 50 <= charged(fleet) <= used


def test_a_refusal_the_sdk_wraps_still_reschedules_a_fleet_task(
    redis_url: str, namespace: str
) -> None:
    app = Celery("unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(
        fleet_redis_url=redis_url,
        fleet_namespace=namespace,
        fleet_limits={"llm": {"max_in_flight": 1}},
        fleet_max_wait=0,
    )
    fleet = Fleet(app)
    transport = FleetTransport(fleet, "llm", transport=httpx2.MockTransport(anthropic_answer))
    claude = anthropic.Anthropic(
        api_key="x", max_retries=0, http_client=httpx2.Client(transport=transport)
    )
    holder = fleet.slot("llm").acquire()  # the cap is full
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the eager reschedule's wait: the cap frees meanwhile
        sleeps.append(seconds)
        holder.release()

    fleet.clock.sleep = sleep  # type: ignore[method-assign]
    errors: list[BaseException] = []

    @fleet_task(app=app, shared=False)
    def agent() -> str:
        try:
            return claude.messages.create(**ASK).content[0].text  # type: ignore[union-attr]
        except anthropic.APIConnectionError as exc:  # what the SDK makes of Throttled
            errors.append(exc)
            raise

    assert agent.apply().get() == "Hi"
    assert len(sleeps) == 1 and isinstance(errors[0].__cause__, Throttled)
    claude.close()


@pytest.mark.fast
def test_the_meter_reads_gzip_json_and_sse_split_anywhere() -> None:
    body = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    meter = UsageMeter("application/json", "gzip")
    packed = gzip.compress(body)
    for i in range(0, len(packed), 7):
        meter.feed(packed[i : i + 7])
    meter.finish()
    assert meter.tokens == 7
    stream = UsageMeter("text/event-stream; charset=utf-8")
    for i in range(0, len(STREAM), 5):  # events cut mid-line
        stream.feed(STREAM[i : i + 5])
    assert (stream.tokens, stream.ended) == (40, True)
    error = UsageMeter("text/event-stream")
    error.feed(sse({"type": "error", "error": {"type": "overloaded_error", "message": "x"}}))
    assert error.signal is not None and error.signal.kind == "overloaded"
    unknown = UsageMeter("application/json", "br")
    unknown.feed(b"\x00\x01")
    unknown.finish()
    assert unknown.tokens is None


def test_a_herd_of_anthropic_clients_over_the_transport_against_the_simulator(
    make_fleet: MakeFleet,
) -> None:
    """The real Anthropic SDK over ``FleetTransport`` against ProviderSim's /v1/messages (a
    provider allowing what the fleet does): no 429s, the cap held, usage settled, also for
    streamed answers (message_start + message_delta)."""
    import threading

    fleet = fleet_for(make_fleet, rpm=600)
    used: list[int] = []
    errors: list[BaseException] = []
    with ProviderSim(rpm=600, tpm=None, max_in_flight=4, latency=0.03, seed=3) as sim:
        client = anthropic.Anthropic(
            base_url=sim.url,
            api_key="x",
            max_retries=0,
            http_client=httpx2.Client(transport=FleetTransport(fleet, "llm")),
        )
        gate = threading.Barrier(30)

        def agent(i: int) -> None:
            gate.wait()
            ask = {**ASK, "max_tokens": 200, "messages": [{"role": "user", "content": f"q{i}"}]}
            try:
                if i % 3:
                    reply = client.messages.create(**ask)
                    used.append(reply.usage.input_tokens + reply.usage.output_tokens)
                else:
                    with client.messages.stream(**ask) as stream:
                        final = stream.get_final_message()
                    used.append(final.usage.input_tokens + final.usage.output_tokens)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=agent, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        client.close()
        stats = sim.stats()
    assert not errors, errors[:3]
    assert stats["ok"] == 30 and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] <= 4
    assert limit_status(fleet, "llm").in_flight == 0
    assert sum(used) - 60 <= charged(fleet) <= sum(used)  # settled, not 30 x ~200 reserved
