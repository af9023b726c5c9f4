"""Reading provider signals: real SDK exception objects, headers and Retry-After forms."""

from __future__ import annotations

import email.utils
import time

import httpx
import openai
import pytest

from celery_fleet.providers import classify, parse_duration, parse_headers, retry_after_ms

REQ = httpx.Request("POST", "http://sim/v1/chat/completions")


def status_error(
    cls: type,
    status: int,
    headers: dict | None = None,
    body: dict | None = None,
    message: str = "error",
) -> Exception:
    resp = httpx.Response(status, headers=headers or {}, request=REQ)
    return cls(message, response=resp, body=body)


def test_openai_rate_limit_with_retry_after_ms() -> None:
    exc = status_error(
        openai.RateLimitError,
        429,
        {"retry-after-ms": "1234", "retry-after": "2"},
        {"code": "rate_limit_exceeded", "type": "tokens"},
        "Rate limit reached for tokens per min (TPM)",
    )
    sig = classify(exc)
    assert (sig.kind, sig.retry_after_ms, sig.dimension, sig.outcome) == (
        "rate_limited",
        1234,
        "tokens",
        "rate",
    )


def test_concurrency_429_is_congestion_not_rate() -> None:
    exc = status_error(
        openai.RateLimitError,
        429,
        {"retry-after": "1"},
        {"type": "requests", "message": "Too many concurrent requests"},
        "Too many concurrent requests",
    )
    sig = classify(exc)
    assert (sig.dimension, sig.outcome, sig.retry_after_ms) == ("concurrency", "congestion", 1000)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"code": "insufficient_quota", "type": "insufficient_quota"}, "You exceeded your quota"),
        ({"type": "requests"}, "Rate limit reached on requests per day (RPD): Limit 10000"),
        ({}, "You have reached your specified API usage limits."),
    ],
)
def test_quota_429s_are_not_throttles(body: dict, message: str) -> None:
    exc = status_error(openai.RateLimitError, 429, {}, body, message)
    sig = classify(exc)
    assert sig.kind == "quota" and sig.outcome == "neutral"


def test_overloads_timeouts_server_errors_and_connections() -> None:
    overloaded = status_error(
        openai.InternalServerError,
        529,
        {"retry-after": "3"},
        {"type": "overloaded_error"},
        "Overloaded",
    )
    assert (classify(overloaded).kind, classify(overloaded).retry_after_ms) == ("overloaded", 3000)
    unavailable = status_error(openai.InternalServerError, 503, {}, None, "busy")
    assert classify(unavailable).outcome == "overload"
    assert classify(status_error(openai.InternalServerError, 500)).outcome == "fail"
    assert classify(openai.APITimeoutError(request=REQ)).kind == "timeout"
    assert classify(httpx.ReadTimeout("slow", request=REQ)).kind == "timeout"
    assert classify(TimeoutError()).kind == "timeout"
    assert classify(openai.APIConnectionError(request=REQ)).kind == "connection"
    assert classify(httpx.ConnectError("refused", request=REQ)).outcome == "fail"
    http_error = httpx.HTTPStatusError("x", request=REQ, response=httpx.Response(502, request=REQ))
    assert classify(http_error).kind == "server_error"


def test_user_errors_teach_nothing() -> None:
    assert classify(KeyError("x")).outcome == "neutral"
    assert classify(status_error(openai.BadRequestError, 400)).outcome == "neutral"
    assert classify(None).outcome == "ok"


def test_retry_after_forms() -> None:
    assert retry_after_ms({"Retry-After-Ms": "250.5"}) == 251
    assert retry_after_ms({"retry-after": "7"}) == 7000
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28_000 <= (retry_after_ms({"retry-after": date}) or 0) <= 30_000
    assert retry_after_ms({}, "Please try again in 6.596s. Visit ...") == 6596
    assert retry_after_ms({}, "Please try again in 857ms.") == 857
    assert retry_after_ms({}, "try again in 1m30s") == 90_000
    assert retry_after_ms({}, "no hint") is None


def test_durations() -> None:
    assert parse_duration("6m0s") == 360
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("soon") is None


def test_openai_and_anthropic_headers() -> None:
    obs = parse_headers(
        httpx.Headers(
            {
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "12",
                "x-ratelimit-limit-tokens": "90000",
                "x-ratelimit-remaining-tokens": "1500",
                "x-ratelimit-reset-tokens": "6m0s",
            }
        )
    )
    assert (obs.requests_limit, obs.requests_remaining, obs.tokens_limit, obs.tokens_remaining) == (
        500,
        12,
        90000,
        1500,
    )
    obs = parse_headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "3",
            "anthropic-ratelimit-input-tokens-remaining": "20000",
            "anthropic-ratelimit-output-tokens-remaining": "4000",
        }
    )
    assert (obs.requests_limit, obs.requests_remaining, obs.tokens_remaining) == (50, 3, 4000)
    assert parse_headers(None).requests_remaining is None
