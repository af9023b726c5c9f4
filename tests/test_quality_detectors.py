"""The built-in garbage detectors and the verdict (issue 25): pure functions, no Redis.

Each detector is shown firing on the answer it names and staying quiet on a healthy one,
in OpenAI's and Anthropic's shapes, as dicts and as the SDKs' own objects.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import pytest

from celery_fleet.errors import ConfigError
from celery_fleet.quality import DETECTOR_NAMES, LengthBaseline, ask_of, judge, parse_quality
from celery_fleet.quality import detectors as detectors_module
from celery_fleet.quality.detectors import Ask, read_reply
from celery_fleet.quality.schema import schema_errors

pytestmark = pytest.mark.fast


def openai(content: Any, finish: str = "stop", completion: int = 50, **message: Any) -> Any:
    return {
        "choices": [
            {
                "message": {"role": "assistant", "content": content, **message},
                "finish_reason": finish,
                "index": 0,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 60},
    }


def anthropic(text: str, stop: str = "end_turn", out: int = 50) -> Any:
    return {
        "type": "message",
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop,
        "usage": {"input_tokens": 10, "output_tokens": out},
    }


GOOD = "The capital of France is Paris, a city on the Seine."


def reasons(
    resp: Any, ask: Ask | None = None, names: tuple[str, ...] = DETECTOR_NAMES
) -> tuple[str, ...]:
    return judge(resp, names, ask or Ask()).reasons


def test_a_healthy_answer_is_ok_in_both_shapes() -> None:
    for resp in (openai(GOOD), anthropic(GOOD), GOOD):
        verdict = judge(resp, DETECTOR_NAMES, Ask(max_tokens=100))
        assert verdict.ok and bool(verdict) and not verdict.garbage and verdict.reasons == ()


def test_empty_and_whitespace_content_is_garbage_but_tool_calls_are_not() -> None:
    assert reasons(openai(None)) == ("empty",)
    assert reasons(openai(" \n\t ")) == ("empty",)
    assert reasons(anthropic("   ")) == ("empty",)
    tool = openai(None, "tool_calls", tool_calls=[{"id": "c1", "type": "function"}])
    assert reasons(tool) == ()


def test_a_cut_far_below_max_tokens_is_garbage_a_used_budget_is_not() -> None:
    ask = Ask(max_tokens=1000)
    assert reasons(openai(GOOD, "length", completion=40), ask) == ("truncated",)
    assert reasons(anthropic(GOOD, "max_tokens", out=40), ask) == ("truncated",)
    assert reasons(openai(GOOD, "length", completion=990), ask) == ()
    assert reasons(openai(GOOD, "length", completion=40)) == ()  # max_tokens unknown


def test_refusals_by_field_stop_reason_or_phrase() -> None:
    assert reasons(openai(None, refusal="I can't help with that.")) == ("refusal",)
    assert reasons(anthropic("", "refusal")) == ("refusal",)
    assert reasons(openai("I'm sorry, but I can't assist with that request.")) == ("refusal",)
    assert reasons(openai("I’m sorry, but I can’t help with this.")) == ("refusal",)
    assert reasons(openai("As an AI language model, I cannot browse.")) == ("refusal",)
    assert reasons(openai("Sorry for the wait: here is the answer, 42.")) == ()


def test_invalid_json_only_when_json_was_asked() -> None:
    asked = ask_of(response_format={"type": "json_object"})
    assert reasons(openai('{"a": 1}'), asked) == ()
    assert reasons(openai('```json\n{"a": 1}\n```'), asked) == ()
    assert reasons(openai('{"a": 1'), asked) == ("json",)
    assert reasons(openai('{"a": 1')) == ()
    assert reasons(openai("nope"), ask_of(json=True)) == ("json",)


def test_a_schema_failure_when_a_schema_was_given() -> None:
    schema = {
        "type": "object",
        "required": ["name", "tags"],
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    ask = ask_of(request={"max_tokens": 300, "response_format": fmt})
    assert ask.max_tokens == 300 and ask.json and ask.schema == schema
    assert reasons(openai('{"name": "a", "tags": ["x"]}'), ask) == ()
    verdict = judge(openai('{"name": "a"}'), DETECTOR_NAMES, ask)
    assert verdict.reasons == ("schema",) and "missing required 'tags'" in verdict.details[0]
    assert reasons(openai('{"name": 3, "tags": [1]}'), ask) == ("schema",)


def test_a_pydantic_model_is_a_schema() -> None:
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        name: str
        population: int

    for ask in (ask_of(schema=City), ask_of(response_format=City)):
        assert ask.json and ask.schema is not None
        assert reasons(openai('{"name": "Paris", "population": 2100000}'), ask) == ()
        assert reasons(openai('{"name": "Paris"}'), ask) == ("schema",)


def test_the_schema_subset() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "k": {"enum": ["a", "b"]}},
              "additionalProperties": False}  # fmt: skip
    assert schema_errors({"n": 1, "k": "a"}, schema) == []
    assert schema_errors({"n": True}, schema) == ["$.n: expected integer, got bool"]
    assert schema_errors({"k": "c"}, schema) == ["$.k: 'c' is not one of ['a', 'b']"]
    assert schema_errors({"x": 1}, schema) == ["$: unexpected 'x'"]
    assert schema_errors(1.5, {"type": ["number", "null"]}) == []
    assert schema_errors("x", {"unknownKeyword": 1}) == []


def test_degenerate_repetition() -> None:
    assert reasons(openai("the the the " * 100)) == ("repetition",)
    assert reasons(openai("a" * 500)) == ("repetition",)
    varied = " ".join(f"word{i} means thing{i * 7 % 13} in context{i % 5}" for i in range(60))
    assert reasons(openai(varied)) == ()
    assert reasons(openai("ok ok ok")) == ()  # too short to call
    rng = random.Random(4)  # a loop with a changing tail: compresses poorly, trigrams repeat
    loop = " ".join(
        f"I will now open the configuration file once more and read every line of it "
        f"carefully to find step {rng.randint(0, 99999)} {rng.randint(0, 99999)}."
        for _ in range(20)
    )
    assert judge(openai(loop), DETECTOR_NAMES, Ask()).details == ("repeats a phrase",)


def test_a_json_answer_of_many_alike_records_is_not_repetition() -> None:
    """Records sharing one shape compress well by design (a batch of labels, rows of a
    table): that is structure, not a model looping; a loop inside a JSON string still is."""
    records = json.dumps([{"id": i, "status": "active", "verified": True} for i in range(100)])
    assert reasons(openai(records), Ask(json=True)) == ()
    assert reasons(openai(records)) == ()  # JSON nobody asked for, too
    assert reasons(openai(json.dumps({"labels": ["positive"] * 40 + ["negative"] * 10}))) == ()
    looping = json.dumps({"answer": "the the the " * 100})
    assert reasons(openai(looping), Ask(json=True)) == ("repetition",)


def test_a_stream_or_a_chunk_is_not_an_answer_to_call_empty() -> None:
    """A stream (or one of its chunks) is not the answer: judging one must not count an
    "empty" garbage verdict for every streamed call (the answer is what it accumulates)."""
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "Paris"}, "finish_reason": None}],
    }
    assert judge(chunk, DETECTOR_NAMES, Ask()).ok
    assert judge(iter([chunk]), DETECTOR_NAMES, Ask()).ok  # an SDK Stream iterates chunks
    assert judge([chunk], DETECTOR_NAMES, Ask()).ok
    assert reasons(None) == ("empty",)  # no answer at all is still no content


def test_a_quoted_line_that_opens_an_answer_is_not_a_refusal() -> None:
    story = '"I can\'t help it," she said, and laughed at the rain on the window.'
    assert reasons(openai(story)) == ()
    assert reasons(openai("I can't help with that request.")) == ("refusal",)
    assert reasons(openai("**I'm sorry, but I can't do that.**")) == ("refusal",)


def test_the_sdks_own_objects_are_read() -> None:
    chat = pytest.importorskip("openai.types.chat")
    completion = chat.ChatCompletion.model_validate(
        {"id": "x", "object": "chat.completion", "created": 0, "model": "m", **openai("  ")}
    )
    assert read_reply(completion).text == "  " and reasons(completion) == ("empty",)
    types = pytest.importorskip("anthropic.types")
    message = types.Message.model_validate(
        {"id": "m", "role": "assistant", "model": "c", **anthropic(GOOD, "max_tokens", out=5)}
    )
    assert reasons(message, Ask(max_tokens=1000)) == ("truncated",)


def responses(*items: Any, status: str = "completed", reason: str | None = None) -> Any:
    """An OpenAI Responses answer's JSON (what ``resp.model_dump(mode="json")`` holds)."""
    return {
        "id": "r", "object": "response", "created_at": 0, "model": "m", "status": status,
        "incomplete_details": {"reason": reason} if reason else None, "output": list(items),
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3,
                  "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    }  # fmt: skip


def message_item(*parts: Any) -> Any:
    return {"type": "message", "id": "m1", "role": "assistant", "status": "completed",
            "content": list(parts)}  # fmt: skip


def text_part(text: str) -> Any:
    return {"type": "output_text", "text": text, "annotations": []}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (responses(message_item(text_part("The capital "), text_part("is Paris."))), ()),
        (responses(message_item(text_part(""))), ("empty",)),
        (responses(), ("empty",)),
        (
            responses(
                message_item(text_part("the plan")), status="incomplete", reason="max_output_tokens"
            ),
            ("truncated",),
        ),
        (
            responses(message_item({"type": "refusal", "refusal": "I can't help with that."})),
            ("refusal",),
        ),
        (
            responses(
                {
                    "type": "function_call",
                    "id": "f",
                    "call_id": "c",
                    "name": "f",
                    "arguments": "{}",
                    "status": "completed",
                }  # fmt: skip
            ),
            (),
        ),
    ],
)
def test_a_responses_answer_as_the_sdk_object_or_its_json_gets_one_verdict(
    answer: Any, expected: tuple[str, ...]
) -> None:
    """The JSON of a Responses answer has no ``output_text`` (the SDK computes it): its
    ``output`` items are read, so the dict a task returns is judged as the object was."""
    sdk = pytest.importorskip("openai.types.responses")
    obj = sdk.Response.model_validate(answer)
    dumped = obj.model_dump(mode="json")
    assert "output_text" not in dumped
    ask = Ask(max_tokens=1000)
    assert reasons(obj, ask) == reasons(dumped, ask) == reasons(answer, ask) == expected
    assert read_reply(dumped) == read_reply(obj)


