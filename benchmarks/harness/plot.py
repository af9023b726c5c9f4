"""A PNG of provider-side in-flight requests and 429s over time, one panel per run.

Every panel uses the same scales (time, in flight, 429s per bin), so the runs compare at a
glance; one legend sits above the panels, outside the data.

matplotlib is imported here only (``pip install celery-fleet[demo]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .herd import RunResult

BIN_S = 0.25  # the width of a timeline bin (herd.timeline's step_s)


def plot_runs(runs: Sequence[RunResult], max_in_flight: int, path: Path) -> Path:
    """Write the figure to ``path`` and return it."""
    plt = _pyplot()
    fig = figure(runs, max_in_flight)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure(runs: Sequence[RunResult], max_in_flight: int) -> Any:
    """The matplotlib ``Figure`` :func:`plot_runs` writes (close it with ``plt.close``).

    Its axes are one in-flight axis per run, then one 429s twin per run (``fig.axes``
    order: in-flight axes first, then the twins as they were created).
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(
        len(runs),
        1,
        figsize=(9, 2.8 * len(runs) + 0.4),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    top_in_flight = max([max_in_flight + 2, *(p[1] + 1 for r in runs for p in r.timeline)])
    top_429 = max([1, *(p[2] for r in runs for p in r.timeline)]) * 1.1
    twins: list[Any] = []
    for ax, run in zip(axes[:, 0], runs, strict=True):
        twin = ax.twinx()
        if twins:
            twin.sharey(twins[0])
        twins.append(twin)
        _panel(ax, twin, run, max_in_flight)
        ax.set_ylim(0, top_in_flight)
        twin.set_ylim(0, top_429)
        twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("seconds since the herd was fired")
    lines, line_labels = axes[0, 0].get_legend_handles_labels()
    bars, bar_labels = twins[0].get_legend_handles_labels()
    fig.legend(
        lines + bars,
        line_labels + bar_labels,
        loc="outside upper center",
        ncols=len(lines + bars),
        fontsize=8,
        frameon=False,
    )
    return fig


def _panel(ax: Any, twin: Any, run: RunResult, max_in_flight: int) -> None:
    """Draw one run: in flight as a step line on ``ax``, 429s per bin as bars on ``twin``."""
    t = [p[0] for p in run.timeline]
    ax.step(
        t,
        [p[1] for p in run.timeline],
        where="post",
        color="tab:blue",
        label="in flight at the provider",
        zorder=3,
    )
    ax.axhline(
        max_in_flight,
        color="tab:blue",
        linestyle=":",
        linewidth=1,
        label=f"provider cap ({max_in_flight})",
    )
    ax.set_ylabel("in flight")
    twin.bar(
        t,
        [p[2] for p in run.timeline],
        width=BIN_S,
        align="edge",
        color="tab:red",
        alpha=0.5,
        label=f"429s per {BIN_S:g} s",
    )
    twin.set_ylabel("429s", color="tab:red")
    ax.set_zorder(twin.get_zorder() + 1)  # the in-flight line over the bars
    ax.patch.set_visible(False)
    ax.set_title(title(run), fontsize=10)


def title(run: RunResult) -> str:
    """A panel's title; when agents failed, a second line says why the ratio may be below 1x."""
    head = (
        f"{run.mode}: {run.completed}/{run.agents} agents done, "
        f"{run.provider_429} provider 429s, makespan {run.makespan_s:.1f} s"
    )
    if run.ratio_note:
        return f"{head}\n({run.ratio:.2f}x lower bound: {run.ratio_note})"
    return f"{head} ({run.ratio:.2f}x lower bound)"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise RuntimeError("the plot needs matplotlib: pip install 'celery-fleet[demo]'") from exc
    return plt
