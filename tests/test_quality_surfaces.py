"""Judging wherever a call is made (issue 25): ``fleet.try_acquire`` / ``fleet.release``.

``fleet.judge(limit, resp, ...)`` judges an answer without a slot; ``fleet.release(decision,
verdict=...)`` counts it in the release's own round trip, as ``slot.judge`` does. The old
signatures (``release(decision)``, ``release(decision, "fail")``) keep working.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from celery_fleet import Fleet, Verdict
from celery_fleet.admission.decision import Decision
from celery_fleet.errors import ConfigError

MakeFleet = Callable[..., Fleet]

OK = {"choices": [{"message": {"content": "Paris is the capital."}, "finish_reason": "stop"}]}
EMPTY = {"choices": [{"message": {"content": " "}, "finish_reason": "stop"}]}
QUICK = {"window": 2, "min_calls": 20, "reset_timeout": 1, "probes": 10}
OURS = {"acquire", "release", "quality_count"}


def make(make_fleet: MakeFleet, **extra: Any) -> Fleet:
    return make_fleet({"llm": {"rpm": 10**7, "quality": QUICK, **extra}, "plain": {"rpm": 10**7}})


def judged_call(fleet: Fleet, resp: Any, outcome: str = "ok", **judging: Any) -> Verdict:
    decision = fleet.try_acquire("llm")
    assert decision.allowed
    verdict = fleet.judge("llm", resp, **judging)
    fleet.release(decision, outcome, verdict=verdict)
    return verdict


def test_a_verdict_rides_in_the_release_s_round_trip(make_fleet: MakeFleet) -> None:
    fleet = make(make_fleet)
    judged_call(fleet, OK)  # scripts loaded on this connection
    fleet.store.drain()
    writes: list[list[str]] = []
    combiner = fleet.store.combiner
    real = combiner._round_trip

    def spy(batch: list[Any], answered: list[Any]) -> Any:
        for c in batch:  # background threads may share the combiner: only ours count
            names = [name for name, _ in c.commands if name in OURS]
            if names:
                writes.append(names)
        return real(batch, answered)

    combiner._round_trip = spy  # type: ignore[method-assign]
    try:
        for resp in (OK, EMPTY):
            judged_call(fleet, resp)
        fleet.release(fleet.try_acquire("llm"))  # no verdict: the release alone, as before
    finally:
        combiner._round_trip = real  # type: ignore[method-assign]
    assert writes == [["acquire"], ["release", "quality_count"]] * 2 + [["acquire"], ["release"]]
    q = fleet.quality("llm")
    assert (q.calls, q.garbage) == (3, 1) and dict(q.reasons) == {"empty": 1}


def test_judge_reads_what_was_asked_and_counts_nothing_by_itself(make_fleet: MakeFleet) -> None:
    fleet = make(make_fleet)
    body = {"max_tokens": 1000, "response_format": {"type": "json_object"}}
    cut = {"choices": [{"message": {"content": '{"a": 1}'}, "finish_reason": "length"}],
           "usage": {"completion_tokens": 10}}  # fmt: skip
    assert fleet.judge("llm", cut, request=body).reasons == ("truncated",)
    assert fleet.judge("llm", OK, json=True).reasons == ("json",)
    assert fleet.judge("llm", OK).ok
    assert fleet.quality("llm").calls == 0  # judged, never released: nothing counted
    assert fleet.judge("llm", object()).ok  # not an answer: nothing found, nothing raised
    with pytest.raises(ConfigError, match="nope"):
        fleet.judge("nope", OK)


def test_validate_rejecting_the_answer_fails_the_availability_breaker(
    make_fleet: MakeFleet,
) -> None:
    breaker = {"breaker": {"min_calls": 5, "failure_rate": 0.5, "window": 30}}
    fleet = make(make_fleet, validate=lambda resp: "Paris" not in str(resp), **breaker)
    for _ in range(10):  # garbage alone is not a failure of the provider
        assert judged_call(fleet, EMPTY).reasons == ("empty",)
    assert fleet.breaker("llm").state().state == "closed"
    for _ in range(60):
        decision = fleet.try_acquire("llm")
        if not decision.allowed:
            break
        verdict = fleet.judge("llm", OK)
        assert verdict.reasons == ("validate",) and verdict.invalid
        fleet.release(decision, verdict=verdict)  # "ok" becomes "fail"
    assert decision.reason == "circuit_open"
    assert fleet.breaker("llm").state().state == "open"


def test_a_verdict_on_a_limit_without_quality_is_a_plain_release(make_fleet: MakeFleet) -> None:
    fleet = make(make_fleet)
    decision = fleet.try_acquire("plain")
    verdict = fleet.judge("plain", EMPTY)  # judged with every detector: the caller may log it
    assert verdict.reasons == ("empty",)
    assert fleet.release(decision, verdict=verdict).released
    assert fleet.admission.in_flight("plain") == 0


def test_the_old_signatures_and_a_bad_verdict(make_fleet: MakeFleet) -> None:
    fleet = make(make_fleet)
    assert fleet.release(fleet.try_acquire("llm")).released
    assert fleet.release(fleet.try_acquire("llm"), "fail").released
    decision = fleet.try_acquire("llm")
    with pytest.raises(ConfigError, match="verdict must be the Verdict fleet.judge"):
        fleet.release(decision, verdict="ok")  # type: ignore[arg-type]
    assert fleet.release(decision).released  # nothing was sent by the refused call
    assert fleet.quality("llm").calls == 0


def test_arelease_counts_a_verdict_too(make_fleet: MakeFleet) -> None:
    fleet = make(make_fleet)

    async def main() -> None:
        for resp in (OK, EMPTY, EMPTY):
            decision = await fleet.atry_acquire("llm")
            await fleet.arelease(decision, verdict=fleet.judge("llm", resp))
        with pytest.raises(ConfigError, match="verdict"):
            await fleet.arelease(await fleet.atry_acquire("llm"), verdict=1)  # type: ignore[arg-type]
        await fleet.aclose()

    asyncio.run(main())
    q = fleet.quality("llm")
    assert (q.calls, q.garbage) == (3, 2)


def test_the_reason_of_the_first_garbage_verdict_is_counted(make_fleet: MakeFleet) -> None:
    """The reason counters are halved once a window: that used to run after the first
    count was added, and a lone first reason (1, halved: 0) vanished from ``reasons``."""
    fleet = make(make_fleet)
    judged_call(fleet, EMPTY)
    q = fleet.quality("llm")
    assert (q.calls, q.garbage, dict(q.reasons)) == (1, 1, {"empty": 1})


def test_ajudge_awaits_an_async_validate_hook_judge_does_not_leave_it_pending(
    make_fleet: MakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    async def no_paris(resp: Any) -> bool:
        await asyncio.sleep(0)
        return "Paris" not in str(resp)

    fleet = make(make_fleet, validate=no_paris)

    async def main() -> Verdict:
        decision = await fleet.atry_acquire("llm")
        verdict = await fleet.ajudge("llm", OK)
        await fleet.arelease(decision, verdict=verdict)
        await fleet.aclose()
        return verdict

    verdict = asyncio.run(main())
    assert verdict.reasons == ("validate",) and verdict.invalid
    with caplog.at_level("WARNING", "celery_fleet"):
        assert fleet.judge("llm", OK).ok  # the coroutine is closed, not left un-awaited
    assert "needs await fleet.ajudge" in caplog.text
    assert fleet.quality("llm").garbage == 1


def test_a_stream_answer_adds_up_what_the_sdks_stream() -> None:
    """The shapes ProviderSim does not serve: legacy completions, Responses, tool calls."""
    from celery_fleet.contrib.answers import StreamAnswer
    from celery_fleet.quality import DETECTOR_NAMES, Ask, judge

    def assembled(*events: Any) -> StreamAnswer:
        answer = StreamAnswer()
        for event in events:
            answer.see(event)
        return answer

    legacy = assembled(
        {"choices": [{"index": 0, "text": "I'm sorry, but I can't", "finish_reason": None}]},
        {"choices": [{"index": 0, "text": " help with that.", "finish_reason": "stop"}]},
    )
    assert legacy.ended and judge(legacy.answer(), DETECTOR_NAMES, Ask()).reasons == ("refusal",)
    final = {"output_text": "", "incomplete_details": {"reason": "max_output_tokens"},
             "usage": {"output_tokens": 3}}  # fmt: skip
    responses = assembled(
        {"type": "response.output_text.delta", "delta": "x"},
        {"type": "response.incomplete", "response": final},
    )
    assert responses.ended and responses.answer() is final
    tools = assembled(
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]},
        {"choices": [{"index": 1, "delta": {"content": "ignored: not the first choice"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    )
    assert tools.ended and judge(tools.answer(), DETECTOR_NAMES, Ask()).ok  # not "empty"
    unfinished = assembled({"choices": [{"index": 0, "delta": {"content": "Par"}}]})
    assert not unfinished.ended
    anthropic = assembled(
        {"type": "message_start", "message": {"usage": {"input_tokens": 5}}},
        {"type": "content_block_start", "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "ok"}},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"output_tokens": 2},
        },  # fmt: skip
        {"type": "message_stop"},
    )
    verdict = judge(anthropic.answer(), DETECTOR_NAMES, Ask(max_tokens=100))
    assert anthropic.ended and verdict.reasons == ("truncated",)


def opened(fleet: Fleet, limit: str = "llm") -> None:
    """Open ``limit``'s quality breaker now (as a burst of garbage would) and let this
    process read it (its local copy is otherwise up to a second old)."""
    seconds, micros = fleet.store.call("TIME")
    now_ms = int(seconds) * 1000 + int(micros) / 1000
    key = fleet.admission.quality.key(limit)
    fleet.store.call("HSET", key, "state", "open", "opened_at", f"{now_ms:.3f}")
    assert fleet.quality(limit).state == "open"


def test_try_acquire_is_paused_or_moved_by_an_open_quality_breaker(make_fleet: MakeFleet) -> None:
    slow = {**QUICK, "reset_timeout": 60}
    paused = make_fleet({"llm": {"rpm": 10**7, "quality": {**slow, "on_degraded": "pause"}}})
    opened(paused)
    refused = paused.try_acquire("llm")
    assert not refused.allowed and refused.reason == "quality_degraded"
    assert 50_000 < refused.wait_ms <= 60_000 and paused.admission.in_flight("llm") == 0
    with pytest.raises(ConfigError, match="tokens"):
        paused.try_acquire("llm", tokens=-1)  # arguments are still checked

    moved = make_fleet(
        {
            "llm": {
                "rpm": 10**7,
                "tokens": "10000000/minute",
                "quality": {**slow, "on_degraded": "fallback:backup"},
            },
            "backup": {"rpm": 10**7, "tokens": "1000/minute"},
        },  # fmt: skip
        namespace=f"{paused.admission.namespace}-b",
    )
    opened(moved)
    decision = moved.try_acquire("llm", tokens=5000)
    most = moved.admission.limit("backup").max_tokens_per_call  # all the backup can admit
    assert decision.allowed and decision.limit == "backup" and decision.tokens == most
    assert moved.admission.in_flight("backup") == 1
    moved.release(decision, verdict=moved.judge("llm", OK))
    assert moved.admission.in_flight("backup") == 0

    async def main() -> tuple[Decision, Decision]:
        try:
            return await paused.atry_acquire("llm"), await moved.atry_acquire("llm")
        finally:
            await paused.aclose()
            await moved.aclose()

    refused, moved_decision = asyncio.run(main())
    assert refused.reason == "quality_degraded" and moved_decision.limit == "backup"
    moved.release(moved_decision)
