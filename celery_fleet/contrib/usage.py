"""What a model call costs: the tokens to reserve before it and the tokens it really used.

Shared by every SDK adapter (the httpx transport, ``fleet.wrap``, LangChain, LiteLLM), so
they all reserve and settle the same way. Plain functions over duck-typed values: a dict
parsed from JSON, an SDK's pydantic object or a LangChain ``usage_metadata`` mapping.

- Before the call: :func:`estimate_tokens` is what the provider counts against a
  tokens-per-minute budget on arrival, ``ceil(prompt characters / 4)`` plus the completion
  budget (``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``).
- After it: :func:`usage_tokens` reads the ``usage`` the provider reports, in OpenAI's
  (``total_tokens``, ``prompt_tokens`` + ``completion_tokens``), Anthropic's and LangChain's
  (``input_tokens`` + ``output_tokens``) shapes; ``None`` when there is none.

Example::

    with fleet.slot("openai", tokens=estimate_tokens(body)) as slot:
        reply = send(body)
        used = usage_tokens(reply.get("usage"))
        if used is not None:
            slot.settle(tokens=used)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "CumulativeUsage",
    "estimate_tokens",
    "prompt_chars",
    "usage_tokens",
]

#: The completion budget assumed when a request names none (providers' own defaults vary;
#: Anthropic requires one, OpenAI allows the model's maximum).
DEFAULT_MAX_TOKENS = 1024

_MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
#: The counts :func:`usage_tokens` reads.
_USAGE_FIELDS = (
    "total_tokens",
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
)


def _get(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if value >= 0 else None


def usage_tokens(usage: Any) -> int | None:
    """The tokens a provider reports for one call, or ``None`` when ``usage`` has no count.

    Understands ``total_tokens``; else ``prompt_tokens + completion_tokens`` (OpenAI);
    else ``input_tokens + output_tokens`` (Anthropic, LangChain's ``usage_metadata``), with
    Anthropic's ``cache_creation_input_tokens``, which count against its input budget.
    """
    if usage is None:
        return None
    total = _count(_get(usage, "total_tokens"))
    if total is not None:
        return total
    pairs = (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens"))
    for first, second in pairs:
        a, b = _count(_get(usage, first)), _count(_get(usage, second))
        if a is not None or b is not None:
            extra = _count(_get(usage, "cache_creation_input_tokens")) or 0
            return (a or 0) + (b or 0) + extra
    return None


class CumulativeUsage:
    """A streamed call's usage where each report repeats the counts so far: Anthropic's
    ``message_start.message.usage`` (the input), then each ``message_delta.usage`` (the
    output so far, cumulative, not an increment). The latest value of each count wins;
    :attr:`tokens` is their :func:`usage_tokens` total.

    Shared by the byte-level reader (:mod:`~celery_fleet.contrib.stream_usage`) and the
    SDK-event one (:mod:`~celery_fleet.contrib.sdk_streams`), so both add up alike.

    Example::

        usage = CumulativeUsage()
        usage.merge({"input_tokens": 12, "output_tokens": 1})  # message_start: 13
        usage.merge({"output_tokens": 40})                     # message_delta: 52
    """

    def __init__(self) -> None:
        self.tokens: int | None = None
        self._counts: dict[str, Any] = {}

    def merge(self, usage: Any) -> int | None:
        """Take the counts ``usage`` reports (a mapping or an SDK object; a ``None`` count
        is not a report) and return the total so far (None while nothing was counted)."""
        for name in _USAGE_FIELDS:
            value = _get(usage, name)
            if value is not None:
                self._counts[name] = value
        self.tokens = usage_tokens(self._counts)
        return self.tokens


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, Iterable) and not isinstance(content, (bytes, Mapping)):
        return sum(_text_chars(part) for part in content)
    if isinstance(content, Mapping):
        text = content.get("text", content.get("content"))
        return _text_chars(text) if text is not None else 0
    text = getattr(content, "text", getattr(content, "content", None))
    return _text_chars(text) if text is not None else 0


def prompt_chars(body: Mapping[str, Any]) -> int:
    """Characters of a request's prompt: ``messages``, ``system``, ``prompt``, ``input``."""
    return sum(_text_chars(body.get(field)) for field in ("system", "messages", "prompt", "input"))


def estimate_tokens(body: Mapping[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """Tokens to reserve for a chat request ``body``: ``ceil(prompt chars / 4)`` plus its
    completion budget (the first of ``max_completion_tokens``, ``max_tokens``,
    ``max_output_tokens`` it sets, else ``default_max_tokens``), times ``n`` choices."""
    budget = default_max_tokens
    for field in _MAX_TOKEN_FIELDS:
        value = _count(body.get(field))
        if value is not None:
            budget = value
            break
    choices = _count(body.get("n")) or 1
    return math.ceil(prompt_chars(body) / 4) + budget * choices
