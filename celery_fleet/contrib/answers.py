"""A wrapped call's answer, judged for garbage: the SDK adapters' side of ``slot.judge``.

When a limit has ``quality`` configured, the adapters (``fleet.wrap``, LiteLLM's
``FleetHook``, LangChain's ``with_fleet``) judge each model call's answer themselves,
with the call's own request body for ``max_tokens`` and ``response_format``, and the
verdict rides on the slot's release. :func:`judge_quietly` / :func:`ajudge_quietly` never
raise into the caller's code: the call is made and paid, its answer is returned whatever
the judging does.

A stream is judged once it has ended, on the answer its events add up to
(:class:`StreamAnswer`): OpenAI chat and completions chunks, a Responses stream's final
``response``, Anthropic's message events. A stream left before its end is not judged
(what was read is not the answer).

Example::

    answer = StreamAnswer()
    for event in stream:
        answer.see(event)
    if answer.ended:
        judge_quietly(slot, answer.answer(), request=body)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..admission.aslot import AsyncSlot
    from ..admission.core import Admission
    from ..admission.slot import Slot

__all__ = ["judges", "judge_quietly", "ajudge_quietly", "StreamAnswer"]

log = logging.getLogger("celery_fleet")


def judges(admission: Admission, limit: str) -> bool:
    """Whether calls on ``limit`` are judged: the limit has ``quality`` configured."""
    return admission.quality.config(limit) is not None


def judge_quietly(slot: Slot, answer: Any, request: Any = None) -> None:
    """``slot.judge(answer, request=request)``, logging (never raising) what goes wrong."""
    try:
        slot.judge(answer, request=_body(request))
    except Exception:  # judging never costs the caller its answer
        log.warning("celery-fleet: judging an answer of %r failed", slot.limit, exc_info=True)


async def ajudge_quietly(slot: AsyncSlot, answer: Any, request: Any = None) -> None:
    """:func:`judge_quietly` for an :class:`~celery_fleet.admission.aslot.AsyncSlot`."""
    try:
        await slot.judge(answer, request=_body(request))
    except Exception:
        log.warning("celery-fleet: judging an answer of %r failed", slot.limit, exc_info=True)


def _body(request: Any) -> Mapping[str, Any] | None:
    return request if isinstance(request, Mapping) else None


def _get(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


class StreamAnswer:
    """The answer a stream's events add up to (the first choice of an OpenAI stream).

    ``ended`` is True once the stream said it is complete (a ``finish_reason``, Anthropic's
    ``message_stop``, a Responses ``response.completed``/``response.incomplete``);
    :meth:`answer` is then a chat completion or Anthropic message dict (or the Responses
    object itself) that :func:`~celery_fleet.quality.read_reply` reads.
    """

    def __init__(self) -> None:
        self.ended = False
        self._parts: list[str] = []
        self._refusal: list[str] = []
        self._tools = False
        self._stop: Any = None
        self._output_tokens: Any = None
        self._anthropic = False
        self._legacy = False
        self._final: Any = None  # a Responses stream's own final object

    def see(self, event: Any) -> None:
        """Read one event (an SDK object or its dict)."""
        kind = _get(event, "type")
        if isinstance(kind, str) and kind.startswith("response."):
            if kind in ("response.completed", "response.incomplete"):
                self._final, self.ended = _get(event, "response"), True
        elif isinstance(kind, str) and kind.startswith(("message_", "content_block_")):
            self._anthropic = True
            self._see_anthropic(kind, event)
        else:
            self._see_chunk(event)

    def _see_chunk(self, chunk: Any) -> None:
        usage = _get(chunk, "usage")
        if usage is not None:
            self._output_tokens = _get(usage, "completion_tokens")
        for choice in _get(chunk, "choices") or ():
            if (_get(choice, "index") or 0) != 0:
                continue
            delta = _get(choice, "delta")
            if delta is None:  # a legacy completions chunk: its text
                text = _get(choice, "text")
                self._legacy = self._legacy or isinstance(text, str)
                if isinstance(text, str):
                    self._parts.append(text)
            else:
                content, refusal = _get(delta, "content"), _get(delta, "refusal")
                if isinstance(content, str):
                    self._parts.append(content)
                if isinstance(refusal, str):
                    self._refusal.append(refusal)
                if _get(delta, "tool_calls") or _get(delta, "function_call"):
                    self._tools = True
            finish = _get(choice, "finish_reason")
            if finish is not None:
                self._stop, self.ended = finish, True

    def _see_anthropic(self, kind: str, event: Any) -> None:
        if kind == "content_block_start":
            block = _get(event, "content_block")
            if _get(block, "type") == "tool_use":
                self._tools = True
            text = _get(block, "text")
            if isinstance(text, str):
                self._parts.append(text)
        elif kind == "content_block_delta":
            text = _get(_get(event, "delta"), "text")
            if isinstance(text, str):
                self._parts.append(text)
        elif kind == "message_delta":
            stop = _get(_get(event, "delta"), "stop_reason")
            self._stop = stop if stop is not None else self._stop
            out = _get(_get(event, "usage"), "output_tokens")
            self._output_tokens = out if out is not None else self._output_tokens
        elif kind == "message_stop":
            self.ended = True

    def answer(self) -> Any:
        """The assembled answer (see the class docstring)."""
        if self._final is not None:
            return self._final
        text = "".join(self._parts)
        if self._anthropic:
            blocks: list[dict[str, Any]] = [{"type": "text", "text": text}]
            if self._tools:
                blocks.append({"type": "tool_use"})
            usage = {"output_tokens": self._output_tokens}
            return {"content": blocks, "stop_reason": self._stop, "usage": usage}
        usage = {"completion_tokens": self._output_tokens}
        if self._legacy:
            return {"choices": [{"text": text, "finish_reason": self._stop}], "usage": usage}
        message: dict[str, Any] = {"content": text if self._parts else None}
        if self._refusal:
            message["refusal"] = "".join(self._refusal)
        if self._tools:
            message["tool_calls"] = [{"type": "function"}]
        return {"choices": [{"message": message, "finish_reason": self._stop}], "usage": usage}
