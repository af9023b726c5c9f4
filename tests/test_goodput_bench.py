"""The goodput benchmark's arithmetic and options, without running it (benchmarks/goodput.py).

No worker, no provider, no Redis: the helpers that turn what a run saw into the reported
figures (ideal time, waste, percentiles, ticket order), and the command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

from benchmarks.harness.goodput import (
    Admission,
    Outcome,
    admissions_from,
    effective_rate,
    ideal_s,
    percentile,
    ticket_order,
    wasted,
)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "goodput.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("goodput_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ideal_is_useful_calls_at_the_rate_left_after_headroom() -> None:
    assert effective_rate(600, 0.05) == pytest.approx(9.5)
    assert ideal_s(300, 600, 0.05) == pytest.approx(300 / 9.5)
    assert ideal_s(90, 300, 0.0) == pytest.approx(18.0)


def test_wasted_is_the_share_of_paid_calls_not_needed() -> None:
    assert wasted(113, 90) == pytest.approx(23 / 113)
    assert wasted(90, 90) == 0.0
    assert wasted(0, 0) == 0.0  # nothing paid, nothing wasted


def test_percentile_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == 5.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 20) == 1.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert math.isnan(percentile([], 50))


def test_ticket_order_counts_waiters_passed_by_a_younger_caller() -> None:
    older = Admission(age=0.0, ask=1.0, admit=5.0, contended=True)
    younger = Admission(age=2.0, ask=2.0, admit=3.0, contended=True)  # admitted while older waited
    assert ticket_order([older, younger]) == (2, 1)
    # the same admissions in age order: nobody passed
    fair = Admission(age=2.0, ask=2.0, admit=6.0, contended=True)
    assert ticket_order([older, fair]) == (2, 0)


def test_ticket_order_ignores_what_happened_before_the_wait_or_within_a_tie() -> None:
    waiter = Admission(age=0.0, ask=4.0, admit=5.0, contended=True)
    before = Admission(age=3.0, ask=3.0, admit=3.5, contended=False)  # before it asked
    assert ticket_order([waiter, before]) == (1, 0)
    uncontended = Admission(age=0.0, ask=1.0, admit=1.0, contended=False)
    assert ticket_order([uncontended]) == (0, 0)
    near = Admission(age=0.02, ask=4.5, admit=4.6, contended=False)  # 20 ms younger
    assert ticket_order([waiter, near]) == (1, 1)
    assert ticket_order([waiter, near], tie_s=0.05) == (1, 0)


def test_ticket_order_ties_at_either_end_of_the_wait() -> None:
    waiter = Admission(age=0.0, ask=4.0, admit=5.0, contended=True)
    right_after_its_ask = Admission(age=1.0, ask=3.9, admit=4.01, contended=True)
    right_before_its_admission = Admission(age=1.0, ask=3.9, admit=4.99, contended=True)
    well_inside = Admission(age=1.0, ask=3.9, admit=4.03, contended=True)
    for a in (right_after_its_ask, right_before_its_admission):
        assert ticket_order([waiter, a]) == (2, 1)
        assert ticket_order([waiter, a], tie_s=0.02) == (2, 0)
    assert ticket_order([waiter, well_inside], tie_s=0.02) == (2, 1)


def test_admissions_are_read_on_the_redis_clock_with_both_ages() -> None:
    records = [
        {"task": "a", "attempts": 3, "waited_s": 1.5, "at_ms": 10_000.0, "since_ms": 8_000},
        {"task": "b", "attempts": 1, "waited_s": 0.0, "at_ms": 9_000.0, "since_ms": None},
    ]
    got = admissions_from(records, {"a": 7_900.0, "b": 8_500.0})
    assert got["line"] == [Admission(8.0, 8.5, 10.0, True)]  # the old package has no since_ms
    assert got["stamp"] == [Admission(7.9, 8.5, 10.0, True), Admission(8.5, 9.0, 9.0, False)]


def outcome(**changes: object) -> Outcome:
    base: dict[str, object] = dict(
        kind="plain",
        max_wait_s=3.0,
        package="/x/celery_fleet/__init__.py",
        agents=100,
        steps=3,
        done=100,
        failed=0,
        timed_out=False,
        paid=302,
        useful=300,
        requests=302,
        provider_429=0,
        reschedules=7,
        makespan_s=33.0,
        ideal_s=31.58,
        completion_s=[float(i) for i in range(1, 101)],
        order={"line": (200, 1), "stamp": (200, 3), "strict": (200, 4)},
    )
    base.update(changes)
    return Outcome(**base)  # type: ignore[arg-type]


def test_outcome_figures_and_json_summary() -> None:
    o = outcome()
    assert o.wasted == pytest.approx(2 / 302)
    assert o.ratio == pytest.approx(33.0 / 31.58)
    assert o.in_order("line") == pytest.approx(0.995)
    summary = outcome(completion_s=[], order={}).summary()
    assert summary["p50_s"] is None and summary["in_order_line"] is None  # no NaN in JSON


def test_verdict_checks_the_plain_run_at_three_seconds(bench: ModuleType) -> None:
    lines = bench.verdict([outcome(kind="baseline", paid=400), outcome()])
    assert all("(met;" in line for line in lines), lines
    lines = bench.verdict([outcome(paid=310, order={"line": (100, 5), "strict": (100, 9)})])
    assert "paid calls wasted: 3.2% (MISSED" in lines[1]
    assert "in ticket order: 95.0% (strict 91.0%) (MISSED" in lines[3]
    assert "MISSED" in bench.verdict([outcome(timed_out=True, done=90)])[0]
    assert "not checked" in bench.verdict([outcome(max_wait_s=30.0)])[0]


def test_tables_have_a_row_per_configuration(bench: ModuleType) -> None:
    runs = [outcome(kind="baseline", paid=400, timed_out=True), outcome()]
    text = bench.table(runs).splitlines()
    assert len(text) == 4 and text[0].startswith("config")
    assert "25.0%" in text[2] and ">33.0" in text[2]  # wasted; a timed-out makespan
    md = bench.markdown_table(runs).splitlines()
    assert len(md) == 4 and md[2].startswith("| baseline 3s | 100/100 | 400 | 300 | 25.0% |")


def test_options(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert (args.agents, args.steps, args.rpm, args.concurrency, args.pool) == (
        100,
        3,
        600,
        40,
        "threads",
    )
    assert args.max_wait == [0.0, 3.0, 30.0] and args.kinds == ["baseline", "plain", "durable"]
    assert args.timeout == pytest.approx(10 * 300 / 9.5, abs=0.1)
    quick = bench.parse_args(["--quick"])
    assert (quick.agents, quick.rpm, quick.concurrency, quick.max_wait) == (30, 300, 10, [3.0])
    assert quick.timeout == pytest.approx(3 * 90 / 4.75, abs=0.1)
    mixed = bench.parse_args(["--quick", "--agents", "12", "--max-wait", "0,5", "--timeout", "9"])
    assert (mixed.agents, mixed.max_wait, mixed.timeout, mixed.rpm) == (12, [0.0, 5.0], 9.0, 300)
    scenario = bench.scenario_of(bench.parse_args(["--tpm", "0", "--provider-burst", "3"]))
    assert scenario.tpm == 0 and scenario.max_in_flight == 0  # none (the defaults)
    assert scenario.provider_burst_s == 3.0


@pytest.mark.parametrize("text", ["", "a,b", "-1", "3,inf", "nan"])
def test_bad_max_wait_lists_are_refused(bench: ModuleType, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        bench.seconds_list(text)


def test_unknown_kinds_are_refused(bench: ModuleType) -> None:
    assert bench.kinds_list("plain, durable") == ["plain", "durable"]
    with pytest.raises(argparse.ArgumentTypeError, match="baseline, plain, durable"):
        bench.kinds_list("plain,fleet")
