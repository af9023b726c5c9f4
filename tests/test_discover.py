"""Capacity discovery (issue 25): a limit with ``"discover"`` rises above its declared rate
toward what the provider really allows, never above a header's limit nor ``up_to``; a 429
cuts it; what it learned is shared fleet-wide and remembered for a while.

Real Redis (the scripts run for real); the end-to-end runs use a real ProviderSim over HTTP
with threads, and judge by the simulator's own log (what the provider saw), not timings.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from celery_fleet import Fleet, Throttled
from celery_fleet.admission.config import parse_limit
from celery_fleet.admission.decision import acquire_args, release_args
from celery_fleet.errors import ConfigError
from celery_fleet.testing import ProviderSim

pytest_plugins = ["celery_fleet.testing.pytest_plugin"]

MakeFleet = Callable[..., Fleet]
DISCOVER = {"rpm": 600, "burst": 0.01, "discover": {"up_to": 2.0}}


def _ctl(fleet: Fleet, **fields: object) -> None:
    fleet.admission.store.call("HSET", fleet.admission.keys("llm").ctl, *[
        x for kv in fields.items() for x in kv
    ])  # fmt: skip


def _now_ms(fleet: Fleet) -> float:
    s, us = fleet.admission.store.call("TIME")
    return int(s) * 1000 + int(us) / 1000


def _burst(fleet: Fleet) -> int:
    """How many calls a fresh bucket admits at once (the window's tolerance over its T/f)."""
    fleet.reset_buckets("llm")
    n = 0
    while (d := fleet.try_acquire("llm")) and n < 100:
        fleet.release(d, "neutral")
        n += 1
    return n


def test_the_learned_factor_raises_the_rate_and_a_new_process_starts_from_it(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"llm": DISCOVER})
    assert _burst(fleet) == 6  # 600 rpm, burst 0.01: 6 calls at once
    _ctl(fleet, disc="1.5", disc_until=_now_ms(fleet) + 60_000)
    assert _burst(fleet) == 9  # the same tolerance, T / 1.5
    again = make_fleet({"llm": DISCOVER})  # another process, or this one restarted
    assert again.discovered("llm")["factor"] == 1.5
    assert again.discovered("llm")["windows"] == {
        "600 requests/60s": {"declared": 600, "effective": 900.0}
    }
    assert _burst(again) == 9


def test_a_limit_without_discover_ignores_a_learned_factor(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"rpm": 600, "burst": 0.01}})
    _ctl(fleet, disc="1.5", disc_until=_now_ms(fleet) + 60_000)
    assert _burst(fleet) == 6
    assert fleet.discovered("llm") is None


def test_what_was_learned_is_forgotten_after_remember(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {**DISCOVER, "discover": {"up_to": 2.0, "remember": 1}}})
    _ctl(fleet, disc="1.5", disc_until=_now_ms(fleet) + 60_000)
    d = fleet.try_acquire("llm")
    fleet.release(d, "rate")  # a cut writes disc_until = now + remember
    assert fleet.discovered("llm")["factor"] == pytest.approx(1.35)
    deadline = time.monotonic() + 10
    while fleet.discovered("llm")["factor"] != 1.0:
        assert time.monotonic() < deadline, "the learned factor was never forgotten"
        time.sleep(0.1)
    assert _burst(fleet) == 6


def test_the_first_429_cuts_once_per_overshoot(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": DISCOVER})
    _ctl(fleet, disc="1.5", disc_until=_now_ms(fleet) + 60_000)
    before = fleet.try_acquire("llm")  # admitted before the cut: the same overshoot
    fleet.release(fleet.try_acquire("llm"), "rate")
    state = fleet.adaptive_state("llm")
    assert (state["disc"], state["disc_ceiling"]) == (pytest.approx(1.35), 1.5)
    fleet.release(before, "rate")
    assert fleet.adaptive_state("llm")["disc"] == pytest.approx(1.35)
    fleet.release(fleet.try_acquire("llm"), "rate")  # admitted after the cut: a new one
    assert fleet.adaptive_state("llm")["disc"] == pytest.approx(1.215)


def test_growth_needs_the_declared_ceiling_to_bind(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {**DISCOVER, "discover": {"up_to": 2.0, "increase": 1.0}}})
    for _ in range(5):  # successes below the ceiling teach nothing
        fleet.release(fleet.try_acquire("llm"), "ok")
        time.sleep(0.05)
    assert "disc" not in fleet.adaptive_state("llm")
    held = []
    while d := fleet.try_acquire("llm"):
        held.append(d)  # spend the window until it refuses: now it binds
    time.sleep(0.2)
    for d in held:
        fleet.release(d, "ok")
    assert fleet.discovered("llm")["factor"] > 1.0