def test_the_output_length_shift_against_the_rolling_baseline() -> None:
    lengths = LengthBaseline(warmup=20)

    def text(n: int) -> str:
        return " ".join(f"w{i * 7919 % 1000}" for i in range(n))

    for i in range(60):
        assert judge(openai(text(100 + i % 9)), DETECTOR_NAMES, Ask(), None, lengths).ok
    short = judge(openai("Paris."), DETECTOR_NAMES, Ask(), None, lengths)
    assert short.reasons == ("length_shift",) and "usual" in short.details[0]
    assert judge(openai(text(120)), DETECTOR_NAMES, Ask(), None, lengths).ok
    assert judge(openai("Paris."), ("empty",), Ask(), None, lengths).ok  # turned off


def test_a_lasting_change_of_the_answers_lengths_stops_being_a_shift() -> None:
    """Correct short answers that become a fifth of the mix are a shift at first, then the
    baseline: a shifted answer is learnt too, or the shift would be garbage for ever (and
    open the breaker on healthy answers)."""
    rng = random.Random(1)
    lengths = LengthBaseline()

    def garbage(n: int, short_share: float) -> int:
        found = 0
        for _ in range(n):
            short = rng.random() < short_share
            words = rng.randint(40, 80)
            text = (
                "The answer is 4."
                if short
                else " ".join(f"w{rng.randint(0, 999)}" for _ in range(words))
            )
            found += not judge(openai(text), DETECTOR_NAMES, Ask(), None, lengths).ok
        return found

    garbage(1000, 0.02)
    assert garbage(400, 0.2) > 0  # the change is seen
    assert garbage(400, 0.2) < 8  # and learnt (before: about a fifth of the answers, for ever)


