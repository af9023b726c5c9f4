"""Anthropic's Messages API as the simulator speaks it: requests, replies, errors, headers, SSE.

Pure functions (no sockets, no clocks read) so the shapes the ``anthropic`` SDK expects live
in one place, beside :mod:`celery_fleet.testing.wire` (OpenAI's). The serving side, which
shares the simulator's buckets, log and phases with the OpenAI path, is
:mod:`celery_fleet.testing.messages`.

Example::

    request = parse_messages_request(b'{"model": "m", "max_tokens": 64, "messages": [...]}')
    body = message_body(message_id="msg_1", request=request, output_tokens=12)
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .limiter import CONCURRENCY, REQUESTS, TOKENS, Bucket, Decision
from .wire import BadRequest, content_text, format_number

__all__ = [
    "MessagesRequest",
    "parse_messages_request",
    "error_type",
    "anthropic_error",
    "message_body",
    "ratelimit_headers",
    "rate_limit_refusal",
    "sse_events",
    "sse_bytes",
]

#: Anthropic's error ``type`` for each HTTP status it uses (docs: API errors).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class MessagesRequest:
    """The parts of a ``POST /v1/messages`` body the simulator uses.

    ``cost`` is what the simulator's tokens-per-minute bucket is charged on arrival, as for
    OpenAI: ``ceil(characters of system + messages / 4)`` plus ``max_tokens`` (Anthropic
    estimates output from ``max_tokens`` too; the simulator has one combined bucket).
    """

    model: str
    input_tokens: int
    max_tokens: int
    prompt_words: tuple[str, ...]
    stream: bool = False

    @property
    def cost(self) -> int:
        """Tokens charged against the tokens-per-minute bucket: input estimate + ``max_tokens``."""
        return self.input_tokens + self.max_tokens


def _text(content: Any, where: str) -> str:
    """Text of a ``content`` or ``system``: a string or a list of blocks (``{"type": "text"}``)."""
    error = f"{where}: Input should be a valid string or a list of content blocks"
    return content_text(content, error, where)


def parse_messages_request(raw: bytes) -> MessagesRequest:
    """Validate a Messages API body; raise :class:`~celery_fleet.testing.wire.BadRequest`
    with Anthropic's wording (``max_tokens: Field required``) when it is not one.

    ``model``, ``max_tokens`` (an integer >= 1) and a non-empty ``messages`` list are
    required, as by the real API; ``system`` counts towards the input.
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("There was an issue with your request body: invalid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    for field in ("model", "max_tokens", "messages"):
        if field not in body:
            raise BadRequest(f"{field}: Field required", field)
    model, max_tokens, messages = body["model"], body["max_tokens"], body["messages"]
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Input should be a valid string", "model")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"max_tokens: Input should be >= 1, got {max_tokens!r}", "max_tokens")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: at least one message is required", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages: each message must be an object", "messages")
    texts = [_text(m.get("content"), "messages") for m in messages]
    system = _text(body.get("system"), "system")
    return MessagesRequest(
        model=model,
        input_tokens=math.ceil((len(system) + sum(len(t) for t in texts)) / 4),
        max_tokens=max_tokens,
        prompt_words=tuple(texts[-1].split()[:64]),
        stream=bool(body.get("stream")),
    )


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status (``api_error`` for an unlisted one)."""
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error(status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    """An Anthropic error: ``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    error = {"type": error_type(status), "message": message}
    body: dict[str, Any] = {"type": "error", "error": error}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def _message(
    message_id: str, request: MessagesRequest, content: list[Any], stop: Any
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": request.input_tokens, "output_tokens": 0},
    }


def _output(
    request: MessagesRequest, output_tokens: int, garbage: bool | str
) -> tuple[str, int, str]:
    """Text, output tokens and Anthropic stop reason of an answer (garbage kinds as OpenAI's)."""
    from .garbage import garbage_output

    kind = "empty" if garbage is True else (garbage or "")
    text, tokens, finish = garbage_output(kind, request.prompt_words, output_tokens)
    return text, tokens, "max_tokens" if finish == "length" else "end_turn"


def message_body(
    *, message_id: str, request: MessagesRequest, output_tokens: int, garbage: bool | str = False
) -> dict[str, Any]:
    """A ``message`` object with one text block and ``usage``; ``garbage``: a kind of useless
    output (``True``: empty text, 0 output)."""
    text, output_tokens, stop = _output(request, output_tokens, garbage)
    body = _message(message_id, request, [{"type": "text", "text": text}], stop)
    body["usage"]["output_tokens"] = output_tokens
    return body


def sse_events(
    *, message_id: str, request: MessagesRequest, output_tokens: int, garbage: bool | str = False,
    pieces: int = 4,
) -> Iterator[tuple[str, dict[str, Any]]]:  # fmt: skip
    """The ``(event, data)`` of a streamed message, in Anthropic's order: ``message_start``
    (with ``usage.input_tokens``), ``content_block_start``, ``ping``, up to ``pieces``
    ``content_block_delta`` text deltas, ``content_block_stop``, ``message_delta`` (with
    ``usage.output_tokens``) and ``message_stop``."""
    text, output_tokens, stop = _output(request, output_tokens, garbage)
    yield (
        "message_start",
        {
            "type": "message_start",
            "message": _message(message_id, request, [], None),
        },
    )
    yield (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        },
    )
    yield "ping", {"type": "ping"}
    size = max(1, math.ceil(len(text) / max(1, pieces)))
    for start in range(0, len(text), size):
        delta = {"type": "text_delta", "text": text[start : start + size]}
        yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
    )
    yield "message_stop", {"type": "message_stop"}


