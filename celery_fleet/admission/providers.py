"""Reading what providers say: exceptions, Retry-After and rate-limit headers.

Plain functions over duck-typed objects, so the core imports no SDK: an ``openai`` or
``anthropic`` ``APIStatusError`` (``status_code``, ``response.headers``, ``code``/``type``),
an ``httpx.HTTPStatusError`` (``response.status_code``), timeouts and connection errors
(by type or class name) are all understood.

Example::

    signal = classify(exc)            # Signal(kind="rate_limited", retry_after_ms=6596, ...)
    obs = parse_headers(resp.headers) # Observation(requests_remaining=..., tokens_limit=...)
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Signal", "Observation", "classify", "retry_after_ms", "parse_headers", "parse_duration"]

# kind -> the outcome the release script learns from (see scripts/_lib/adaptive.lua)
_OUTCOMES = {
    "ok": "ok",
    "overloaded": "overload",
    "timeout": "overload",
    "server_error": "fail",
    "connection": "fail",
    "invalid_output": "fail",
    "quota": "neutral",
    "other": "neutral",
}
# Phrases of 429s that never clear in seconds. Deliberately narrow: ordinary per-minute 429s
# also say "quota" (Azure's quotaincrease link, Gemini's "Quota exceeded ... PerMinute") or
# "billing" (OpenAI's payment-method hint), and those must stay throttles.
_QUOTA = re.compile(
    r"insufficient_quota|exceeded your current quota|credit balance is too low"
    r"|specified API usage limits|spend(ing)? limit|per day|\bRPD\b|\bTPD\b|PerDay",
    re.IGNORECASE,
)
#: A Retry-After longer than this is a quota running out, not a throttle (Azure says 86400 s).
LONG_WAIT_MS = 600_000
#: Libraries whose timeout / connection errors are the provider's, not the task's own.
_CLIENT_MODULES = frozenset(
    {
        "openai",
        "anthropic",
        "httpx",
        "httpx2",
        "httpcore",
        "requests",
        "urllib3",
        "aiohttp",
        "google",
        "litellm",
    }
)
_TRY_AGAIN = re.compile(r"try again in\s+((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


@dataclass(frozen=True)
class Signal:
    """What a call's ending tells the fleet.

    ``kind``: ``ok``, ``rate_limited``, ``quota``, ``overloaded``, ``timeout``,
    ``server_error``, ``connection``, ``invalid_output`` or ``other`` (not the provider's
    doing). ``dimension`` for a 429: ``requests``, ``tokens``, ``concurrency`` or None.
    """

    kind: str
    status: int | None = None
    retry_after_ms: int | None = None
    dimension: str | None = None
    detail: str = ""

    @property
    def outcome(self) -> str:
        """The release script's outcome code for this signal."""
        if self.kind == "rate_limited":
            return "rate" if self.dimension in ("requests", "tokens") else "congestion"
        return _OUTCOMES.get(self.kind, "neutral")


OK = Signal("ok")


@dataclass(frozen=True)
class Observation:
    """Rate-limit headers of one response: limits and remaining units (None: not sent)."""

    requests_limit: int | None = None
    requests_remaining: int | None = None
    tokens_limit: int | None = None
    tokens_remaining: int | None = None


def classify(exc: BaseException | None) -> Signal:
    """Classify how a call ended: ``None`` is success, anything else is read for signals."""
    if exc is None:
        return OK
    status = _status(exc)
    headers = _headers(exc)
    text = _text(exc)
    detail = text[:200]
    if status == 429:
        wait = retry_after_ms(headers, text)
        if _QUOTA.search(text) or (wait is not None and wait > LONG_WAIT_MS):
            return Signal("quota", status, wait, None, detail)
        return Signal("rate_limited", status, wait, _dimension(exc, text), detail)
    names = " ".join(c.__name__ for c in type(exc).__mro__)
    if status in (503, 529) or (status is None and "Overloaded" in names):
        wait = retry_after_ms(headers, text)
        return Signal("overloaded", status, min(wait, LONG_WAIT_MS) if wait else wait, None, detail)
    if status is not None and status >= 500:
        return Signal("server_error", status, None, None, detail)
    package = type(exc).__module__.split(".")[0]
    # LangChain's integrations re-raise the SDK's errors as their own subclasses
    # (langchain_openai.OpenAITimeoutError): theirs are the provider's too.
    from_client = package in _CLIENT_MODULES or package.startswith("langchain_")
    if isinstance(exc, TimeoutError) or (from_client and "Timeout" in names):
        return Signal("timeout", status, None, None, detail)
    if isinstance(exc, ConnectionError) or (from_client and "Connect" in names):
        return Signal("connection", status, None, None, detail)
    return Signal("other", status, None, None, detail)


