"""The provider simulator against itself: real servers on port 0, the real openai SDK and httpx.

Limits are chosen so that refill during a test is negligible (e.g. rpm=6 refills one
request per 10 s), which lets every count be asserted exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from celery_fleet.testing import Phase, ProviderSim, parse_phase
from celery_fleet.testing.wire import format_duration, parse_duration

pytest_plugins = ["pytester", "celery_fleet.testing.pytest_plugin"]

ROOT = Path(__file__).resolve().parents[1]
MakeSim = Callable[..., ProviderSim]
UNLIMITED: dict[str, Any] = {"rpm": None, "tpm": None, "max_in_flight": None, "latency": 0.0}


class FakeClock:
    """A monotonic clock the test moves by hand, to drive phases without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sims(make_provider_sim: MakeSim) -> MakeSim:
    """Start a sim that is unlimited and instant except for what the test asks."""
    return lambda **kwargs: make_provider_sim(**{**UNLIMITED, **kwargs})


def chat(
    http: httpx.Client,
    sim: ProviderSim,
    content: str | list[str] = "hi",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> httpx.Response:
    contents = [content] if isinstance(content, str) else content
    body = {"model": "sim", "messages": [{"role": "user", "content": c} for c in contents]}
    return http.post(f"{sim.base_url}/chat/completions", json={**body, **extra}, headers=headers)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def test_rpm_admits_exactly_the_bucket_capacity(sims: MakeSim, http: httpx.Client) -> None:
    sim = sims(rpm=6, burst_s=50)  # capacity 5, refill 0.1/s
    answers = [chat(http, sim, max_tokens=5) for _ in range(8)]

    assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:5]] == list("43210")
    refused = answers[5]
    assert refused.headers["x-sim-refused-by"] == "requests"
    assert refused.json()["error"]["type"] == "requests"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert [r.limit for r in sim.log] == [None] * 5 + ["requests"] * 3
    stats = sim.stats()
    assert (stats["ok"], stats["rate_limited"]["requests"], stats["requests"]) == (5, 3, 8)


def test_429_headers_are_openai_shaped_and_consistent(sims: MakeSim, http: httpx.Client) -> None:
    sim = sims(rpm=6, tpm=60, burst_s=50)  # 5 requests and 50 tokens; 0.1 and 1 per s
    for _ in range(5):
        chat(http, sim, max_tokens=5)
    refused = chat(http, sim, max_tokens=5)

    assert refused.status_code == 429
    h = refused.headers
    retry_ms = int(h["retry-after-ms"])
    assert 9_000 < retry_ms <= 10_000  # one request at 0.1/s
    assert int(h["retry-after"]) == math.ceil(retry_ms / 1000)
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("6", "0")
    assert 49 < parse_duration(h["x-ratelimit-reset-requests"]) <= 50
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == ("60", "20")
    assert 29 < parse_duration(h["x-ratelimit-reset-tokens"]) <= 30  # 5 x 6 tokens at 1/s
    error = refused.json()["error"]
    assert error["param"] is None
    wait = re.search(r"Please try again in (\d+(?:\.\d+)?)(ms|s)\.", error["message"])
    assert wait is not None
    assert float(wait[1]) * (1 if wait[2] == "ms" else 1000) == pytest.approx(retry_ms)


