"""What a LangChain model call costs: the reservation before it, the usage after it.

The LangChain side of :mod:`celery_fleet.contrib.usage` for
:mod:`celery_fleet.contrib.langchain`: it turns a Runnable's input (a string, messages, a
prompt value) and the model's settings (``max_tokens`` and its aliases, ``n``, bound tools)
into the request body :func:`~celery_fleet.contrib.usage.estimate_tokens` reads, and reads
the usage an ``AIMessage`` reports (``usage_metadata``, else the provider's
``token_usage``) with :func:`~celery_fleet.contrib.usage.usage_tokens`.

Example::

    estimate_input_tokens(ChatOpenAI(max_tokens=100), "hi")  # ceil(2 / 4) + 100 = 101
    used, headers = reported_usage(model.invoke("hi"))
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

try:
    from langchain_core.messages import AIMessageChunk, BaseMessage, convert_to_messages
    from langchain_core.messages.ai import add_ai_message_chunks
    from langchain_core.prompt_values import PromptValue
    from langchain_core.runnables import Runnable, RunnableBinding
except ImportError as exc:  # the [langchain] extra is not installed
    raise ImportError(
        "celery_fleet.contrib.langchain needs langchain-core: "
        "pip install 'celery-fleet[langchain]' (or pip install langchain-core)"
    ) from exc

from .usage import DEFAULT_MAX_TOKENS, estimate_tokens, usage_tokens

__all__ = ["StreamUsage", "estimate_input_tokens", "reported_usage", "answer_of", "request_of"]

#: Chat model fields naming the completion budget, across LangChain's integrations.
_BUDGET_FIELDS = (
    "max_completion_tokens",
    "max_tokens",
    "max_output_tokens",
    "max_tokens_to_sample",
)


def _innermost(runnable: Any) -> tuple[Any, dict[str, Any]]:
    """The model inside bindings and sequences (``bind_tools``, ``with_structured_output``)
    and the keyword arguments bound on the way, outermost winning."""
    bound: dict[str, Any] = {}
    for _ in range(10):  # a chain of wrappers, never a cycle
        if isinstance(runnable, RunnableBinding):
            bound = {**runnable.kwargs, **bound}
            runnable = runnable.bound
        elif hasattr(runnable, "first") and isinstance(runnable.first, Runnable):
            runnable = runnable.first  # a RunnableSequence: the model comes first
        else:
            break
    return runnable, bound


def _messages(value: Any) -> list[Any]:
    if isinstance(value, PromptValue):
        return list(value.to_messages())
    if isinstance(value, BaseMessage):
        return [value]
    if isinstance(value, str):
        return [{"content": value}]
    if isinstance(value, Sequence):
        try:
            return list(convert_to_messages(value))
        except (ValueError, TypeError, NotImplementedError):
            pass
    return [{"content": str(value)}]


def estimate_input_tokens(
    runnable: Any, value: Any, kwargs: Mapping[str, Any] | None = None
) -> int:
    """The tokens to reserve for ``runnable.invoke(value, **kwargs)``: ``ceil(chars / 4)``
    of the input messages and bound tools, plus the model's completion budget (its
    ``max_tokens`` or a bound/passed one, else ``DEFAULT_MAX_TOKENS``), times ``n``.

    Example::

        estimate_input_tokens(ChatOpenAI(max_tokens=100), "hi")  # 1 + 100
    """
    model, bound = _innermost(runnable)
    params = {**bound, **(kwargs or {})}
    body: dict[str, Any] = {
        "messages": [
            {"content": m.content} if isinstance(m, BaseMessage) else m for m in _messages(value)
        ]
    }
    for field in _BUDGET_FIELDS:
        budget = params.get(field, getattr(model, field, None))
        if isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0:
            body["max_tokens"] = budget
            break
    choices = params.get("n", getattr(model, "n", None))
    if isinstance(choices, int) and not isinstance(choices, bool):
        body["n"] = choices
    if params.get("tools"):  # tool schemas count as prompt
        body["system"] = json.dumps(params["tools"], default=str)
    return estimate_tokens(body, DEFAULT_MAX_TOKENS)


def reported_usage(output: Any) -> tuple[int | None, Any]:
    """The tokens a model's output says it used (``usage_metadata``, else the provider's
    ``token_usage``) and its response headers (None when absent)."""
    if isinstance(output, Mapping) and "raw" in output:  # with_structured_output(include_raw)
        output = output["raw"]
    if not isinstance(output, BaseMessage):
        return None, None
    meta = output.response_metadata or {}
    used = usage_tokens(getattr(output, "usage_metadata", None))
    if used is None:
        used = usage_tokens(meta.get("token_usage") or meta.get("usage"))
    return used, meta.get("headers")


class StreamUsage:
    """Usage summed over a stream's chunks (each chunk reports its own share)."""

    def __init__(self) -> None:
        self.tokens: int | None = None
        self.headers: Any = None

    def add(self, chunk: Any) -> None:
        used, headers = reported_usage(chunk)
        if used is not None:
            self.tokens = (self.tokens or 0) + used
        if headers and self.headers is None:
            self.headers = headers


def request_of(runnable: Any, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a call asked for, as the request body ``slot.judge`` reads: the model's (or a
    bound/passed) completion budget and ``response_format`` (bound by
    ``with_structured_output``/``bind``, or in the model's ``model_kwargs``)."""
    model, bound = _innermost(runnable)
    params = {**bound, **(kwargs or {})}
    body: dict[str, Any] = {}
    for field in _BUDGET_FIELDS:
        budget = params.get(field, getattr(model, field, None))
        if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
            body["max_tokens"] = budget
            break
    extra = getattr(model, "model_kwargs", None)
    fmt = params.get("response_format")
    if fmt is None and isinstance(extra, Mapping):
        fmt = extra.get("response_format")
    if fmt is not None:
        body["response_format"] = fmt
    return body


def answer_of(output: Any) -> dict[str, Any] | None:
    """A model's message as the chat completion ``slot.judge`` reads (None: the output is
    not a model's message, e.g. a chain's parsed result, and is not judged)."""
    if isinstance(output, Mapping) and "raw" in output:  # with_structured_output(include_raw)
        output = output["raw"]
    if isinstance(output, list) and output and all(isinstance(c, AIMessageChunk) for c in output):
        output = add_ai_message_chunks(output[0], *output[1:])  # a stream's chunks, in order
    if not isinstance(output, BaseMessage) or output.type not in ("ai", "AIMessageChunk"):
        return None
    meta = output.response_metadata or {}
    usage = getattr(output, "usage_metadata", None) or {}
    message: dict[str, Any] = {"content": output.content}
    if getattr(output, "tool_calls", None) or output.additional_kwargs.get("function_call"):
        message["tool_calls"] = [{"type": "function"}]
    refusal = output.additional_kwargs.get("refusal")
    if refusal:
        message["refusal"] = refusal
    finish = meta.get("finish_reason") or meta.get("stop_reason")
    return {
        "choices": [{"message": message, "finish_reason": finish}],
        "usage": {"completion_tokens": usage.get("output_tokens")},
    }
