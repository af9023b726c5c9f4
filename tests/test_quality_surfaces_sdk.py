"""``fleet.wrap(client)`` judges its answers itself on a limit with ``quality`` (issue 25).

The real openai and anthropic SDKs against ProviderSim, whose phases answer a share of
calls with garbage of one kind: every answer is judged with the call's own body
(``max_tokens``, ``response_format``), streams on the answer their events add up to once
they end, and the verdicts ride on the releases. Judging never raises into the caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from celery_fleet import Fleet
from celery_fleet.admission.slot import Slot
from celery_fleet.testing import Phase, ProviderSim

pytest_plugins = ["celery_fleet.testing.pytest_plugin"]

MakeFleet = Callable[..., Fleet]
MakeSim = Callable[..., ProviderSim]

#: Detectors that judge a simulated answer by what it is, not by its (random) length.
DETECTORS = ["empty", "truncated", "refusal", "json", "schema"]
QUALITY = {"window": 30, "min_calls": 1000, "detectors": DETECTORS}
PROMPT = [{"role": "user", "content": "name three rivers of france and say where each one ends"}]


@pytest.fixture
def fleet(make_fleet: MakeFleet) -> Fleet:
    return make_fleet(
        {"llm": {"rpm": 10**6, "max_in_flight": 8, "quality": QUALITY},
         "plain": {"rpm": 10**6, "max_in_flight": 8}},
        max_wait=30,
    )  # fmt: skip


def sim(make_provider_sim: MakeSim, garbage: str = "") -> ProviderSim:
    phases = [Phase(0, 10**6, garbage=garbage)] if garbage else []
    return make_provider_sim(rpm=None, tpm=None, max_in_flight=None, latency=0.01, phases=phases)


def counted(fleet: Fleet) -> tuple[int, int, dict[str, int]]:
    fleet.store.drain()
    q = fleet.quality("llm")
    return q.calls, q.garbage, dict(q.reasons)


def test_openai_answers_are_judged_with_the_call_s_own_body(
    fleet: Fleet, make_provider_sim: MakeSim
) -> None:
    good, refusing = sim(make_provider_sim), sim(make_provider_sim, "refusal")
    cut = sim(make_provider_sim, "truncated")
    for server in (good, refusing):
        client = fleet.wrap(openai.OpenAI(base_url=server.base_url, api_key="x"), limit="llm")
        for _ in range(3):
            reply = client.chat.completions.create(model="sim", messages=PROMPT, max_tokens=40)
            assert reply.choices[0].message.content  # the answer is returned, judged or not
    assert counted(fleet) == (6, 3, {"refusal": 3})
    client = fleet.wrap(openai.OpenAI(base_url=cut.base_url, api_key="x"), limit="llm")
    client.chat.completions.create(model="sim", messages=PROMPT, max_tokens=200)
    json_asked = fleet.wrap(openai.OpenAI(base_url=good.base_url, api_key="x"), limit="llm")
    json_asked.chat.completions.create(
        model="sim", messages=PROMPT, max_tokens=40, response_format={"type": "json_object"}
    )  # the simulator answers prose: not the JSON the body asked for
    assert counted(fleet) == (8, 5, {"refusal": 3, "truncated": 1, "json": 1})


def test_openai_streams_are_judged_once_they_end(fleet: Fleet, make_provider_sim: MakeSim) -> None:
    good, empty = sim(make_provider_sim), sim(make_provider_sim, "empty")
    options = {"stream": True, "stream_options": {"include_usage": True}}
    for server in (good, empty):
        client = fleet.wrap(openai.OpenAI(base_url=server.base_url, api_key="x"), limit="llm")
        chunks = list(client.chat.completions.create(
            model="sim", messages=PROMPT, max_tokens=40, **options))  # fmt: skip
        assert chunks[-1].usage is not None
    assert counted(fleet) == (2, 1, {"empty": 1})
    cut = sim(make_provider_sim, "truncated")
    client = fleet.wrap(openai.OpenAI(base_url=cut.base_url, api_key="x"), limit="llm")
    with client.chat.completions.create(model="sim", messages=PROMPT, max_tokens=200, **options):
        pass  # left before its end: what was read is not the answer, nothing is judged
    list(client.chat.completions.create(model="sim", messages=PROMPT, max_tokens=200, **options))
    assert counted(fleet) == (3, 2, {"empty": 1, "truncated": 1})  # usage gave the tokens


def test_an_async_openai_client_judges_calls_and_streams(
    fleet: Fleet, make_provider_sim: MakeSim
) -> None:
    refusing = sim(make_provider_sim, "refusal")

    async def main() -> None:
        raw = openai.AsyncOpenAI(base_url=refusing.base_url, api_key="x")
        client = fleet.wrap(raw, limit="llm")
        await client.chat.completions.create(model="sim", messages=PROMPT, max_tokens=40)
        stream = await client.chat.completions.create(
            model="sim", messages=PROMPT, max_tokens=40, stream=True
        )
        async for _ in stream:
            pass
        await raw.close()
        await fleet.aclose()

    asyncio.run(main())
    assert counted(fleet) == (2, 2, {"refusal": 2})


def test_anthropic_messages_created_streamed_and_managed_are_judged(
    fleet: Fleet, make_provider_sim: MakeSim
) -> None:
    good, refusing = sim(make_provider_sim), sim(make_provider_sim, "refusal")
    for server in (good, refusing):
        client = fleet.wrap(anthropic.Anthropic(base_url=server.url, api_key="x"), limit="llm")
        client.messages.create(model="sim", max_tokens=40, messages=PROMPT)
        list(client.messages.create(model="sim", max_tokens=40, messages=PROMPT, stream=True))
        with client.messages.stream(model="sim", max_tokens=40, messages=PROMPT) as stream:
            stream.until_done()
    assert counted(fleet) == (6, 3, {"refusal": 3})

    async def main() -> None:
        raw = anthropic.AsyncAnthropic(base_url=refusing.url, api_key="x")
        client = fleet.wrap(raw, limit="llm")
        await client.messages.create(model="sim", max_tokens=40, messages=PROMPT)
        async with client.messages.stream(model="sim", max_tokens=40, messages=PROMPT) as s:
            await s.until_done()
        await raw.close()
        await fleet.aclose()

    asyncio.run(main())
    assert counted(fleet) == (8, 5, {"refusal": 5})


def test_judging_that_fails_never_costs_the_caller_its_answer(
    fleet: Fleet,
    make_provider_sim: MakeSim,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = sim(make_provider_sim)

    def broken(self: Slot, resp: Any, **asked: Any) -> Any:
        raise RuntimeError("a bug in judging")

    monkeypatch.setattr(Slot, "judge", broken)
    client = fleet.wrap(openai.OpenAI(base_url=good.base_url, api_key="x"), limit="llm")
    with caplog.at_level(logging.WARNING, "celery_fleet"):
        reply = client.chat.completions.create(model="sim", messages=PROMPT, max_tokens=40)
        chunks = list(client.chat.completions.create(
            model="sim", messages=PROMPT, max_tokens=40, stream=True))  # fmt: skip
    assert reply.choices[0].message.content and chunks
    assert sum("judging an answer of 'llm' failed" in r.getMessage() for r in caplog.records) == 2
    assert fleet.admission.in_flight("llm") == 0  # released all the same


def test_a_limit_without_quality_judges_nothing(
    fleet: Fleet, make_provider_sim: MakeSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    judged: list[Any] = []
    real = Slot.judge

    def spy(self: Slot, resp: Any, **asked: Any) -> Any:
        judged.append(resp)
        return real(self, resp, **asked)

    monkeypatch.setattr(Slot, "judge", spy)
    refusing = sim(make_provider_sim, "refusal")
    for limit in ("plain", "llm"):
        client = fleet.wrap(openai.OpenAI(base_url=refusing.base_url, api_key="x"), limit=limit)
        client.chat.completions.create(model="sim", messages=PROMPT, max_tokens=40)
    assert len(judged) == 1


def test_the_simulator_s_healthy_answers_pass_every_detector(
    make_fleet: MakeFleet, make_provider_sim: MakeSim
) -> None:
    """``quality: True`` (every detector, ``repetition`` and ``length_shift`` too) against
    the simulator sees a clean baseline: its good answers are prose, not the prompt's words
    in a loop ("write a paragraph write a paragraph ..."), to a short prompt or a long one,
    in both dialects, judged by ``fleet.judge`` and ``slot.judge`` alike.

    The one finding left is ``length_shift`` on the rare answer of a few tokens: the
    simulator draws an answer's length uniformly from 1 to ``max_tokens``, and two words
    where about a hundred are usual is a shift, whatever the words."""
    fleet = make_fleet({"llm": {"rpm": 10**6, "quality": True}}, max_wait=30)
    server = make_provider_sim(rpm=None, tpm=None, max_in_flight=None, latency=0.001, seed=3)
    chat = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    messages = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    long = " ".join(f"{word} {n}" for n in range(40) for word in ("list", "item"))
    shifted: list[int] = []
    try:
        for n in range(80):  # past length_shift's warm-up of 50 answers
            prompt = [{"role": "user", "content": "write a paragraph" if n % 2 else long}]
            body: dict[str, Any] = {"model": "sim", "messages": prompt, "max_tokens": 300}
            answer: Any
            if n % 4 == 3:
                answer = messages.messages.create(**body)
                text, tokens = answer.content[0].text, answer.usage.output_tokens
            else:
                answer = chat.chat.completions.create(**body)
                text = answer.choices[0].message.content
                tokens = answer.usage.completion_tokens
            assert text and len(text.split(" ")) == tokens
            verdicts = [fleet.judge("llm", answer, request=body)]
            if n % 10 == 0:
                with fleet.slot("llm") as slot:
                    verdicts.append(slot.judge(answer, request=body))
            for verdict in verdicts:
                assert verdict.reasons in ((), ("length_shift",)), (text[:80], verdict)
                if verdict.reasons:
                    shifted.append(tokens)
    finally:
        chat.close()
        messages.close()
    assert all(tokens <= 5 for tokens in shifted) and len(shifted) <= 4, shifted