def test_tpm_charges_prompt_estimate_plus_max_tokens_and_refusals_cost_nothing(
    sims: MakeSim, http: httpx.Client
) -> None:
    sim = sims(rpm=6, tpm=6, burst_s=600)  # 60 requests, 60 tokens; refill 0.1/s each
    first = chat(http, sim, ["abc", "de"], max_tokens=48)  # ceil(5 / 4) + 48 = 50
    over = chat(http, sim, "hi", max_tokens=10)  # 1 + 10 = 11 > 10 left
    fits = chat(http, sim, "hi", max_completion_tokens=8)  # 1 + 8 = 9
    huge = chat(http, sim, "hi")  # 1 + default 256 > capacity 60: can never pass

    assert [a.status_code for a in (first, over, fits, huge)] == [200, 429, 200, 429]
    assert first.headers["x-ratelimit-remaining-tokens"] == "10"
    assert over.headers["x-sim-refused-by"] == "tokens"
    assert over.json()["error"]["type"] == "tokens"
    assert 9_000 < int(over.headers["retry-after-ms"]) <= 10_000  # 1 token at 0.1/s
    # The refused request took neither a request nor tokens.
    assert over.headers["x-ratelimit-remaining-requests"] == "59"
    assert fits.headers["x-ratelimit-remaining-requests"] == "58"
    assert fits.headers["x-ratelimit-remaining-tokens"] == "1"
    assert "retry-after-ms" not in huge.headers and "retry-after" not in huge.headers
    assert huge.json()["error"]["message"].startswith("Request too large")
    assert [r.cost for r in sim.log] == [50, 11, 9, 257]
    assert sim.stats()["tokens_charged"] == 59


def test_concurrency_limit_is_exact(sims: MakeSim) -> None:
    sim = sims(max_in_flight=2, latency=0.5, latency_sigma=0.0, tpm=6, burst_s=600)
    barrier = threading.Barrier(4)
    answers: list[httpx.Response] = []

    def call() -> None:
        with httpx.Client(timeout=10) as client:
            barrier.wait()
            answers.append(chat(client, sim, "", max_tokens=10))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(a.status_code for a in answers) == [200, 200, 429, 429]
    refused = [a for a in answers if a.status_code == 429]
    assert all(a.headers["x-sim-refused-by"] == "concurrency" for a in refused)
    assert all(a.headers["retry-after-ms"] == "100" for a in refused)
    assert sorted(r.in_flight for r in sim.log) == [0, 1, 2, 2]
    stats = sim.stats()
    assert stats["rate_limited"]["concurrency"] == 2
    assert stats["max_in_flight_observed"] == 2
    assert stats["in_flight"] == 0
    with httpx.Client(timeout=10) as client:
        after = chat(client, sim, "", max_tokens=10)
    assert after.headers["x-ratelimit-remaining-tokens"] == "30"  # 60 - 3 admitted x 10


def test_waiting_retry_after_ms_is_enough_and_less_is_not(
    sims: MakeSim, http: httpx.Client
) -> None:
    sim = sims(rpm=60, burst_s=1)  # capacity 1, refill 1/s
    assert chat(http, sim).status_code == 200
    refused = chat(http, sim)
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 500 < wait_ms <= 1000

    time.sleep(wait_ms / 2000)
    early = chat(http, sim)
    assert early.status_code == 429
    time.sleep(int(early.headers["retry-after-ms"]) / 1000)
    assert chat(http, sim).status_code == 200


def test_openai_sdk_sees_completions_and_rate_limit_errors(sims: MakeSim) -> None:
    sim = sims(rpm=6, burst_s=10)  # capacity 1
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as client:
        messages: Any = [{"role": "user", "content": "tell me about rate limits"}]
        completion = client.chat.completions.create(model="sim", messages=messages, max_tokens=50)
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="sim", messages=messages, max_tokens=50)

    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == 7  # ceil(25 / 4)
    assert 1 <= usage.completion_tokens <= 50
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    headers = refused.value.response.headers
    assert int(headers["retry-after-ms"]) > 0
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.code == "rate_limit_exceeded"


