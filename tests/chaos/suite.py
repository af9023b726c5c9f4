"""The chaos suite: every scenario with its short (CI, pytest) and long (`make chaos`)
parameters, and the issue-20 defects it exposes on code without their fixes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from celery_fleet.testing.chaos import Figures

from . import scenarios as s
from . import scenarios_fuzz as z
from . import scenarios_ha as h
from . import scenarios_more as m


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Any], Figures]
    short: Any
    long: Any
    depends_on: str


SCENARIOS: dict[str, Scenario] = {
    sc.name: sc
    for sc in [
        Scenario(
            "sigkill_storm",
            s.sigkill_storm,
            s.StormParams(keys=60, kills=30, timeout_s=120),
            s.StormParams(keys=400, kills=220, every_s=0.15, workers=2, cap=6, timeout_s=420),
            s.DEPENDS_ON["sigkill_storm"],
        ),
        Scenario(
            "duplicate_storm",
            s.duplicate_storm,
            s.StormParams(keys=60, copies=5, publishers=2, kills=12, hold_s=0.05, timeout_s=60),
            s.StormParams(
                keys=100,
                copies=10,
                publishers=4,
                kills=60,
                hold_s=0.1,
                workers=2,
                cap=6,
                timeout_s=240,
            ),
            s.DEPENDS_ON["duplicate_storm"],
        ),
        Scenario(
            "broker_down",
            s.broker_down,
            s.BrokerParams(keys=40, down_s=3.0, timeout_s=40),
            s.BrokerParams(keys=200, down_s=10.0, timeout_s=120),
            s.DEPENDS_ON["broker_down"],
        ),
        Scenario(
            "fleet_redis_faults",
            s.fleet_redis_faults,
            s.RedisFaultParams(),
            s.RedisFaultParams(
                rate_per_s=12.0, freeze_s=10.0, slows=3, slow_s=3.0, gap_s=3.0, timeout_s=240
            ),
            s.DEPENDS_ON["fleet_redis_faults"],
        ),
        Scenario(
            "provider_outage",
            m.provider_outage,
            m.OutageParams(),
            m.OutageParams(rate_per_s=10.0, outage_s=20.0, reset_s=2.0, tail_s=5.0),
            s.DEPENDS_ON["provider_outage"],
        ),
        Scenario(
            "time_limits",
            m.time_limits,
            m.TimeLimitParams(),
            m.TimeLimitParams(soft=12, hard=12),
            s.DEPENDS_ON["time_limits"],
        ),
        Scenario(
            "fencing",
            m.fencing,
            m.FencingParams(),
            m.FencingParams(restarts=2, locks=200, terms=10),
            s.DEPENDS_ON["fencing"],
        ),
        Scenario(
            "fuzz",
            z.fuzz,
            z.FuzzParams(examples=150),
            z.FuzzParams(examples=2000),
            s.DEPENDS_ON["fuzz"],
        ),
        Scenario(
            "sentinel_failover",
            h.sentinel_failover,
            h.FailoverParams(),
            h.FailoverParams(threads=16, after_s=12.0),
            s.DEPENDS_ON["sentinel_failover"],
        ),
    ]
}
