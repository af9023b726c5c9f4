"""ProviderSim's Anthropic Messages endpoint against the real ``anthropic`` SDK (and httpx).

Limits are chosen so that refill during a test is negligible (rpm=6 refills one request per
10 s), which lets every count be asserted exactly.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from celery_fleet.admission.providers import classify, parse_headers
from celery_fleet.testing import Phase, ProviderSim

pytest_plugins = ["celery_fleet.testing.pytest_plugin"]

MakeSim = Callable[..., ProviderSim]
UNLIMITED: dict[str, Any] = {"rpm": None, "tpm": None, "max_in_flight": None, "latency": 0.0}
HELLO = [{"role": "user", "content": "hello there world"}]  # 17 characters: 5 tokens


@pytest.fixture
def sims(make_provider_sim: MakeSim) -> MakeSim:
    return lambda **kwargs: make_provider_sim(**{**UNLIMITED, **kwargs})


@pytest.fixture
def client_for() -> Iterator[Callable[[ProviderSim], anthropic.Anthropic]]:
    made: list[anthropic.Anthropic] = []

    def make(sim: ProviderSim) -> anthropic.Anthropic:
        made.append(anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=0))
        return made[-1]

    yield make
    for client in made:
        client.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_the_sdk_parses_a_message_with_usage_and_ratelimit_headers(
    sims: MakeSim, client_for: Any
) -> None:
    sim = sims(rpm=6, tpm=6000, burst_s=50, seed=3)  # capacity 5 requests, 5000 tokens
    client = client_for(sim)
    raw = client.messages.with_raw_response.create(
        model="sim-haiku", max_tokens=40, system="be brief", messages=HELLO
    )
    message = raw.parse()

    assert isinstance(message, anthropic.types.Message)
    assert message.role == "assistant" and message.model == "sim-haiku"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.input_tokens == 7  # ceil((8 + 17) / 4): system counts
    assert 1 <= message.usage.output_tokens <= 40
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "6"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "4"
    assert raw.headers["anthropic-ratelimit-tokens-remaining"] == str(5000 - 47)
    reset = dt.datetime.fromisoformat(raw.headers["anthropic-ratelimit-requests-reset"])
    assert reset > dt.datetime.now(dt.timezone.utc)  # RFC 3339: when the bucket is full
    assert raw.headers["request-id"].startswith("req_")
    seen = parse_headers(raw.headers)  # the fleet reads them as the provider's remaining
    assert (seen.requests_remaining, seen.tokens_limit) == (4, 6000)
    assert sim.log[-1].cost == 47 and sim.log[-1].completion_tokens == message.usage.output_tokens


def test_openai_and_anthropic_calls_share_one_account(sims: MakeSim, client_for: Any) -> None:
    sim = sims(rpm=6, burst_s=30)  # capacity 3 requests, for both wire formats together
    claude = client_for(sim)
    gpt = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
    claude.messages.create(model="sim", max_tokens=8, messages=HELLO)
    gpt.chat.completions.create(model="sim", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    claude.messages.create(model="sim", max_tokens=8, messages=HELLO)

    with pytest.raises(anthropic.RateLimitError) as refused:
        claude.messages.create(model="sim", max_tokens=8, messages=HELLO)
    with pytest.raises(openai.RateLimitError):
        gpt.chat.completions.create(model="sim", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    gpt.close()

    assert sim.stats()["ok"] == 3 and sim.stats()["rate_limited"]["requests"] == 2
    error = refused.value
    assert error.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert error.response.headers["x-sim-refused-by"] == "requests"
    assert 1 <= int(error.response.headers["retry-after"]) <= 10  # whole seconds, as Anthropic
    signal = classify(error)  # what a fleet slot makes of it
    assert (signal.kind, signal.dimension) == ("rate_limited", "requests")
    assert signal.retry_after_ms == int(error.response.headers["retry-after"]) * 1000


def test_a_token_refusal_and_a_request_that_can_never_pass(sims: MakeSim, client_for: Any) -> None:
    sim = sims(tpm=600, burst_s=10)  # 100 tokens of capacity
    client = client_for(sim)
    client.messages.create(model="sim", max_tokens=80, messages=HELLO)  # 85 tokens
    with pytest.raises(anthropic.RateLimitError) as later:
        client.messages.create(model="sim", max_tokens=80, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as never:
        client.messages.create(model="sim", max_tokens=500, messages=HELLO)

    assert classify(later.value).dimension == "tokens"
    assert "retry-after" in later.value.response.headers
    assert "retry-after" not in never.value.response.headers
    assert "can never succeed" in str(never.value)
    assert [r.retry_after_ms is None for r in sim.log if r.outcome == "429"] == [False, True]


def test_a_529_phase_is_an_overloaded_error(sims: MakeSim, client_for: Any) -> None:
    sim = sims(phases=[Phase(start=0, end=600, status=529)])
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        client_for(sim).messages.create(model="sim", max_tokens=8, messages=HELLO)

    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert classify(overloaded.value).kind == "overloaded"
    assert sim.stats()["errors_other"] == 1 and sim.stats()["tokens_charged"] == 0


def test_bad_requests_get_anthropic_400s(sims: MakeSim) -> None:
    sim = sims()
    with httpx.Client(timeout=10) as http:
        no_budget = http.post(f"{sim.url}/v1/messages", json={"model": "sim", "messages": HELLO})
        empty = http.post(
            f"{sim.url}/v1/messages", json={"model": "sim", "max_tokens": 5, "messages": []}
        )

    assert no_budget.status_code == 400 and empty.status_code == 400
    assert no_budget.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    assert no_budget.json()["type"] == "error"
    assert sim.stats()["bad_requests"] == 2


def test_a_stream_parses_and_reports_usage_at_both_ends(sims: MakeSim, client_for: Any) -> None:
    sim = sims(seed=5)
    client = client_for(sim)
    with client.messages.stream(model="sim", max_tokens=30, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    raw_events = list(
        client.messages.create(model="sim", max_tokens=30, messages=HELLO, stream=True)
    )

    assert text == final.content[0].text and text  # type: ignore[union-attr]
    assert final.usage.input_tokens == 5
    assert final.usage.output_tokens == sim.log[0].completion_tokens
    assert [e.type for e in raw_events][:2] == ["message_start", "content_block_start"]
    assert [e.type for e in raw_events][-3:] == [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start, delta = raw_events[0], raw_events[-2]
    assert start.message.usage.input_tokens == 5  # type: ignore[union-attr]
    assert delta.usage.output_tokens == sim.log[1].completion_tokens  # type: ignore[union-attr]


def test_a_stream_is_in_flight_until_it_ends_or_is_dropped(sims: MakeSim, client_for: Any) -> None:
    sim = sims(max_in_flight=1, latency=2.0, latency_sigma=0.0)
    client = client_for(sim)
    stream = client.messages.create(model="sim", max_tokens=30, messages=HELLO, stream=True)
    first = next(iter(stream))

    assert first.type == "message_start"
    assert sim.stats()["in_flight"] == 1  # the answer is still being written
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model="sim", max_tokens=30, messages=HELLO)
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: sim.stats()["in_flight"] == 0)
    assert sim.stats()["rate_limited"]["concurrency"] == 1
