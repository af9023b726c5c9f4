"""fleet_limits parsing: shorthands, multi-window rate strings, headroom, and clear errors."""

from __future__ import annotations

import pytest

from celery_fleet import ConfigError
from celery_fleet.admission.config import parse_limits

pytestmark = pytest.mark.fast


def test_shorthands_and_rate_strings() -> None:
    limits = parse_limits(
        {
            "openai": {
                "rpm": 500,
                "tpm": 200_000,
                "max_in_flight": 20,
                "headroom": 0.1,
                "burst": 1.0,
            },
            "search-api": {"rate": "100/minute", "max_in_flight": 5},
            "daily": {
                "requests": "500/minute;10000/day",
                "tokens": "200000/minute;5000000/day",
                "burst": 1.0,
            },
        }
    )
    openai = limits["openai"]
    assert [(w.field, w.declared, w.budget) for w in openai.windows] == [
        ("r:60", 500, pytest.approx(450.0)),
        ("t:60", 200_000, pytest.approx(180_000.0)),
    ]
    assert openai.max_in_flight == 20
    assert openai.max_tokens_per_call == 180_000
    assert [w.field for w in limits["search-api"].windows] == ["r:60"]
    assert [w.field for w in limits["daily"].windows] == ["r:60", "r:86400", "t:60", "t:86400"]
    # GCRA: T = period / budget, tau = burst * T
    w = limits["daily"].windows[1]
    assert w.emission_ms == pytest.approx(86_400_000 / 10_000)
    assert w.tolerance_ms == pytest.approx(86_400_000)


def test_burst_fraction_shrinks_every_bucket() -> None:
    cfg = parse_limits({"x": {"rpm": 600, "tpm": 10_000, "burst": 0.1}})["x"]
    assert [w.burst for w in cfg.windows] == [pytest.approx(60), pytest.approx(1000)]
    assert cfg.max_tokens_per_call == 1000


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"rpm": 0}, "'rpm'] must be a positive int"),
        ({"rpm": -5}, "'rpm'] must be a positive int"),
        ({"rpm": 1.5}, "'rpm'] must be a positive int"),
        ({"max_in_flight": 0}, "'max_in_flight'] must be a positive int"),
        ({"max_in_flight": True}, "'max_in_flight'] must be a positive int"),
        ({"rate": "100/minit"}, "cannot parse '100/minit'"),
        ({"rate": "0/minute"}, "allows nothing"),
        ({"requests": ["100/minute"]}, "must be a rate string"),
        ({"rpm": 100, "rate": "100/minute"}, "use only one"),
        ({"rpm": 10, "headroom": 1.0}, "'headroom'] must be >= 0.0 < 1.0"),
        ({"rpm": 10, "lease": 0.1}, "'lease'] must be >= 1.0"),
        ({"rpm": 10, "tmp": 100}, "unknown option(s) 'tmp' (did you mean 'tpm'?)"),
        ({"rpm": 10, "burst": 0.01}, "smaller than one request"),
        ({}, "limits nothing"),
        ({"headroom": 0.1}, "limits nothing"),
        ("500/minute", "must be a dict of options"),
    ],
)
def test_bad_limits_name_the_setting(spec: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_limits({"llm": spec})
    assert needle in str(info.value)
    assert "fleet_limits['llm']" in str(info.value)


def test_duplicate_period_is_rejected() -> None:
    with pytest.raises(ConfigError, match="twice"):
        parse_limits({"llm": {"requests": "100/minute;200/minute"}})


@pytest.mark.parametrize("name", ["", "has space", "{tag}", "a:b", 42])
def test_bad_limit_names(name: object) -> None:
    with pytest.raises(ConfigError, match="fleet_limits key"):
        parse_limits({name: {"rpm": 10}})


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("tokens", "needle"),
    [
        (-1, "non-negative int"),
        (2.5, "non-negative int"),
        ("100", "non-negative int"),
        (True, "non-negative int"),
        (9_001, "can never be admitted"),
    ],
)
def test_token_estimates_are_checked(tokens: object, needle: str) -> None:
    cfg = parse_limits({"llm": {"rpm": 10, "tpm": 10_000, "headroom": 0.1, "burst": 1.0}})["llm"]
    with pytest.raises(ConfigError, match=needle):
        cfg.check_tokens(tokens)
    assert cfg.check_tokens(9_000) == 9_000


def test_tokens_on_a_limit_without_token_budget() -> None:
    cfg = parse_limits({"search": {"rate": "10/second"}})["search"]
    assert cfg.check_tokens(0) == 0
    with pytest.raises(ConfigError, match="no token budget"):
        cfg.check_tokens(10)


def test_default_burst_is_a_tenth_of_a_window_and_never_below_one_request() -> None:
    from celery_fleet.admission.config import DEFAULT_BURST

    assert DEFAULT_BURST == 0.1
    cfg = parse_limits({"x": {"rpm": 60, "tpm": 90_000}, "y": {"rpm": 5}})
    assert [w.burst for w in cfg["x"].windows] == [pytest.approx(6), pytest.approx(9_000)]
    assert cfg["x"].max_tokens_per_call == 9_000
    assert cfg["y"].windows[0].burst == 1.0  # rpm=5 alone still admits one request
    with pytest.raises(ConfigError, match="raise fleet_limits\\['x'\\]\\['burst'\\]"):
        cfg["x"].check_tokens(9_001)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"rpm": 10**400}, "'rpm'] must be a positive int <= 9007199254740992"),
        ({"tpm": 2**60}, "'tpm'] must be a positive int <="),
        ({"rate": "10000000000000000000/minute"}, "is more than"),
        ({"rpm": 10, "headroom": 10**400}, "'headroom'] must be >= 0.0 < 1.0 (finite)"),
        ({"rpm": 10, "lease": 10**400}, "'lease'] must be >= 1.0"),
        ({"max_in_flight": 10**9}, "'max_in_flight'] must be a positive int <= 1000000"),
        ({"rpm": 10, "breaker": {"window": 10**400}}, "'window'] must be"),
        ({"max_in_flight": 4, "adaptive": True, "probe_interval": 10**9}, "'probe_interval']"),
    ],
)
def test_absurd_numbers_are_config_errors_not_overflows(spec: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_limits({"llm": spec})
    assert needle in str(info.value)
    assert len(str(info.value)) < 400  # a 400-digit number is not echoed back whole


@pytest.mark.parametrize("name", ["openai\n", "a" * 101, "tab\tname", "x\n"])
def test_names_must_match_whole_and_stay_short(name: str) -> None:
    with pytest.raises(ConfigError, match="at most 100"):
        parse_limits({name: {"rpm": 10}})
    assert parse_limits({"a" * 100: {"rpm": 10}})
