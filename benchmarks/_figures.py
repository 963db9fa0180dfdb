"""Figures of ``benchmarks/synthetic.py``: the paper's Fig. 1 (1-D densities), 2-D heat maps and
the per-time score diagnostics (docs/design.md §8)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

_STYLE = {"exact": ("black", "--", 1.3), "order 1 (control)": ("tab:blue", "-", 1.6),
          "order 1 → 2": ("tab:orange", "-", 1.4), "order 1 → 3 (exact)": ("tab:red", "-", 1.6)}


def _plot_lines(ax, grid, curves: dict, xlim) -> None:
    for name, logp in curves.items():
        color, ls, lw = _STYLE.get(name, ("gray", "-", 1.0))
        ax.plot(grid, np.nan_to_num(np.exp(logp), nan=0.0), color=color, ls=ls, lw=lw, label=name)
    ax.set_xlim(*xlim)
    ax.set_xlabel("x")
    ax.set_ylabel("density")


def figure_1d(grid, zoom_grid, curves: dict, zoom_curves: dict, title: str) -> Figure:
    """The paper's Fig. 1: exact vs first- vs third-order ScoreODE density, full range + zoom."""
    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    ax_full, ax_zoom = fig.subplots(1, 2)
    _plot_lines(ax_full, grid, curves, (float(grid[0]), float(grid[-1])))
    ax_full.legend(loc="upper right", fontsize=8)
    _plot_lines(ax_zoom, zoom_grid, zoom_curves, (float(zoom_grid[0]), float(zoom_grid[-1])))
    ax_zoom.set_title(f"zoom x ∈ [{zoom_grid[0]:g}, {zoom_grid[-1]:g}] (narrow component at −2/7)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def figure_2d(xs, panels: dict, title: str) -> Figure:
    """Heat maps on one shared colour scale; ``panels`` maps a title to a [G, G] density array."""
    n = len(panels)
    fig = Figure(figsize=(3.8 * n, 3.9), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    h = (xs[-1] - xs[0]) / (2 * (len(xs) - 1))
    extent = (xs[0] - h, xs[-1] + h, xs[0] - h, xs[-1] + h)
    # shared scale up to the largest 99.5th percentile: one spiky panel does not wash out the others
    vmax = max(float(np.nanpercentile(p, 99.5)) for p in panels.values()) or 1.0
    for ax, (name, p) in zip(axes, panels.items()):
        ax.imshow(np.nan_to_num(p), origin="lower", extent=extent, cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig
