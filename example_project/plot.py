"""A PNG of provider-side in-flight requests and 429s over time, one panel per run.

matplotlib is imported here only (``pip install celery-fleet[demo]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .herd import RunResult


def plot_runs(runs: Sequence[RunResult], max_in_flight: int, path: Path) -> Path:
    """Write the figure to ``path`` and return it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise RuntimeError("the plot needs matplotlib: pip install 'celery-fleet[demo]'") from exc

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.8 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t = [p[0] for p in run.timeline]
        ax.step(
            t,
            [p[1] for p in run.timeline],
            where="post",
            color="tab:blue",
            label="in flight at the provider",
        )
        ax.axhline(
            max_in_flight,
            color="tab:blue",
            linestyle=":",
            linewidth=1,
            label=f"provider cap ({max_in_flight})",
        )
        ax.set_ylabel("in flight")
        ax.set_ylim(0, max(max_in_flight + 2, max((p[1] for p in run.timeline), default=0) + 1))
        twin = ax.twinx()
        twin.bar(
            t,
            [p[2] for p in run.timeline],
            width=0.25,
            align="edge",
            color="tab:red",
            alpha=0.5,
            label="429s per 0.25 s",
        )
        twin.set_ylabel("429s", color="tab:red")
        twin.set_ylim(0, max(1, max((p[2] for p in run.timeline), default=0)) * 1.1)
        ax.set_title(
            f"{run.mode}: {run.completed}/{run.agents} agents done, "
            f"{run.provider_429} provider 429s, makespan {run.makespan_s:.1f} s "
            f"({run.ratio:.2f}x lower bound)",
            fontsize=10,
        )
        lines = ax.get_legend_handles_labels()
        bars = twin.get_legend_handles_labels()
        ax.legend(lines[0] + bars[0], lines[1] + bars[1], loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the herd was fired")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