def test_detectors_can_be_turned_off() -> None:
    assert reasons(openai(" "), names=("refusal",)) == ()
    cfg = parse_quality({"detectors": ["json"]}, "q")
    assert cfg is not None and cfg.detectors == ("json",)


def test_validate_joins_the_detectors_and_only_it_marks_the_call_invalid() -> None:
    verdict = judge(openai(GOOD), DETECTOR_NAMES, Ask(), validate=lambda r: "Paris" not in str(r))
    assert verdict.reasons == ("validate",) and verdict.invalid
    both = judge(openai(" "), DETECTOR_NAMES, Ask(), validate=lambda r: 1 / 0)
    assert both.reasons == ("empty", "validate") and both.invalid
    assert not judge(openai(" "), DETECTOR_NAMES, Ask()).invalid


def test_a_detector_that_raises_is_logged_once_and_never_reaches_the_caller(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(reply: Any, ask: Any) -> str | None:
        raise RuntimeError("bug in a detector")

    monkeypatch.setitem(detectors_module.DETECTORS, "refusal", broken)
    with caplog.at_level(logging.WARNING, "celery_fleet"):
        for _ in range(3):
            assert reasons(openai(" ")) == ("empty",)
    assert sum("'refusal' raised" in r.getMessage() for r in caplog.records) == 1
    assert judge(object(), DETECTOR_NAMES, Ask()).ok  # not an answer: nothing to find in it
    assert judge(openai(GOOD), DETECTOR_NAMES, Ask(), validate=lambda r: True).ok


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("yes", "must be True or a dict"),
        ({"detectors": ["empty", "vibes"]}, r"unknown detector\(s\) \['vibes'\]"),
        ({"detectors": "empty"}, "must be a list"),
        ({"on_degraded": "stop"}, "on_degraded'\\] must be one of"),
        ({"ratio": 0.5}, "ratio"),
        ({"min_rate": 0}, "min_rate"),
        ({"windw": 3}, "windw"),
    ],
)
def test_bad_quality_options_fail_at_configuration(value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_quality(value, "fleet_limits['llm']['quality']")


def test_a_fallback_must_name_another_configured_limit() -> None:
    from celery_fleet.admission.config import parse_limits

    with pytest.raises(ConfigError, match="falls back to 'nope', which is not a limit"):
        parse_limits({"a": {"rpm": 5, "quality": {"on_degraded": "fallback:nope"}}})
    with pytest.raises(ConfigError, match="the limit itself"):
        parse_limits({"a": {"rpm": 5, "quality": {"on_degraded": "fallback:a"}}})
    ok = parse_limits({"a": {"rpm": 5, "quality": {"on_degraded": "fallback:b"}}, "b": {"rpm": 5}})
    assert ok["a"].quality is not None and ok["a"].quality.fallback == "b"


# -- the nits found by verification -------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't find any errors in your code.",
        "I cannot reproduce the bug on Python 3.12: the test passes here.",
        "Unfortunately, I can't see the attachment, so here is the general fix.",
        "I can't help but notice the loop never ends: move the increment inside it.",
        "I apologize, but I think the premise is off: 2 + 2 is 4.",
        "Sorry, but I can’t find that function anywhere in the file you pasted.",
    ],
)
def test_an_apology_that_answers_is_not_a_refusal(text: str) -> None:
    assert reasons(openai(text)) == ()
    assert reasons(anthropic(text)) == ()


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I’m sorry, I cannot assist with this request.",
        "I'm unable to comply with that request.",
        "I am not able to provide that information.",
        "Sorry, I can't really help with that.",
        "I won't be able to help with this one.",
        "I apologize, but I cannot fulfill this request.",
        "Unfortunately, I can't provide instructions for that.",
        "I will not write that.",
        "As an AI language model, I cannot browse the web.",
    ],
)
def test_a_refusal_of_the_request_is_still_caught(text: str) -> None:
    assert reasons(openai(text)) == ("refusal",)


