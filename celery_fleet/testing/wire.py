"""The OpenAI wire format as the simulator speaks it: request parsing, bodies, durations.

Everything here is pure (no sockets, no clocks) so the shapes the ``openai`` SDK expects
live in one place.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .limiter import CONCURRENCY, REQUESTS, TOKENS, Bucket, Decision
from .prose import reply_text

__all__ = [
    "BadRequest",
    "ChatRequest",
    "parse_chat_request",
    "format_duration",
    "parse_duration",
    "format_wait",
    "error_body",
    "completion_body",
    "stream_frames",
    "ratelimit_headers",
    "rate_limit_refusal",
    "content_text",
    "reply_text",
    "format_number",
]


class BadRequest(ValueError):
    """The request body is not a chat completion request the simulator can serve (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    """The parts of a ``/v1/chat/completions`` body the simulator uses.

    ``cost`` is what the TPM bucket is charged on arrival, the way OpenAI does it:
    a character estimate of the prompt (``ceil(chars / 4)``) plus ``max_tokens``.
    """

    model: str
    prompt_tokens: int
    max_tokens: int
    prompt_words: tuple[str, ...]
    stream: bool = False
    include_usage: bool = False

    @property
    def cost(self) -> int:
        """Tokens charged against TPM: prompt estimate + ``max_tokens``."""
        return self.prompt_tokens + self.max_tokens


def content_text(content: Any, error: str, param: str) -> str:
    """Text of a message ``content`` (or Anthropic's ``system``): a string, or a list of
    parts (``{"type": "text", "text": ...}``), other parts skipped; anything else raises
    :class:`BadRequest` (``error``, ``param``), each API in its own wording."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    raise BadRequest(error, param)


def parse_chat_request(raw: bytes, default_max_tokens: int = 256) -> ChatRequest:
    """Validate a chat completion body; raise :class:`BadRequest` with an OpenAI-like message.

    ``max_completion_tokens`` is accepted as a synonym of ``max_tokens``; when both are
    absent the request is charged ``default_max_tokens``. ``stream`` asks for server-sent
    events (:func:`stream_frames`), ``stream_options.include_usage`` for a last usage chunk.
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise BadRequest("Each message must be an object.", "messages")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not body.get("stream")):
        raise BadRequest(
            "'stream_options' must be an object, and needs stream=true.", "stream_options"
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(
            f"Invalid 'max_tokens': {max_tokens!r}; expected an integer >= 1.", "max_tokens"
        )
    error = "message content must be a string or a list of content parts"
    texts = [content_text(m.get("content"), error, "messages") for m in messages]
    model = body.get("model") if isinstance(body.get("model"), str) else "sim"
    return ChatRequest(
        model=model or "sim",
        prompt_tokens=math.ceil(sum(len(t) for t in texts) / 4),
        max_tokens=max_tokens,
        prompt_words=tuple(texts[-1].split()[:64]),
        stream=bool(body.get("stream")),
        include_usage=bool((options or {}).get("include_usage")),
    )


def format_duration(seconds: float) -> str:
    """Format a wait like OpenAI's ``x-ratelimit-reset-*`` (Go durations): ``20ms``, ``6m0s``.

    Rounded up to whole milliseconds so that waiting the printed time is always enough.

    Example::

        format_duration(360) == "6m0s"; format_duration(0.02) == "20ms"
    """
    ms = math.ceil(max(0.0, seconds) * 1000)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    head = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return f"{head}{secs}s"


_DURATION = re.compile(r"^(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$")
_MS = re.compile(r"^(?P<ms>\d+(?:\.\d+)?)ms$")


def parse_duration(text: str) -> float:
    """Seconds in an OpenAI reset duration (``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``).

    Raises ``ValueError`` on anything else. The inverse of :func:`format_duration`.

    Example::

        parse_duration("6m0s") == 360.0; parse_duration("20ms") == 0.02
    """
    text = text.strip()
    if found := _MS.match(text):
        return float(found["ms"]) / 1000
    found = _DURATION.match(text)
    if not text or not found:
        raise ValueError(f"not a duration: {text!r}")
    return int(found["h"] or 0) * 3600 + int(found["m"] or 0) * 60 + float(found["s"] or 0)


def format_wait(ms: int) -> str:
    """The "try again in" figure of a 429 message: ``857ms`` below a second, else ``6.596s``."""
    return f"{ms}ms" if ms < 1000 else f"{ms / 1000:.3f}s"


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """An OpenAI error object: ``{"error": {"message", "type", "code", "param"}}``."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def completion_body(
    *,
    request_id: str,
    created: int,
    request: ChatRequest,
    completion_tokens: int,
    garbage: bool | str = False,
) -> dict[str, Any]:
    """A ``chat.completion`` object with ``usage``; ``garbage``: a kind of useless output
    (:mod:`~celery_fleet.testing.garbage`; ``True`` is ``"empty"``: no content, 0 tokens)."""
    from .garbage import garbage_output

    kind = "empty" if garbage is True else (garbage or "")
    content, completion_tokens, finish = garbage_output(
        kind, request.prompt_words, completion_tokens
    )
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": request.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": request.prompt_tokens + completion_tokens,
        },
        "system_fingerprint": "fp_sim",
    }


def format_number(value: float) -> str:
    """A limit in a header or message: ``60`` for 60.0, ``0.5`` as it is."""
    return str(int(value)) if float(value).is_integer() else str(value)


def ratelimit_headers(buckets: Mapping[str, Bucket]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` of limited dimensions."""
    headers = {}
    for dim, bucket in buckets.items():
        headers[f"x-ratelimit-limit-{dim}"] = format_number(bucket.limit)
        headers[f"x-ratelimit-remaining-{dim}"] = str(math.floor(bucket.remaining + 1e-9))
        headers[f"x-ratelimit-reset-{dim}"] = format_duration(bucket.reset_s)
    return headers


def _refusal_message(
    request: ChatRequest, decision: Decision, max_in_flight: int | None, retry_after_ms: int | None
) -> str:
    dim = decision.limit
    if dim == CONCURRENCY:
        return (
            f"Too many concurrent requests for {request.model}: "
            f"Limit {max_in_flight} in flight. "
            f"Please try again in {format_wait(retry_after_ms or 0)}."
        )
    bucket = decision.buckets[dim or REQUESTS]
    unit, short, asked = (
        ("requests", "RPM", 1) if dim == REQUESTS else ("tokens", "TPM", request.cost)
    )
    where = (
        f"for {request.model} in organization org-sim on {unit} per min ({short}): "
        f"Limit {format_number(bucket.limit)}"
    )
    if retry_after_ms is None:
        return (
            f"Request too large {where}, Requested {asked}. "
            "The input or output tokens must be reduced in order to run successfully."
        )
    used = math.ceil(bucket.capacity - bucket.remaining - 1e-9)
    return (
        f"Rate limit reached {where}, Used {used}, Requested {asked}. "
        f"Please try again in {format_wait(retry_after_ms)}."
    )


def rate_limit_refusal(
    request: ChatRequest, decision: Decision, max_in_flight: int | None
) -> tuple[int | None, dict[str, str], dict[str, Any]]:
    """The 429 for a refused request: ``(retry_after_ms, extra headers, OpenAI error body)``.

    ``retry-after-ms`` is the exact wait rounded up to a millisecond and ``retry-after`` its
    ceiling in seconds; both are absent (``retry_after_ms`` None) when the request can never
    pass (cost above the bucket's capacity: OpenAI's "Request too large"). The error
    ``type`` is ``"tokens"`` for TPM and ``"requests"`` for RPM and concurrency; the
    simulator-only header ``x-sim-refused-by`` names the limit exactly.
    """
    dim = decision.limit or REQUESTS
    headers = {"x-sim-refused-by": dim}
    retry_after_ms = None
    if not math.isinf(decision.wait_s):
        retry_after_ms = max(1, math.ceil(decision.wait_s * 1000))
        headers["retry-after-ms"] = str(retry_after_ms)
        headers["retry-after"] = str(math.ceil(retry_after_ms / 1000))
    message = _refusal_message(request, decision, max_in_flight, retry_after_ms)
    type_ = "tokens" if dim == TOKENS else "requests"
    return retry_after_ms, headers, error_body(message, type_, "rate_limit_exceeded")


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def stream_frames(body: Mapping[str, Any], include_usage: bool, pieces: int = 4) -> list[bytes]:
    """A ``chat.completion`` ``body`` as OpenAI streams it: server-sent ``data:`` frames of
    ``chat.completion.chunk`` objects (the role, the content in up to ``pieces`` parts, the
    finish reason), then a chunk with no choices and the ``usage`` when ``include_usage``,
    then ``data: [DONE]``. Every chunk before the last carries ``"usage": null`` then."""
    choice = body["choices"][0]
    words = choice["message"]["content"].split(" ")
    step = max(1, math.ceil(len(words) / pieces))
    # Each part after the first starts with its space, as OpenAI's deltas do: they join.
    parts = [(" " if i else "") + " ".join(words[i : i + step]) for i in range(0, len(words), step)]
    head = {k: body[k] for k in ("id", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk"
    if include_usage:
        head["usage"] = None
    deltas = [{"role": "assistant", "content": ""}] + [{"content": p} for p in parts]
    chunks = [
        {**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]}
        for d in deltas
    ]
    end = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}
    chunks.append({**head, "choices": [end]})
    if include_usage:
        chunks.append({**head, "choices": [], "usage": body["usage"]})
    return [_sse(c) for c in chunks] + [b"data: [DONE]\n\n"]
