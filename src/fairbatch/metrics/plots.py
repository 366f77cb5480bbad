"""PNG plots for reports. Uses matplotlib's object API with the Agg canvas: no pyplot,
no global backend switch, no display, safe in threads and headless CI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

_MARKERS = "osD^vP*Xh<>"


def _new(title: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(7.0, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    return fig, ax


def _save(fig: Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")
    return p


def plot_ttft_cdf(
    runs: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "TTFT distribution",
    *,
    slo: float | None = None,
    log_x: bool = True,
) -> Path:
    """Empirical CDF of TTFT (seconds) per run; log-x because TTFT tails span decades."""
    fig, ax = _new(title)
    for name, ttfts in runs.items():
        x = np.sort(np.asarray(ttfts, dtype=np.float64))
        if log_x:
            x = x[x > 0]
        if len(x) == 0:
            continue
        y = np.arange(1, len(x) + 1) / len(x)
        ax.step(x, y, where="post", label=f"{name} (n={len(x)})")
    if slo is not None:
        ax.axvline(slo, color="black", linestyle="--", linewidth=1, label=f"TTFT SLO {slo:g} s")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0.0, 1.01)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_metric_vs_rate(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str,
    ylabel: str,
    *,
    hline: float | None = None,
    hline_label: str | None = None,
    log_y: bool = False,
    percent: bool = False,
) -> Path:
    """One line per policy: metric against request rate (req/s), points sorted by rate."""
    fig, ax = _new(title)
    for i, (name, pts) in enumerate(curves.items()):
        if not pts:
            continue
        xy = np.asarray(sorted(pts), dtype=np.float64)
        ax.plot(xy[:, 0], xy[:, 1], marker=_MARKERS[i % len(_MARKERS)], label=name)
    if hline is not None:
        ax.axhline(hline, color="black", linestyle="--", linewidth=1,
                   label=hline_label or f"{hline:g}")
    if log_y:
        ax.set_yscale("log")
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_attainment_vs_rate(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    target: float = 0.9,
    title: str = "SLO attainment vs request rate",
    ylabel: str = "SLO attainment",
) -> Path:
    """Attainment (fraction) per policy against rate, with the capacity target line."""
    return plot_metric_vs_rate(
        curves, path, title, f"{ylabel} (% of requests)",
        hline=target, hline_label=f"target {target:.0%}", percent=True,
    )