def test_prose_and_one_fenced_json_block_is_json_two_blocks_are_not() -> None:
    """The docs' rule: an answer that is one fenced block (```json or bare), alone or with
    prose around it, is judged by the block's content."""
    asked = ask_of(response_format={"type": "json_object"})
    schema = {"type": "object", "required": ["a"]}
    for text in (
        'Here is the JSON you asked for:\n\n```json\n{"a": 1}\n```',
        'Sure.\n```\n{"a": 1}\n```\nLet me know if you need more.',
        '```JSON\n{"a": 1}\n```',
        '```json {"a": 1}```',
    ):
        assert reasons(openai(text), asked) == (), text
        assert reasons(openai(text), ask_of(schema=schema)) == (), text
    assert reasons(openai('Here:\n```json\n{"b": 1}\n```'), ask_of(schema=schema)) == ("schema",)
    assert reasons(openai('Here:\n```json\n{"a": 1\n```'), asked) == ("json",)
    two = '```json\n{"a": 1}\n```\nor\n```json\n{"a": 2}\n```'
    assert reasons(openai(two), asked) == ("json",)
    assert reasons(openai('```python\nprint({"a": 1})\n```'), asked) == ("json",)
    looping = "Here it is. " + "the the the " * 100 + '\n```json\n{"a": 1}\n```'
    assert reasons(openai(looping), asked) == ("repetition",)  # the prose is still text


