"""Built-in garbage detectors: pure functions over one model answer.

An answer is read once into a :class:`Reply` (its text, why it stopped, its output
tokens) from an OpenAI chat completion, an Anthropic message or an OpenAI Responses
object, as an SDK object or the dict parsed from its JSON (the same duck typing as
:mod:`celery_fleet.contrib.usage`); a plain string is its own text. What was asked is an
:class:`Ask` (``max_tokens``, whether JSON was asked, a schema). Each detector returns
``None`` (fine) or a short detail saying what is wrong; :data:`DETECTORS` names them.

Example::

    reply = read_reply({"choices": [{"message": {"content": "  "}, "finish_reason": "stop"}]})
    assert empty(reply, Ask()) == "no content"

``length_shift`` needs the limit's history and lives in :mod:`celery_fleet.quality.judge`.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .schema import schema_errors

__all__ = ["Reply", "Ask", "read_reply", "DETECTORS", "Detector"]


@dataclass(frozen=True)
class Reply:
    """What the detectors read of an answer.

    ``text`` is None when the answer has no text part at all (e.g. only tool calls);
    ``stop`` is the provider's reason, normalised: ``"length"`` (OpenAI ``length``,
    Anthropic ``max_tokens``), ``"refusal"``, ``"stop"``, ``"tool"`` or what it said.
    """

    text: str | None
    stop: str | None = None
    output_tokens: int | None = None
    refusal: str | None = None
    tools: bool = False


@dataclass(frozen=True)
class Ask:
    """What the call asked for: its completion budget, JSON output, a JSON schema."""

    max_tokens: int | None = None
    json: bool = False
    schema: Mapping[str, Any] | None = None


def _get(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def _has(value: Any, name: str) -> bool:
    return name in value if isinstance(value, Mapping) else hasattr(value, name)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_STOPS = {"length": "length", "max_tokens": "length", "max_output_tokens": "length",
          "refusal": "refusal", "content_filter": "refusal", "end_turn": "stop",
          "stop_sequence": "stop", "tool_calls": "tool", "tool_use": "tool",
          "function_call": "tool"}  # fmt: skip


def read_reply(resp: Any) -> Reply:
    """Read an OpenAI chat completion / Responses object or an Anthropic message."""
    if isinstance(resp, str):
        return Reply(resp)
    if resp is None:
        return Reply(None)  # no answer at all: no content
    output = _get(resp, "output")
    if _is_responses_output(output) and (output or _get(resp, "object") == "response"):
        return _read_response(resp, output)
    if not any(_has(resp, name) for name in ("choices", "content", "output_text")):
        raise TypeError(
            f"{type(resp).__name__} is not a model answer (a stream? judge the final one)"
        )
    usage = _get(resp, "usage")
    out_tokens = _int(_get(usage, "completion_tokens")) if usage is not None else None
    if out_tokens is None and usage is not None:
        out_tokens = _int(_get(usage, "output_tokens"))
    choices = _get(resp, "choices")
    if isinstance(choices, (list, tuple)) and choices:
        choice = choices[0]
        if _get(choice, "message") is None and _get(choice, "delta") is not None:
            raise TypeError("a stream's chunk is not the answer (judge the accumulated one)")
        message = _get(choice, "message")
        finish = _get(choice, "finish_reason")
        if message is None and isinstance(_get(choice, "text"), str):  # legacy completions
            return Reply(_get(choice, "text"), _STOPS.get(str(finish), finish), out_tokens)
        message = message or {}
        tools = bool(_get(message, "tool_calls") or _get(message, "function_call"))
        return Reply(
            _text_of(_get(message, "content")),
            _STOPS.get(str(finish), finish) if finish is not None else None,
            out_tokens,
            _get(message, "refusal") or None,
            tools,
        )
    content = _get(resp, "content")
    if isinstance(content, (list, tuple)):  # Anthropic: a list of blocks
        stop = _get(resp, "stop_reason")
        tools = any(_get(block, "type") == "tool_use" for block in content)
        return Reply(
            _text_of(content),
            _STOPS.get(str(stop), stop) if stop else None,
            out_tokens,
            None,
            tools,
        )
    text = _get(resp, "output_text")  # a Responses answer without its output list
    if isinstance(text, str):
        status = _get(_get(resp, "incomplete_details"), "reason")
        return Reply(text, _STOPS.get(str(status), status) if status else None, out_tokens)
    if isinstance(content, str):
        return Reply(content, None, out_tokens)
    return Reply(None, None, out_tokens)


def _is_responses_output(output: Any) -> bool:
    """An OpenAI Responses ``output``: a list of items that each say their ``type``."""
    return isinstance(output, (list, tuple)) and all(
        isinstance(_get(item, "type"), str) for item in output
    )


def _read_response(resp: Any, output: Any) -> Reply:
    """An OpenAI Responses answer, from its ``output`` items rather than ``output_text``.

    ``output_text`` is a property the SDK computes, absent from the JSON
    (``resp.model_dump(mode="json")``), so the SDK object and its dict are read alike here:
    the ``output_text`` parts of the message items are the text (as the SDK joins them), a
    ``refusal`` part is the refusal, an item of a ``*_call`` type is a tool call, and
    ``status == "incomplete"`` gives the stop from ``incomplete_details.reason``
    (``max_output_tokens`` is ``"length"``, ``content_filter`` is ``"refusal"``).
    """
    texts: list[str] = []
    refusals: list[str] = []
    tools = False
    for item in output:
        kind = _get(item, "type")
        tools = tools or kind.endswith("_call")
        if kind != "message":
            continue
        for part in _get(item, "content") or ():
            part_kind = _get(part, "type")
            if part_kind == "output_text" and isinstance(_get(part, "text"), str):
                texts.append(_get(part, "text"))
            elif part_kind == "refusal" and isinstance(_get(part, "refusal"), str):
                refusals.append(_get(part, "refusal"))
    reason = _get(_get(resp, "incomplete_details"), "reason")
    stop = None
    if _get(resp, "status") in ("incomplete", None) and reason:
        stop = _STOPS.get(str(reason), reason)
    usage = _get(resp, "usage")
    out_tokens = _int(_get(usage, "output_tokens")) if usage is not None else None
    return Reply(
        "".join(texts) if texts else None, stop, out_tokens, "".join(refusals) or None, tools
    )


def _text_of(content: Any) -> str | None:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = [_get(part, "text") for part in content]
        texts = [p for p in parts if isinstance(p, str)]
        return "".join(texts) if texts else None
    return None


Detector = Callable[[Reply, Ask], "str | None"]


def empty(reply: Reply, ask: Ask) -> str | None:
    """No content, or only whitespace (an answer made only of tool calls is not empty, and a
    refusal is a refusal)."""
    if reply.tools or reply.refusal or reply.stop == "refusal":
        return None
    if reply.text is None or not reply.text.strip():
        return "no content"
    return None


#: "Far below": a cut at ``length`` with fewer output tokens than this share of max_tokens.
TRUNCATED_SHARE = 0.5


def truncated(reply: Reply, ask: Ask) -> str | None:
    """Stopped for length far below the ``max_tokens`` asked (the provider cut it short).

    Needs the request's ``max_tokens`` and the answer's output tokens; an answer that
    used its whole budget is the caller's budget, not the provider's fault.
    """
    if reply.stop != "length" or not ask.max_tokens or reply.output_tokens is None:
        return None
    if reply.output_tokens < TRUNCATED_SHARE * ask.max_tokens:
        return f"stopped for length after {reply.output_tokens} of {ask.max_tokens} tokens"
    return None


#: What a refusal declines: the request itself ("I can't help with that"), not a finding
#: ("I can't find any errors", "I cannot reproduce it": an apology that answers).
_DECLINED = (
    r"(?:help(?!\s+but\b)|assist|comply|provide|do (?:that|this|it)|fulfill?"
    r"|complete (?:that|this|the|your)|create|generate|write|produce|engage|participate"
    r"|support|share|discuss|answer|respond|give|offer|continue|proceed|accommodate"
    r"|process (?:that|this|your)|be of help)\b"
)
#: "I can't", "I cannot", "I am unable to", "I'm not able to", "I won't", "I will not be able to".
_CANNOT = (
    r"i(?: can(?:no|')t| can not| won'?t| will not|(?: am|'m) (?:unable|not able) to"
    r"| (?:won'?t|will not) be able to)"
)
_REFUSAL = re.compile(
    # markdown may open it (bold, a heading, a quote block); a quotation mark may not: that is
    # somebody speaking in the answer ("I can't help it," she said), not the model declining
    r"^[\s*_>#`~-]*(?:"
    # the canned disclaimer declines whatever follows it ("..., I cannot browse")
    r"as an ai(?: language model| assistant)?,? i (?:can(?:no|')t|am (?:not able|unable)|don'?t)"
    # otherwise an apology only opens a refusal when it declines the request itself
    r"|(?:(?:i'?m sorry|i am sorry|sorry|i apologi[sz]e|unfortunately),?(?: but)? )?"
    + _CANNOT
    + r" (?:\w+ly )?"  # an adverb may sit between: "I can't really help", "I cannot fully comply"
    + _DECLINED
    + ")",
    re.IGNORECASE,
)


def refusal(reply: Reply, ask: Ask) -> str | None:
    """The model declined: a refusal field or stop reason, or a refusal phrase opening it.

    A phrase is a refusal when it declines the request ("I'm sorry, but I can't help with
    that", "I am unable to comply"), or is the canned "As an AI language model, I
    cannot..."; an apology that answers ("I'm sorry, but I can't find any errors in your
    code", "I cannot reproduce it") is an answer."""
    if reply.refusal or reply.stop == "refusal":
        return "refused"
    if reply.text and _REFUSAL.match(reply.text[:200].replace("\u2019", "'")):
        return "refusal phrase"
    return None


#: A fenced code block: its info string (``json``, or none) and its content.
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[ \t]*\n?(.*?)```", re.DOTALL)


def _parsed(reply: Reply) -> tuple[bool, Any, str]:
    """``(ok, value, prose)``: the answer's JSON and the text around it.

    The answer is JSON when all of it parses, or when it holds exactly one fenced block
    (```` ```json ```` or a bare ```` ``` ````) that parses, with or without prose around
    it ("Here is the JSON:" and a fence is how models answer a prompt asking for JSON; the
    caller extracts the block). Two fenced blocks are not one answer: which would it be?
    """
    text = (reply.text or "").strip()
    try:
        return True, json.loads(text), ""
    except ValueError:
        pass
    blocks = _FENCE.findall(text)
    if len(blocks) != 1 or text.count("```") != 2 or blocks[0][0].lower() not in ("", "json"):
        return False, None, text
    try:
        value = json.loads(blocks[0][1])
    except ValueError:
        return False, None, text
    return True, value, _FENCE.sub(" ", text).strip()


def invalid_json(reply: Reply, ask: Ask) -> str | None:
    """JSON was asked (``json=True``, a response_format or a schema) and this is not JSON."""
    if not (ask.json or ask.schema is not None) or reply.tools:
        return None
    ok, _, _ = _parsed(reply)
    return None if ok else "not valid JSON"


def schema_failure(reply: Reply, ask: Ask) -> str | None:
    """A schema was given and the JSON answer does not match it (see :mod:`.schema`)."""
    if ask.schema is None or reply.tools:
        return None
    ok, value, _ = _parsed(reply)
    if not ok:
        return None  # the json detector says so
    errors = schema_errors(value, ask.schema)
    return errors[0] if errors else None


#: Below this many characters an answer is too short to call degenerate.
REPETITION_MIN_CHARS = 200


def repetition(reply: Reply, ask: Ask) -> str | None:
    """Degenerate repetition: a long answer that compresses to almost nothing, or whose
    word trigrams are mostly the same few (a model looping on a phrase).

    A JSON answer is judged by its long strings alone: records that share one shape (a
    batch of labels, the rows of a table) compress well by design, a loop inside a string
    does not stop being one. The prose around a fenced JSON block is judged as text."""
    text = reply.text or ""
    if len(text) < REPETITION_MIN_CHARS:
        return None
    ok, value, prose = _parsed(reply)
    if ok and isinstance(value, (dict, list)):
        for string in (prose, *_strings(value)):
            found = _repeats(string) if len(string) >= REPETITION_MIN_CHARS else None
            if found:
                return found
        return None
    return _repeats(text)


def _strings(value: Any) -> list[str]:
    """Every string (value or key) in a parsed JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _repeats(text: str) -> str | None:
    raw = text.encode("utf-8", "replace")
    if len(zlib.compress(raw, 6)) < 0.08 * len(raw):
        return "repeats itself"
    words = text.split()
    if len(words) >= 60:
        grams = list(zip(words, words[1:], words[2:], strict=False))
        if len(set(grams)) < 0.3 * len(grams):
            return "repeats a phrase"
    return None


#: Every stateless built-in detector, by name.
DETECTORS: dict[str, Detector] = {
    "empty": empty,
    "truncated": truncated,
    "refusal": refusal,
    "json": invalid_json,
    "schema": schema_failure,
    "repetition": repetition,
}
