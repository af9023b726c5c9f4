"""ProviderSim's phases for issue 25: garbage kinds in a share of 200 answers, a real capacity
above the declared one (reported in the headers), and a provider that sends no limit headers.

Real servers on port 0, real HTTP (httpx, the anthropic SDK).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import pytest

from celery_fleet.testing import Phase, ProviderSim, parse_phase
from celery_fleet.testing.garbage import KINDS, REFUSAL_TEXT, TRUNCATED_TOKENS

pytest_plugins = ["celery_fleet.testing.pytest_plugin"]

MakeSim = Callable[..., ProviderSim]
UNLIMITED: dict[str, Any] = {"rpm": None, "tpm": None, "max_in_flight": None, "latency": 0.0}
PROMPT = "plan the next step of the migration carefully"


@pytest.fixture
def sims(make_provider_sim: MakeSim) -> MakeSim:
    return lambda **kwargs: make_provider_sim(**{**UNLIMITED, **kwargs})


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def chat(http: httpx.Client, sim: ProviderSim, max_tokens: int = 64) -> httpx.Response:
    body = {"model": "sim", "messages": [{"role": "user", "content": PROMPT}]}
    return http.post(f"{sim.base_url}/chat/completions", json={**body, "max_tokens": max_tokens})


def test_each_garbage_kind_answers_200_with_its_own_kind_of_useless_output(
    sims: MakeSim, http: httpx.Client
) -> None:
    phases = [Phase(start=0, end=3600, garbage=kind) for kind in KINDS]
    seen = {}
    for kind, phase in zip(KINDS, phases, strict=True):
        sim = sims(phases=[phase], seed=3)
        answer = chat(http, sim, max_tokens=200)
        assert answer.status_code == 200
        seen[kind] = answer.json()["choices"][0]
        assert [r.kind for r in sim.log] == [kind]
        assert sim.stats()["garbage_kinds"] == {kind: 1}
    assert seen["empty"]["message"]["content"] == ""
    truncated = seen["truncated"]
    assert truncated["finish_reason"] == "length"
    assert len(truncated["message"]["content"].split()) == TRUNCATED_TOKENS
    assert seen["refusal"]["message"]["content"] == REFUSAL_TEXT
    with pytest.raises(json.JSONDecodeError):
        json.loads(seen["invalid_json"]["message"]["content"])
    words = seen["repetition"]["message"]["content"].split()
    assert len(words) >= 16 and len(set(words)) == 1
    # every kind but "truncated" finishes normally: only its text gives it away
    assert {k: v["finish_reason"] for k, v in seen.items() if k != "truncated"} == {
        k: "stop" for k in KINDS if k != "truncated"
    }


def test_a_garbage_share_spoils_only_that_share_of_answers(
    sims: MakeSim, http: httpx.Client
) -> None:
    sim = sims(phases=[Phase(start=0, end=3600, garbage="refusal", share=0.25)], seed=11)
    answers = [chat(http, sim).json()["choices"][0]["message"]["content"] for _ in range(200)]
    refusals = answers.count(REFUSAL_TEXT)
    assert 30 <= refusals <= 70  # 50 expected; seeded, so the same figure every run
    assert sim.stats()["garbage"] == refusals
    assert sim.stats()["ok"] == 200 - refusals


def test_garbage_kinds_in_anthropic_dialect(sims: MakeSim) -> None:
    sim = sims(phases=[Phase(start=0, end=3600, garbage="truncated")], seed=3)  # a long answer
    with anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=0) as client:
        message = client.messages.create(
            model="sim", max_tokens=200, messages=[{"role": "user", "content": PROMPT}]
        )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == TRUNCATED_TOKENS


def test_headers_report_the_real_capacity_above_what_a_user_declares(
    sims: MakeSim, http: httpx.Client
) -> None:
    # a user declares 600 rpm; from t=0 the provider really allows 900
    sim = sims(rpm=600, burst_s=6, phases=[Phase(start=0, end=3600, rpm=900)])
    answer = chat(http, sim)
    assert answer.headers["x-ratelimit-limit-requests"] == "900"
    assert sim.effective_limits().rpm == 900
    statuses = [chat(http, sim).status_code for _ in range(100)]
    assert 85 <= statuses.count(200) <= 92  # a bucket of 900 * 6 / 60 = 90, not 60


def test_no_rate_limit_headers_leaves_only_the_429_to_tell(
    sims: MakeSim, http: httpx.Client
) -> None:
    sim = sims(rpm=60, burst_s=2, rate_limit_headers=False)  # a bucket of 2
    answers = [chat(http, sim) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    for a in answers:
        assert not [h for h in a.headers if "ratelimit" in h.lower()]
    assert int(answers[2].headers["retry-after-ms"]) > 0


def test_phase_garbage_and_share_are_validated_and_parsed() -> None:
    assert parse_phase("0:60:garbage=refusal,share=0.02") == Phase(
        0, 60, garbage="refusal", share=0.02
    )
    assert Phase(0, 1, garbage=True).garbage == "empty"
    with pytest.raises(ValueError, match="garbage must be one of"):
        Phase(0, 1, garbage="nonsense")
    with pytest.raises(ValueError, match="share must be in"):
        Phase(0, 1, garbage="empty", share=0)
    with pytest.raises(ValueError, match="unknown key or value"):
        parse_phase("0:1:garbage=gibberish")
