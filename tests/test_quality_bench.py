"""The quality benchmark's arithmetic and options, without running it (benchmarks/quality.py).

No provider, no Redis: the helpers that turn a simulator's log and the transitions heard
into the reported figures, and the command line.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from benchmarks.harness.quality import (
    CapacityPhase,
    capacity_rows,
    capacity_table,
    delay_after,
    opens,
    per_10s,
    quality_table,
    wasted_calls,
)
from celery_fleet.testing import RequestRecord

pytestmark = pytest.mark.fast

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def rec(t_s: float, outcome: str) -> RequestRecord:
    return RequestRecord(t_s, outcome, 429 if outcome == "429" else 200)


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_served_counts_ok_and_garbage_per_10_s_and_429s_apart() -> None:
    log = [rec(0.5 * i, "ok") for i in range(20)] + [rec(1, "garbage"), rec(2, "429")]
    assert per_10s(log, 0, 10) == 21.0  # 20 ok + 1 garbage in 10 s
    assert per_10s(log, 0, 5) == 22.0  # 10 ok + 1 garbage in 5 s
    assert per_10s(log, 0, 10, "429") == 1.0
    assert per_10s(log, 5, 5) == 0.0


def test_capacity_rows_compare_served_with_the_real_capacity_per_phase() -> None:
    # real 900 rpm = 150 per 10 s over 0-10 s: 130 served, 2 refused
    log = [rec(i * 10 / 130, "ok") for i in range(130)] + [rec(9.0, "429"), rec(9.5, "429")]
    (row,) = capacity_rows(log, [CapacityPhase(0, 10, 900)], declared_rpm=600)
    assert row["real_per_10s"] == 150 and row["declared_per_10s"] == 100
    assert row["served_per_10s"] == 130 and row["used"] == pytest.approx(0.867, abs=1e-3)
    assert (row["calls"], row["429s"], row["share_429"]) == (132, 2, pytest.approx(0.0152))
    assert row["settled_used"] == pytest.approx(130 / 150, abs=0.02)
    table = capacity_table({"discover on": [row]})
    assert "| discover on | 0-10 s | 150 | 100 | 130 | 87% | 87% | 132 | 2 | 1.5% |" in table


def test_delays_opens_and_garbage_wasted() -> None:
    seen = [(3.0, "open"), (12.0, "half_open"), (14.5, "closed"), (20.0, "open")]
    assert delay_after(seen, 1.0) == 2.0
    assert delay_after(seen, 10.0, "closed") == 4.5
    assert delay_after(seen, 25.0) is None
    assert opens(seen) == 2
    log = [rec(1, "garbage"), rec(2, "ok"), rec(3, "garbage"), rec(6, "garbage")]
    assert wasted_calls(log, 0, 5) == 2
    row = {
        "mode": "pause", "burst": "b", "opened_after_s": 2.0, "closed_after_s": None,
        "garbage_in_burst": 2, "garbage_after_open": 1, "calls_in_burst": 3, "refused": 7,
    }  # fmt: skip
    assert "| pause | b | 2.00 s | never | 2 | 1 | 3 | 7 |" in quality_table([row])


def test_quick_appends_nothing_and_bad_durations_are_refused() -> None:
    module = bench()
    quick = module.parse_args(["--quick"])
    assert quick.no_write and quick.phase < 15
    default = module.parse_args([])
    assert not default.no_write and default.healthy == 60
    with pytest.raises(SystemExit):
        module.parse_args(["--phase", "0"])
