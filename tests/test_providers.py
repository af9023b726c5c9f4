"""Reading provider signals: real SDK exception objects, headers and Retry-After forms."""

from __future__ import annotations

import email.utils
import time

import httpx
import openai
import pytest

from celery_fleet.admission.providers import classify, parse_duration, parse_headers, retry_after_ms

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
    # output tokens are a budget of their own: not the tokens the fleet's TPM window counts
    assert (obs.requests_limit, obs.requests_remaining, obs.tokens_remaining) == (50, 3, 20000)
    assert parse_headers(None).requests_remaining is None


@pytest.mark.parametrize(
    "message",
    [
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
        "2024-02-01 have exceeded token rate limit of your current OpenAI S0 pricing tier. "
        "Please retry after 6 seconds. Please go here: https://aka.ms/oai/quotaincrease if you "
        "would like to further increase the default rate limit.",
        "Rate limit reached for gpt-4o in organization org-x on requests per min (RPM): Limit 3 "
        "/ min. Please try again in 20s. Visit https://platform.openai.com/account/billing to "
        "add a payment method.",
        "Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_requests,"
        " limit: 15, quotaId: GenerateRequestsPerMinutePerProjectPerModel-FreeTier.",
    ],
)
def test_per_minute_429s_that_mention_quota_or_billing_stay_throttles(message: str) -> None:
    sig = classify(status_error(openai.RateLimitError, 429, {"retry-after": "6"}, {}, message))
    assert sig.kind == "rate_limited" and sig.retry_after_ms == 6000


def test_nonsense_and_huge_retry_after_values() -> None:
    assert retry_after_ms({"retry-after": "inf"}) is None
    assert retry_after_ms({"retry-after-ms": "1e400"}) is None
    assert parse_headers({"x-ratelimit-remaining-tokens": "inf"}).tokens_remaining is None
    day = status_error(openai.RateLimitError, 429, {"retry-after": "86400"}, {}, "slow down")
    assert classify(day).kind == "quota"  # a day's wait is a quota, not a throttle


def test_errors_from_the_task_itself_are_not_provider_signals() -> None:
    import redis

    assert classify(redis.ConnectionError("our own Redis")).kind == "other"
    assert classify(redis.TimeoutError("our own Redis")).kind == "other"
    assert classify(RuntimeError("overloaded with work")).kind == "other"