def sse_bytes(event: str, data: Mapping[str, Any]) -> bytes:
    """One server-sent event as Anthropic writes it: ``event: <name>`` then ``data: <json>``."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ratelimit_headers(buckets: Mapping[str, Bucket], now_utc: dt.datetime) -> dict[str, str]:
    """``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` of limited dimensions.

    ``reset`` is an RFC 3339 time (rounded up to the second): when the bucket is full again.
    The simulator has one combined tokens bucket, so it sends the ``tokens`` headers
    (Anthropic's "most restrictive token limit"), not ``input-tokens``/``output-tokens``.
    """
    headers = {}
    for dim, bucket in buckets.items():
        full_at = now_utc + dt.timedelta(seconds=math.ceil(bucket.reset_s))
        headers[f"anthropic-ratelimit-{dim}-limit"] = format_number(bucket.limit)
        headers[f"anthropic-ratelimit-{dim}-remaining"] = str(math.floor(bucket.remaining + 1e-9))
        headers[f"anthropic-ratelimit-{dim}-reset"] = _rfc3339(full_at)
    return headers


def _refusal_message(
    request: MessagesRequest, decision: Decision, max_in_flight: int | None
) -> str:
    dim = decision.limit
    if dim == CONCURRENCY:
        return (
            f"Too many concurrent requests for {request.model}: your organization's limit is "
            f"{max_in_flight} concurrent requests. Please retry shortly."
        )
    bucket = decision.buckets[dim or REQUESTS]
    unit = "requests" if dim == REQUESTS else "tokens"
    where = f"your organization's rate limit of {format_number(bucket.limit)} {unit} per minute"
    if math.isinf(decision.wait_s):
        return (
            f"This request ({request.cost} tokens) exceeds {where} and can never succeed. "
            "Reduce the prompt length or the maximum tokens requested."
        )
    return f"This request would exceed {where}. Please retry after the retry-after header."


def rate_limit_refusal(
    request: MessagesRequest, decision: Decision, max_in_flight: int | None,
    request_id: str | None = None,
) -> tuple[int | None, dict[str, str], dict[str, Any]]:  # fmt: skip
    """The 429 for a refused request: ``(retry_after_ms, extra headers, error body)``.

    Anthropic sends ``retry-after`` in whole seconds (the exact wait rounded up), and none
    when the request can never pass (``retry_after_ms`` None); the simulator-only header
    ``x-sim-refused-by`` names the refusing limit (``requests``, ``tokens``, ``concurrency``).
    """
    dim = decision.limit or REQUESTS
    headers = {"x-sim-refused-by": dim}
    retry_after_ms = None
    if not math.isinf(decision.wait_s):
        retry_after_ms = max(1, math.ceil(decision.wait_s * 1000))
        headers["retry-after"] = str(math.ceil(retry_after_ms / 1000))
    message = _refusal_message(request, decision, max_in_flight)
    assert dim in (REQUESTS, TOKENS, CONCURRENCY)
    return retry_after_ms, headers, anthropic_error(429, message, request_id)