def test_phases_outage_garbage_and_capacity_cut(sims: MakeSim, http: httpx.Client) -> None:
    clock = FakeClock()
    phases = [
        Phase(start=10, end=20, status=503),
        Phase(start=20, end=30, garbage=True),
        Phase(start=30, end=40, rpm=6),
    ]
    sim = sims(burst_s=50, phases=phases, clock=clock)

    def at(t_s: float, n: int = 1) -> list[httpx.Response]:
        clock.now = 1000.0 + t_s
        return [chat(http, sim, "phase test", max_tokens=20) for _ in range(n)]

    assert [a.status_code for a in at(5)] == [200]
    outage = at(15)[0]
    assert outage.status_code == 503
    assert outage.json()["error"]["type"] == "server_error"
    garbage = at(25)[0].json()
    assert garbage["choices"][0]["message"]["content"] == ""
    assert garbage["usage"]["completion_tokens"] == 0
    assert [a.status_code for a in at(35, 7)] == [200] * 5 + [429] * 2  # capacity 5 while cut
    assert [a.status_code for a in at(45, 7)] == [200] * 7
    stats = sim.stats()
    assert (stats["errors_503"], stats["garbage"], stats["rate_limited"]["requests"]) == (1, 1, 2)
    assert [r.outcome for r in sim.log[:3]] == ["ok", "503", "garbage"]
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as client:
        clock.now = 1015.0
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}])


def test_set_limits_changes_capacity_at_runtime(sims: MakeSim, http: httpx.Client) -> None:
    sim = sims(rpm=60, burst_s=50)  # capacity 50
    assert all(chat(http, sim).status_code == 200 for _ in range(6))
    sim.set_limits(rpm=6)  # capacity 5: the 44 tokens left are cut to 5 at once
    assert [chat(http, sim).status_code for _ in range(6)] == [200] * 5 + [429]
    sim.set_limits(rpm=None)
    assert chat(http, sim).status_code == 200
    with pytest.raises(ValueError, match="rpm"):
        sim.set_limits(rpm=1)  # 1 * 50 / 60 < one request: could never admit anything


def test_log_keeps_task_ids_and_stats_endpoint_serves_it(sims: MakeSim, http: httpx.Client) -> None:
    sim = sims()
    chat(http, sim, headers={"x-fleet-task-id": "task-1"})
    chat(http, sim, headers={"x-task-id": "task-2"})
    chat(http, sim)

    assert [r.task_id for r in sim.log] == ["task-1", "task-2", None]
    served = http.get(f"{sim.url}/stats", params={"log": "1"}).json()
    assert [r["task_id"] for r in served["log"]] == ["task-1", "task-2", None]
    assert (served["requests"], served["ok"]) == (3, 3)
    assert "log" not in http.get(f"{sim.url}/stats").json()
    assert http.post(f"{sim.url}/stats/reset").status_code == 200
    assert sim.stats()["requests"] == 0 and sim.log == []


def test_malformed_requests_get_400_and_the_server_survives(
    sims: MakeSim, http: httpx.Client
) -> None:
    sim = sims()
    url = f"{sim.base_url}/chat/completions"
    bad = [
        http.post(url, content=b"{not json"),
        http.post(url, json={"model": "sim", "messages": []}),
        http.post(url, json={"model": "sim", "messages": "hi"}),
        http.post(url, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}),
        http.post(
            url,
            json={"messages": [{"role": "user", "content": "x"}], "stream_options": {}},
        ),  # stream_options without stream=true
    ]
    assert [b.status_code for b in bad] == [400] * 5
    assert all(b.json()["error"]["type"] == "invalid_request_error" for b in bad)
    assert http.get(f"{sim.base_url}/models").status_code == 404
    host, port = sim.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: many\r\n\r\n")
        reply = b"".join(iter(lambda: raw.recv(4096), b""))  # the server closes after a 400
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"]["type"] == "invalid_request_error"

    assert chat(http, sim).status_code == 200
    assert (sim.stats()["bad_requests"], sim.stats()["ok"]) == (5, 1)


