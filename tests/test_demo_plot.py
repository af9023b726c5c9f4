"""The demo's figure and table from two made-up runs: a herd that died, a fleet that did not.

The figure tests need matplotlib (the ``demo`` extra) and skip without it; the text tests
do not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness.demo import table
from benchmarks.harness.herd import RunResult
from benchmarks.harness.plot import title

MAX_IN_FLIGHT = 8


def fake_run(mode: str, completed: int, makespan_s: float, busy: int, bins_429: list[int]) -> Any:
    """A 60-agent RunResult over 12 s whose first bins carry ``bins_429`` 429s each."""
    n = 48
    bins = (bins_429 + [0] * n)[:n]
    return RunResult(
        mode=mode,
        agents=60,
        completed=completed,
        failed=60 - completed,
        requests=300,
        provider_429=sum(bins),
        provider_5xx=0,
        makespan_s=makespan_s,
        lower_bound_s=12.0,
        timeline=[(i * 0.25, busy if i < n - 4 else 0, bins[i]) for i in range(n)],
    )


PLAIN = fake_run("plain", 9, 4.68, 8, [30, 25, 20, 12, 9, 6, 4, 2])
FLEET = fake_run("fleet", 60, 12.6, 8, [])


def test_a_title_says_why_a_ratio_is_below_one() -> None:
    assert title(PLAIN).endswith("(0.39x lower bound: 51 agents died early, so less work was done)")
    assert title(FLEET).endswith("makespan 12.6 s (1.05x lower bound)")


def test_the_table_footnotes_a_ratio_that_failed_agents_skew() -> None:
    lines = table([PLAIN, FLEET]).splitlines()
    ratio_row = next(line for line in lines if line.startswith("makespan / lower bound"))
    assert ratio_row.split()[-2:] == ["0.39x*", "1.05x"]
    assert lines[-1] == (
        "* plain: 0.39x lower bound: 51 agents died early, so less work was done; "
        "below 1x is not faster than possible"
    )
    assert not any(line.startswith("* fleet") for line in lines)


@pytest.fixture
def fig() -> Iterator[Any]:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from benchmarks.harness.plot import figure

    made = figure([PLAIN, FLEET], MAX_IN_FLIGHT)
    made.canvas.draw()
    yield made
    plt.close(made)


def test_every_panel_uses_one_429_scale_and_one_in_flight_scale(fig: Any) -> None:
    twins = [ax for ax in fig.axes if ax.get_ylabel() == "429s"]
    in_flight = [ax for ax in fig.axes if ax.get_ylabel() == "in flight"]
    assert len(twins) == len(in_flight) == 2
    assert twins[0].get_ylim() == twins[1].get_ylim()
    assert twins[1].get_ylim()[1] >= 30  # the fleet's 429 axis is the herd's, not 0-1
    assert in_flight[0].get_ylim() == in_flight[1].get_ylim()


def test_the_legend_covers_no_panel(fig: Any) -> None:
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
            assert not box.overlaps(ax.title.get_window_extent(renderer)), ax.get_title()
    assert len(legends) == 1  # one for the figure, not one per panel
    labels = [text.get_text() for text in legends[0].get_texts()]
    assert labels == [
        "in flight at the provider",
        f"provider cap ({MAX_IN_FLIGHT})",
        "429s per 0.25 s",
    ]


def test_plot_runs_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.harness.plot import plot_runs

    path = plot_runs([PLAIN, FLEET], MAX_IN_FLIGHT, tmp_path / "herd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
