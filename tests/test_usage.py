"""The tokens every SDK adapter reserves before a call and settles after it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from celery_fleet.contrib.usage import (
    DEFAULT_MAX_TOKENS,
    CumulativeUsage,
    estimate_tokens,
    usage_tokens,
)

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        ({"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}, 42),
        ({"prompt_tokens": 12, "completion_tokens": 30}, 42),
        ({"input_tokens": 10, "output_tokens": 5}, 15),
        ({"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 100}, 115),
        (SimpleNamespace(total_tokens=7), 7),
        (SimpleNamespace(input_tokens=3, output_tokens=4), 7),
        ({"input_tokens": 10}, 10),
        ({}, None),
        (None, None),
        ({"total_tokens": "many"}, None),
        ({"total_tokens": -1, "prompt_tokens": 2, "completion_tokens": True}, 2),
    ],
)
def test_usage_is_read_in_each_providers_shape(usage: object, tokens: int | None) -> None:
    assert usage_tokens(usage) == tokens


def test_the_estimate_is_prompt_chars_over_four_plus_the_completion_budget() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 401}], "max_tokens": 50}
    assert estimate_tokens(body) == 101 + 50
    parts = {"role": "user", "content": [{"type": "text", "text": "y" * 8}]}
    anthropic_style = {"system": "z" * 4, "messages": [parts], "max_completion_tokens": 9}
    assert estimate_tokens(anthropic_style) == 3 + 9
    assert estimate_tokens({"messages": [], "max_tokens": 10, "n": 3}) == 30
    assert estimate_tokens({"messages": [{"content": "abcd"}]}) == 1 + DEFAULT_MAX_TOKENS


def test_cumulative_usage_keeps_the_latest_of_each_count_across_reports() -> None:
    # Anthropic's stream: message_start (the input, one output token), then message_delta
    # repeating the output so far, not adding to it; a dict or an SDK object alike.
    usage = CumulativeUsage()
    assert usage.tokens is None and usage.merge(None) is None
    assert usage.merge({"input_tokens": 12, "output_tokens": 1}) == 13
    assert usage.merge(SimpleNamespace(output_tokens=30, input_tokens=None)) == 42
    assert usage.merge({"output_tokens": 40, "cache_creation_input_tokens": 100}) == 152
    assert usage.tokens == 152