def test_cli_prints_url_serves_and_exits_cleanly_on_sigterm() -> None:
    args = ["--rpm", "600", "--tpm", "90000", "--max-in-flight", "8", "--latency", "0.01"]
    args += ["--port", "0", "--phase", "100:200:max_in_flight=4", "--phase", "300:400:status=503"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-m", "celery_fleet.testing.provider", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            assert ready, "the CLI printed nothing in 10 s"
            first = proc.stdout.readline().strip()
            found = re.fullmatch(r"listening (http://127\.0\.0\.1:\d+)", first)
            assert found, first
            with httpx.Client(timeout=10) as client:
                body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
                answer = client.post(f"{found[1]}/v1/chat/completions", json=body)
                assert answer.status_code == 200
                assert answer.headers["x-ratelimit-limit-requests"] == "600"
                assert client.get(f"{found[1]}/stats").json()["limits"]["max_in_flight"] == 8
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(err.strip().splitlines()[-1])["ok"] == 1


def test_cli_on_a_taken_port_says_so_in_one_line_and_exits_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "celery_fleet.testing.provider", "--port", str(port)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=30,
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_parse_phase_reads_the_cli_form_and_names_mistakes() -> None:
    assert parse_phase("10:25:max_in_flight=4") == Phase(10, 25, max_in_flight=4)
    assert parse_phase("30:40:status=503") == Phase(30, 40, status=503)
    assert parse_phase("40:45:garbage=1,rpm=300") == Phase(40, 45, rpm=300, garbage=True)
    for text, complaint in [
        ("10:25", "START:END"),
        ("25:10:rpm=5", "start < end"),
        ("1:2:tpms=5", "unknown key"),
        ("1:2:rpm=lots", "bad value"),
        ("1:2:garbage=0", "changes nothing"),
    ]:
        with pytest.raises(ValueError, match=complaint):
            parse_phase(text)


def test_durations_format_like_openai_and_parse_back() -> None:
    cases = {0.0: "0s", 0.02: "20ms", 0.0201: "21ms", 1.0: "1s", 8.64: "8.64s"}
    cases |= {360.0: "6m0s", 61.5: "1m1.5s", 3600.0: "1h0m0s"}
    for seconds, text in cases.items():
        assert format_duration(seconds) == text
        assert parse_duration(text) == pytest.approx(math.ceil(seconds * 1000) / 1000)
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_pytest_plugin_fixtures_start_and_stop_sims(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["celery_fleet.testing.pytest_plugin"]')
    pytester.makepyfile(
        """
        import httpx
        import pytest

        seen = []

        @pytest.mark.provider_sim(rpm=6, burst_s=10, latency=0)
        def test_marked(provider_sim):
            assert provider_sim.limits.rpm == 6
            seen.append(provider_sim.url)

        def test_factory(make_provider_sim, provider_sim):
            other = make_provider_sim(max_in_flight=1, latency=0)
            assert other.url != provider_sim.url and provider_sim.limits.rpm == 600
            seen.append(other.url)

        def test_all_stopped():
            for url in seen:
                with pytest.raises(httpx.ConnectError):
                    httpx.get(url + "/stats", timeout=2)
        """
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=3)


def test_a_streamed_answer_is_openai_sse_in_flight_until_its_last_event(
    sims: MakeSim, http: httpx.Client
) -> None:
    sim = sims(latency=2.0, latency_sigma=0.0)  # the frames after the first take 2 s
    body = {
        "model": "sim",
        "messages": [{"role": "user", "content": "one two three four five"}],
        "max_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", f"{sim.base_url}/chat/completions", json=body) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = answer.iter_lines()
        first = next(line for line in lines if line)
        assert sim.stats()["in_flight"] == 1  # still answering
        rest = [line for line in lines if line]
    assert sim.stats()["in_flight"] == 0
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in [first, *rest[:-1]]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])
    (record,) = sim.log
    assert len(text.split()) == record.completion_tokens == chunks[-1]["usage"]["completion_tokens"]
    plain = dict(body, stream_options=None)
    del plain["stream_options"]
    with http.stream("POST", f"{sim.base_url}/chat/completions", json=plain) as answer:
        events = [line for line in answer.iter_lines() if line]
    assert "usage" not in json.loads(events[-2].removeprefix("data: "))