def retry_after_ms(headers: Any, text: str = "") -> int | None:
    """The wait a provider asked for: ``retry-after-ms``, ``retry-after`` (seconds or an HTTP
    date), else "Please try again in 6.596s" / "857ms" in the message; None when absent."""
    h = _lower(headers)
    try:
        if "retry-after-ms" in h:
            return _ms(float(h["retry-after-ms"]))
        if "retry-after" in h:
            value = h["retry-after"].strip()
            try:
                return _ms(float(value) * 1000)
            except ValueError:
                when = email.utils.parsedate_to_datetime(value)
                delta = when - dt.datetime.now(dt.timezone.utc)
                return _ms(delta.total_seconds() * 1000)
    except (TypeError, ValueError, OverflowError):
        pass
    match = _TRY_AGAIN.search(text or "")
    if match:
        seconds = parse_duration(match.group(1))
        if seconds is not None:
            return math.ceil(seconds * 1000)
    return None


def _ms(value: float) -> int | None:
    """A wait in whole ms; None for nonsense (inf, nan), never negative."""
    return max(0, math.ceil(value)) if math.isfinite(value) else None


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations (``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``) in seconds."""
    parts = _DURATION_PART.findall(text or "")
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def parse_headers(headers: Any) -> Observation:
    """OpenAI ``x-ratelimit-*`` and Anthropic ``anthropic-ratelimit-*`` headers.

    Anthropic's combined or input-token headers count as tokens; its output-token headers
    are ignored (OTPM is a budget of its own, usually far below the combined one).
    """
    h = _lower(headers)

    def first(*names: str) -> int | None:
        values = [_int(h.get(n)) for n in names]
        present = [v for v in values if v is not None]
        return min(present) if present else None

    return Observation(
        requests_limit=first("x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit"),
        requests_remaining=first(
            "x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining"
        ),
        tokens_limit=first(
            "x-ratelimit-limit-tokens",
            "anthropic-ratelimit-tokens-limit",
            "anthropic-ratelimit-input-tokens-limit",
        ),
        tokens_remaining=first(
            "x-ratelimit-remaining-tokens",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-input-tokens-remaining",
        ),
    )


def _status(exc: BaseException) -> int | None:
    for value in (
        getattr(exc, "status_code", None),
        getattr(getattr(exc, "response", None), "status_code", None),
    ):
        if isinstance(value, int):
            return value
    return None


def _headers(exc: BaseException) -> Any:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return headers if hasattr(headers, "items") else {}


def _text(exc: BaseException) -> str:
    parts = [str(exc)]
    for attr in ("code", "type"):
        value = getattr(exc, attr, None)
        if isinstance(value, str):
            parts.append(value)
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        parts.extend(str(body.get(k, "")) for k in ("code", "type", "message"))
    return " ".join(parts)


def _dimension(exc: BaseException, text: str) -> str | None:
    if "concurren" in text.lower():
        return "concurrency"
    kind = getattr(exc, "type", None)
    body = getattr(exc, "body", None)
    if not isinstance(kind, str) and isinstance(body, Mapping):
        kind = body.get("type")
    if kind in ("requests", "tokens"):
        return str(kind)
    lowered = text.lower()
    if "tokens per min" in lowered or "(tpm)" in lowered:
        return "tokens"
    if "requests per min" in lowered or "(rpm)" in lowered:
        return "requests"
    return None


def _lower(headers: Any) -> dict[str, str]:
    if not headers:
        return {}
    try:
        return {str(k).lower(): str(v) for k, v in headers.items()}
    except AttributeError:
        return {}


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) else None
