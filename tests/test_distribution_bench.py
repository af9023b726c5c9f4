"""The distribution benchmark's arithmetic and options, without running it
(benchmarks/distribution.py, benchmarks/harness/distribution.py).

No worker, no Redis: the plan of tasks, the warm-up cache, and the figures (makespan,
locality, affinity, utilisation, lost / twice) from hand-made records.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import threading
from types import ModuleType

import pytest

from benchmarks.harness.distribution import (
    Record,
    WarmCache,
    Workload,
    kill_lines,
    median_stats,
    ratios,
    settled,
    summarise,
    table,
    targets,
)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return importlib.import_module("benchmarks.distribution")


def done(i: str, customer: str, worker: str, warm: bool, start: float, end: float) -> Record:
    return Record(id=i, customer=customer, worker=worker, warm=warm, start=start, end=end)


#: t0 = 100: worker a runs 3 tasks (4 s busy), b runs 1 (1 s), c none; the last ends at 104.
RECORDS = [
    done("1", "x", "a", False, 100.0, 101.0),
    done("2", "x", "a", True, 101.0, 102.0),
    done("3", "y", "a", False, 102.0, 104.0),
    done("4", "x", "b", False, 100.5, 101.5),
    Record(id="1", customer="", worker="a", warm=False, start=0, end=0, ev="start"),
    Record(id="4", customer="", worker="b", warm=False, start=0, end=0, ev="start"),
]


def test_makespan_locality_affinity_and_utilisation_from_records() -> None:
    stats = summarise(
        "shared",
        RECORDS,
        t0=100.0,
        slots=2,
        expected=["1", "2", "3", "4"],
        workers=["a", "b", "c"],
    )
    assert stats.makespan_s == pytest.approx(4.0)  # t0 to the last end
    assert stats.locality == pytest.approx(1 / 4)  # one of four ran warm
    # x: 2 of 3 tasks on a; y: 1 of 1 on a
    assert stats.affinity == pytest.approx((2 / 3 + 1) / 2)
    # busy slot-seconds over slots x makespan = 2 x 4
    assert stats.utilisation == pytest.approx({"a": 4 / 8, "b": 1 / 8, "c": 0.0})
    assert stats.mean_utilisation == pytest.approx((4 / 8 + 1 / 8) / 3)
    assert stats.per_worker == {"a": 3, "b": 1, "c": 0}
    assert (stats.tasks, stats.published, stats.runs) == (4, 4, 2)
    assert stats.exactly_once


def test_lost_and_twice_are_counted_by_task_id() -> None:
    again = done("2", "x", "b", False, 103.0, 103.5)  # completed a second time
    stats = summarise("steal", [*RECORDS, again], t0=100.0, slots=2, expected=["1", "2", "3", "5"])
    assert stats.lost == ["5"]
    assert stats.twice == ["2"]
    assert not stats.exactly_once
    assert stats.tasks == 5


def test_no_records_gives_zeros_not_errors() -> None:
    stats = summarise("dedicated", [], t0=5.0, slots=2, expected=["a"], workers=["w"])
    assert (stats.makespan_s, stats.locality, stats.affinity) == (0.0, 0.0, 0.0)
    assert stats.utilisation == {"w": 0.0}
    assert stats.lost == ["a"]


def test_targets_compare_steal_with_shared_makespan_and_dedicated_locality() -> None:
    def mode(name: str, makespan: float, locality: float) -> object:
        stats = summarise(name, [], t0=0.0, slots=1, expected=[])
        stats.makespan_s, stats.locality = makespan, locality
        return stats

    shared, dedicated = mode("shared", 10.0, 0.5), mode("dedicated", 14.0, 0.9)
    met = targets(shared, dedicated, mode("steal", 10.9, 0.82))  # type: ignore[arg-type]
    assert met.makespan_ratio == pytest.approx(1.09) and met.makespan_met
    assert met.locality_ratio == pytest.approx(0.82 / 0.9) and met.locality_met
    missed = targets(shared, dedicated, mode("steal", 11.2, 0.8))  # type: ignore[arg-type]
    assert not missed.makespan_met and not missed.locality_met


def test_median_of_rounds_and_union_of_failures() -> None:
    rounds = []
    for makespan, lost in ((4.0, []), (6.0, ["9"]), (5.0, [])):
        stats = summarise("steal", RECORDS, t0=0.0, slots=2, expected=["1", "2", "3", "4"])
        stats.makespan_s, stats.lost = makespan, lost
        rounds.append(stats)
    merged = median_stats(rounds)
    assert merged.makespan_s == 5.0
    assert merged.lost == ["9"]
    assert median_stats(rounds[:1]) is rounds[0]


def test_plan_interleaves_customers_with_heavy_ones_slower() -> None:
    load = Workload(customers=4, tasks_per_customer=2, light_s=0.1, heavy=10, heavy_every=2)
    plan = load.plan()
    assert [t.customer for t in plan] == ["c00", "c01", "c02", "c03"] * 2
    assert [t.cost_s for t in plan[:4]] == pytest.approx([1.0, 0.1, 1.0, 0.1])
    assert load.work_s() == pytest.approx(2 * (1.0 + 0.1 + 1.0 + 0.1))


def test_warm_cache_is_cold_once_per_customer() -> None:
    cache = WarmCache()
    assert cache.enter("x", 0.0) is False
    assert cache.enter("x", 0.0) is True
    assert cache.enter("y", 0.0) is False


def test_a_task_waiting_for_another_threads_load_counts_cold() -> None:
    cache = WarmCache()
    loading = threading.Event()  # another thread's load of "x", under way
    cache._loaded["x"] = loading
    seen: list[bool] = []
    waiter = threading.Thread(target=lambda: seen.append(cache.enter("x", 0.0)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "a task must wait for a load in progress"
    loading.set()
    waiter.join(5)
    assert seen == [False]
    assert cache.enter("x", 0.0) is True


def test_record_from_json() -> None:
    raw = json.dumps(
        {
            "ev": "done",
            "id": "t",
            "customer": "c01",
            "worker": "w@h",
            "warm": True,
            "start": 1.5,
            "end": 2.0,
            "redelivered": True,
            "queue": "q",
        }
    )
    r = Record.from_json(raw.encode())
    assert (r.id, r.customer, r.worker, r.warm) == ("t", "c01", "w@h", True)
    assert (r.start, r.end) == (1.5, 2.0)
    assert r.redelivered and r.ev == "done"
    assert Record.from_json('{"ev": "start", "id": "t"}').ev == "start"


def test_options_and_quick(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert (args.customers, args.tasks, args.workers, args.repeat) == (24, 8, 3, 3)
    assert args.modes == ["shared", "dedicated", "steal"] and not args.kill
    quick = bench.parse_args(["--quick", "--kill"])
    assert (quick.customers, quick.tasks, quick.quick, quick.kill) == (12, 4, True, True)


def test_ratio_lines_say_whether_targets_are_met() -> None:
    def mode(name: str, makespan: float, locality: float) -> object:
        stats = summarise(name, [], t0=0.0, slots=1, expected=[])
        stats.makespan_s, stats.locality = makespan, locality
        return stats

    lines = ratios(
        {
            "shared": mode("shared", 10, 0.5),
            "dedicated": mode("dedicated", 12, 0.9),
            "steal": mode("steal", 12, 0.85),
        }
    )
    assert "steal: makespan / shared 1.200, locality / dedicated 0.944" in lines
    assert any("makespan" in line and "NOT MET" in line for line in lines)
    assert any("locality" in line and line.endswith(" MET") for line in lines)
    only_shared = ratios({"shared": mode("shared", 10, 0.5)})
    assert "not checked" in only_shared[-1]


def test_homes_are_settled_when_spread_disjoint_and_complete() -> None:
    workers = ["a", "b"]
    assert settled({"a": {"q0", "q1"}, "b": {"q2"}}, workers, 3)
    assert not settled({"a": {"q0", "q1", "q2"}, "b": set()}, workers, 3)  # b has none yet
    assert not settled({"a": {"q0", "q1", "q2"}}, workers, 3)  # b did not answer
    assert not settled({"a": {"q0", "q1"}, "b": {"q1", "q2"}}, workers, 3)  # q1 twice
    assert not settled({"a": {"q0"}, "b": {"q2"}}, workers, 3)  # q1 has no home


def test_table_has_a_row_per_mode_and_every_worker() -> None:
    stats = summarise("shared", RECORDS, t0=100.0, slots=2, expected=["1", "2", "3", "4"])
    lines = table([stats]).splitlines()
    assert len(lines) == 2 and lines[1].startswith("shared")
    assert "a 0.50 (3)" in lines[1] and "b 0.12 (1)" in lines[1]


def test_kill_line_reports_lost_twice_and_when_cut_tasks_ran_again() -> None:
    cut = Record(
        id="5", customer="x", worker="b", warm=False, start=107.0, end=108.0, redelivered=True
    )
    starts = [
        Record(id=i, customer="", worker="", warm=False, start=0, end=0, ev="start")
        for i in ("1", "2", "3", "4", "5", "5")
    ]
    stats = summarise(
        "steal",
        [*RECORDS[:4], cut, *starts],
        t0=100.0,
        slots=2,
        expected=["1", "2", "3", "4", "5"],
    )
    stats = dataclasses.replace(stats, killed="b@host", kill_at_s=2.0)
    assert stats.redelivered_s == pytest.approx(7.0)
    (line,) = kill_lines([stats])
    assert line.startswith("steal: b SIGKILLed at 2.00 s; 5 completions of 5 tasks")
    assert "lost 0, twice 0; 6 runs (+1 restarted, the last 5.0 s after the kill)" in line
    assert line.endswith("exactly once")
    lost = dataclasses.replace(stats, lost=["6"])
    assert kill_lines([lost])[0].endswith("LOST OR TWICE")


def test_stolen_counts_tasks_run_away_from_their_queues_home() -> None:
    def on(i: str, worker: str, queue: str) -> Record:
        return Record(id=i, customer="x", worker=worker, warm=True, start=0, end=1, queue=queue)

    runs = [on("1", "a", "q0"), on("2", "b", "q0"), on("3", "b", "q1"), on("4", "a", "dist")]
    homes = {"q0": "a", "q1": "b"}  # "dist" (the default queue) has no home: never stolen
    stats = summarise("steal", runs, t0=0.0, slots=2, expected=["1", "2", "3", "4"], homes=homes)
    assert stats.stolen == 1
    assert summarise("shared", runs, t0=0.0, slots=2, expected=[]).stolen is None
    assert "1/3" in table([dataclasses.replace(stats, fleet_stolen=3)])
    assert " 1 " in table([dataclasses.replace(stats, fleet_stolen=1)])
    assert "/4" in table([dataclasses.replace(stats, stolen=None, fleet_stolen=4)])


def test_visibility_timeout_outlasts_the_longest_task(bench: ModuleType) -> None:
    assert bench.visibility_s(Workload()) == 5.0  # 0.8 s + 0.1 s warm-up: the floor
    long = Workload(light_s=1.0, heavy=10.0, warmup_s=0.5)
    assert bench.visibility_s(long) == pytest.approx(4 * 10.5)