def test_headers_bound_the_factor_only_for_a_discovering_limit(make_fleet: MakeFleet) -> None:
    headers = {"x-ratelimit-limit-requests": "900", "x-ratelimit-remaining-requests": "800"}
    fleet = make_fleet({"llm": DISCOVER})
    fleet.admission.observe("llm", _obs(headers))
    assert fleet.adaptive_state("llm")["provider_factor"] == 1.5
    _ctl(fleet, disc="2.0", disc_until=_now_ms(fleet) + 60_000)
    assert fleet.discovered("llm")["factor"] == 1.5  # never above the header's limit
    assert _burst(fleet) == 9
    plain = make_fleet({"other": {"rpm": 600}})
    plain.admission.observe("other", _obs(headers))
    assert plain.adaptive_state("other")["provider_factor"] == 1.0  # as before issue 25


def test_what_remains_above_the_declared_rate_counts_at_the_header_s_rate(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"llm": {**DISCOVER, "burst": 0.1}})  # a bucket of 60 calls
    _ctl(fleet, disc="1.5", disc_until=_now_ms(fleet) + 60_000)
    headers = {"x-ratelimit-limit-requests": "900", "x-ratelimit-remaining-requests": "3"}
    fleet.admission.observe("llm", _obs(headers))
    admitted = 0
    while fleet.try_acquire("llm") and admitted < 100:
        admitted += 1
    assert admitted == 3  # the provider's 3, not 3 * 1.5


def _obs(headers: dict[str, str]) -> Any:
    from celery_fleet.admission.providers import parse_headers

    return parse_headers(headers)


def test_an_adaptive_cap_may_grow_to_up_to_times_max_in_flight(make_fleet: MakeFleet) -> None:
    def peak(spec: dict[str, Any]) -> int:
        fleet = make_fleet({"cap": spec})
        most = 0
        for _ in range(60):  # hold all the cap admits, release them ok: it is in use
            held = []
            while (d := fleet.try_acquire("cap")) and len(held) < 50:
                held.append(d)
            most = max(most, len(held))
            for d in held:
                fleet.release(d, "ok")
        return most

    spec = {"max_in_flight": 4, "adaptive": True, "initial_in_flight": 4}
    assert peak(spec) == 4
    assert peak({**spec, "discover": {"up_to": 2.0}}) == 8


def test_limits_without_discover_send_the_scripts_the_same_constants() -> None:
    cfg = parse_limit("x", {"rpm": 600, "tpm": 90_000, "max_in_flight": 8}, "t")
    assert len(acquire_args(cfg)[0]) == 8 * (7 + 2 * 2)  # no discovery tail
    assert len(release_args(cfg)[0]) == 8 * 16
    on = parse_limit("x", {"rpm": 600, "discover": {"up_to": 3}}, "t")
    assert struct.unpack("<d", acquire_args(on)[0][-8:]) == (3.0,)
    assert len(release_args(on)[0]) == 8 * 21