def test_a_schema_integer_accepts_one_point_zero_and_no_bool_is_a_number() -> None:
    assert schema_errors(1.0, {"type": "integer"}) == []
    assert schema_errors(json.loads('{"n": 3.0}'), {"properties": {"n": {"type": "integer"}}}) == []
    assert schema_errors(1.5, {"type": "integer"}) == ["$: expected integer, got float"]
    assert schema_errors(True, {"type": "integer"}) == ["$: expected integer, got bool"]
    assert schema_errors(False, {"type": "number"}) == ["$: expected number, got bool"]
    assert schema_errors(True, {"type": ["number", "boolean"]}) == []
    assert schema_errors(True, {"enum": [1, "x"]}) == ["$: True is not one of [1, 'x']"]
    assert schema_errors(1.0, {"enum": [1]}) == []
    assert schema_errors(1, {"enum": [True]}) == ["$: 1 is not one of [True]"]


def test_an_empty_detectors_list_means_only_validate_and_needs_one() -> None:
    from celery_fleet.admission.config import parse_limits

    with pytest.raises(ConfigError, match=r"'detectors'\] is empty .* 'quality': False"):
        parse_limits({"a": {"rpm": 5, "quality": {"detectors": []}}})
    limits = parse_limits({"a": {"rpm": 5, "quality": {"detectors": []}, "validate": bool}})
    cfg = limits["a"].quality
    assert cfg is not None and cfg.detectors == ()
    assert judge(openai(" "), cfg.detectors, Ask()).ok  # no detector runs...
    assert judge(openai(" "), cfg.detectors, Ask(), validate=bool).ok
    assert judge("", cfg.detectors, Ask(), validate=bool).reasons == ("validate",)  # ...but it


def test_a_legacy_completion_is_read_by_its_text() -> None:
    legacy = {"choices": [{"text": GOOD, "finish_reason": "stop", "index": 0}]}
    assert read_reply(legacy).text == GOOD and reasons(legacy) == ()
    assert reasons({"choices": [{"text": "  ", "finish_reason": "stop"}]}) == ("empty",)