@pytest.mark.parametrize(
    ("discover", "match"),
    [
        ({"up_to": 1.0}, "up_to'\\] must be > 1.0"),
        ({"up_to": 10.5}, "up_to'\\] must be .*<= 10"),
        ({"up_to": "2"}, "must be a number"),
        ({"upto": 2}, "unknown option"),
        ("yes", "must be True or a dict"),
        ({"decrease": 1.0}, "decrease"),
    ],
)
def test_discover_options_are_validated(discover: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_limit("x", {"rpm": 600, "discover": discover}, "fleet_limits['x']")


def test_discover_needs_something_to_raise() -> None:
    with pytest.raises(ConfigError, match="needs a rate to raise"):
        parse_limit("x", {"max_in_flight": 4, "discover": True}, "fleet_limits['x']")
    assert parse_limit("x", {"rpm": 60, "discover": True}, "t").discover.up_to == 2.0  # type: ignore[union-attr]


def _run(sim: ProviderSim, fleet: Fleet, seconds: float, threads: int = 8) -> None:
    """Callers that always want more than the declared rate, each call in a slot."""
    stop = time.monotonic() + seconds

    def work() -> None:
        with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as client:
            while time.monotonic() < stop:
                try:
                    with fleet.slot("llm", max_wait=5) as slot:
                        raw = client.chat.completions.with_raw_response.create(
                            model="sim", max_tokens=5, messages=[{"role": "user", "content": "x"}]
                        )
                        slot.observe(raw.headers)
                except Throttled:
                    pass

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _served(sim: ProviderSim, start_s: float, end_s: float) -> float:
    """Answers served per 10 s over [start_s, end_s) of the simulator's timeline."""
    ok = sum(r.admitted for r in sim.log if start_s <= r.t_s < end_s)
    return ok * 10 / (end_s - start_s)


def test_without_headers_the_fleet_finds_the_real_capacity(
    make_fleet: MakeFleet, make_provider_sim: Callable[..., ProviderSim]
) -> None:
    """The issue's target: declared 100 per 10 s, really 150 per 10 s, no limit headers: at
    least 130 per 10 s once found, at most 2% of calls answered 429."""
    sim = make_provider_sim(
        rpm=900, tpm=None, max_in_flight=None, latency=0.05, burst_s=2,
        rate_limit_headers=False, seed=1,
    )  # fmt: skip
    fleet = make_fleet({"llm": {"rpm": 600, "burst": 0.05, "discover": {"up_to": 2.0}}})
    _run(sim, fleet, 32)
    stats = sim.stats()
    assert _served(sim, 12, 32) >= 130
    assert sum(stats["rate_limited"].values()) <= 0.02 * stats["requests"]
    assert fleet.discovered("llm")["factor"] > 1.3


def test_with_headers_the_rate_rises_to_the_stated_limit_and_no_higher(
    make_fleet: MakeFleet, make_provider_sim: Callable[..., ProviderSim]
) -> None:
    sim = make_provider_sim(rpm=900, tpm=None, max_in_flight=None, latency=0.05, burst_s=2, seed=2)
    fleet = make_fleet({"llm": {"rpm": 600, "burst": 0.05, "discover": {"up_to": 2.0}}})
    _run(sim, fleet, 22)
    assert fleet.discovered("llm")["factor"] == 1.5  # 900 / 600, though up_to is 2
    assert fleet.adaptive_state("llm")["disc"] == 1.5  # what it learned, too
    assert sum(sim.stats()["rate_limited"].values()) == 0
    assert _served(sim, 12, 22) >= 140


def test_status_and_metrics_show_the_discovered_rate_against_the_declared(
    redis_url: str, namespace: str
) -> None:
    from types import SimpleNamespace

    from celery import Celery
    from click.testing import CliRunner
    from prometheus_client import generate_latest

    from celery_fleet.observability.cli import fleet as fleet_cli
    from celery_fleet.observability.metrics import fleet_registry

    app = Celery("discover_status", broker=redis_url, set_as_current=False)
    app.conf.update(
        fleet_redis_url=redis_url,
        fleet_namespace=namespace,
        fleet_limits={"llm": DISCOVER, "plain": {"rpm": 600}},
    )
    fleet = Fleet(app)
    _ctl(fleet, disc="1.5", disc_until=_now_ms(fleet) + 60_000)
    out = CliRunner().invoke(fleet_cli, ["status"], obj=SimpleNamespace(app=app)).output
    assert "discovered   1.50x declared: 900 requests/60s (up to 2x)" in out
    assert out.count("discovered") == 1  # not on the limit without "discover"
    metrics = generate_latest(fleet_registry(fleet)).decode()
    assert f'celery_fleet_discovered_factor{{fleet="{namespace}",limit="llm"}} 1.5' in metrics
    assert (
        f'celery_fleet_discovered_rate{{dimension="requests",fleet="{namespace}",limit="llm",'
        f'period_seconds="60"}} 900.0'
    ) in metrics
