"""Matplotlib figures for densities and samples (no Lightning, no pyplot state).

Every function builds a :class:`matplotlib.figure.Figure` directly, which needs no GUI backend and
is never registered with pyplot, so figures are freed with their last reference. ``save_figure``
writes PNGs; ``image_grid`` turns image samples into a uint8 grid for TensorBoard's ``add_image``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from .core.data_range import model_to_unit

__all__ = [
    "density_figure_1d", "density_figure_2d", "samples_figure", "image_grid", "save_figure",
    "diagnostics_figure",
]

_MODEL, _EXACT, _DATA = "tab:blue", "black", "tab:orange"


def _np(x: Tensor | np.ndarray | None) -> np.ndarray | None:
    """Detached float64 CPU numpy copy (None passes through)."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _exp(logp: np.ndarray) -> np.ndarray:
    """exp(logp) with NaN mapped to 0 (-inf already gives 0)."""
    return np.nan_to_num(np.exp(logp), nan=0.0, posinf=0.0)


def _hist(ax, data: np.ndarray, lo: float, hi: float, nbins: int = 60) -> None:
    """Light histogram normalised by the *whole* sample (density=True over all data, also when zoomed)."""
    d = data.reshape(-1)
    d = d[np.isfinite(d)]
    if not d.size or not hi > lo:
        return
    edges = np.linspace(lo, hi, nbins + 1)
    counts, _ = np.histogram(d, edges)
    ax.stairs(counts / (d.size * (edges[1] - edges[0])), edges, fill=True, color=_DATA, alpha=0.3, label="data")


def _plot_1d(ax, grid, p_model, p_exact, data, xlim=None) -> None:
    lo, hi = xlim if xlim is not None else (float(grid.min()), float(grid.max()))
    if data is not None:
        _hist(ax, data, lo, hi)
    if p_exact is not None:
        ax.plot(grid, p_exact, color=_EXACT, lw=1.2, ls="--", label="exact")
    ax.plot(grid, p_model, color=_MODEL, lw=1.5, label="model")
    if xlim is not None:
        ax.set_xlim(*xlim)
        inside = (grid >= xlim[0]) & (grid <= xlim[1])
        top = max([float(p[inside].max()) for p in (p_model, p_exact) if p is not None and inside.any()] or [1.0])
        ax.set_ylim(0.0, 1.1 * top if top > 0 else 1.0)
    ax.set_xlabel("x")
    ax.set_ylabel("density")


def density_figure_1d(grid: Tensor, model_logp: Tensor, exact_logp: Tensor | None = None, data: Tensor | None = None,
                      zoom: tuple | None = (-0.5, 0.0), title: str | None = None) -> Figure:
    """Model density exp(logp) against the exact density on a 1-D grid, over a data histogram.

    Args:
        grid: [N] grid points; model_logp, exact_logp: [N] log densities in nats on the grid.
        data: optional samples ([M] or [M, 1]) shown as a light normalised histogram.
        zoom: (lo, hi) x-range of a second, zoomed panel (default: the paper's Fig. 1 region
            around x = -0.25); None for a single panel.
        title: optional figure title (e.g. NLL information).
    """
    g, pm = _np(grid).reshape(-1), _exp(_np(model_logp).reshape(-1))
    pe = None if exact_logp is None else _exp(_np(exact_logp).reshape(-1))
    d = _np(data)
    ncols = 1 if zoom is None else 2
    fig = Figure(figsize=(5.5 * ncols, 4.0), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    _plot_1d(axes[0], g, pm, pe, d)
    axes[0].set_xlim(float(g.min()), float(g.max()))
    axes[0].legend(loc="upper right", fontsize=8)
    if zoom is not None:
        _plot_1d(axes[1], g, pm, pe, d, xlim=(float(zoom[0]), float(zoom[1])))
        axes[1].set_title(f"zoom [{zoom[0]:g}, {zoom[1]:g}]", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def density_figure_2d(xs: Tensor, ys: Tensor, model_logp: Tensor, exact_logp: Tensor | None = None,
                      samples: Tensor | None = None, title: str | None = None) -> Figure:
    """Side-by-side heat maps of the model and exact densities, plus a sample scatter.

    Args:
        xs: [nx], ys: [ny] grid coordinates; model_logp, exact_logp: [ny, nx] log densities
            (row i is y = ys[i]).
        samples: optional [M, 2] points scattered in a third panel with the same limits.
    """
    x, y, pm = _np(xs).reshape(-1), _np(ys).reshape(-1), _exp(_np(model_logp))
    pe = None if exact_logp is None else _exp(_np(exact_logp))
    s = _np(samples)
    panels = [("model", pm)] + ([("exact", pe)] if pe is not None else [])
    n = len(panels) + (s is not None)
    fig = Figure(figsize=(4.0 * n, 4.0), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    # grid points are pixel centres: widen the extent by half a cell on each side
    hx = (x[-1] - x[0]) / (2 * (len(x) - 1)) if len(x) > 1 else 0.5
    hy = (y[-1] - y[0]) / (2 * (len(y) - 1)) if len(y) > 1 else 0.5
    extent = (x[0] - hx, x[-1] + hx, y[0] - hy, y[-1] + hy)
    for ax, (name, p) in zip(axes, panels):
        # own colour scale per panel: a poor model's density stays visible next to the exact one
        vmax = float(p.max()) or 1.0
        ax.imshow(p, origin="lower", extent=extent, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"{name} density (max {vmax:.3g})", fontsize=9)
    if s is not None:
        ax = axes[-1]
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5, color=_MODEL)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        outside = ~((s[:, 0] >= extent[0]) & (s[:, 0] <= extent[1]) & (s[:, 1] >= extent[2]) & (s[:, 1] <= extent[3]))
        ax.set_title(f"samples (n={len(s)}, {int(outside.sum())} outside view)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def samples_figure(samples: Tensor, data: Tensor | None = None, title: str | None = None) -> Figure:
    """Histogram (1-D, over the data's histogram) or scatter of the first two coordinates (D >= 2)."""
    s = _np(samples)
    s = s.reshape(len(s), -1)
    d = None if data is None else _np(data).reshape(len(data), -1)
    fig = Figure(figsize=(5.0, 4.0), layout="constrained")
    ax = fig.subplots()
    finite = np.isfinite(s).all(axis=1)
    s = s[finite]
    if s.shape[1] == 1:
        # the data (when given) sets the range, so that stray samples do not squash the histogram
        pts = s[:, 0] if d is None else d[:, 0]
        lo, hi = (float(pts.min()), float(pts.max())) if pts.size else (-1.0, 1.0)
        if d is not None:
            lo, hi = lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 81)
        if d is not None:
            ax.hist(d[:, 0], bins=bins, density=True, color=_DATA, alpha=0.35, label="data")
        if ((s[:, 0] >= bins[0]) & (s[:, 0] <= bins[-1])).any():  # density=True of an empty histogram is 0/0
            ax.hist(s[:, 0], bins=bins, density=True, histtype="step", color=_MODEL, lw=1.5, label="samples")
        ax.set_xlabel("x")
        ax.set_ylabel("density")
        ax.legend(loc="upper right", fontsize=8)
    else:
        if d is not None:
            ax.scatter(d[:, 0], d[:, 1], s=2, alpha=0.3, color=_DATA, label="data")
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5, color=_MODEL, label="samples")
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(loc="upper right", fontsize=8, markerscale=4)
    ax.set_title(title or f"ODE samples (n={len(s)}, non-finite dropped: {int((~finite).sum())})", fontsize=9)
    return fig


def image_grid(samples: Tensor, centered: bool, nrow: int = 8) -> Tensor:
    """uint8 grid [3, H', W'] of images [N, 3, H, W] in model range ([-1, 1] if centered, else [0, 1])."""
    from torchvision.utils import make_grid

    x = torch.nan_to_num(model_to_unit(samples.detach().float().cpu(), centered), nan=0.0).clamp(0.0, 1.0)
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=0.0)
    return (grid * 255).round().to(torch.uint8)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as an image (format from the suffix) at dpi 100, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


_CURVES = {"first_order": ("E g²‖s_θ − ∇log q_t‖²  (first-order error)", "-"),
           "self_gap": ("E g²‖s_θ − ∇log p_t^ODE‖²  (network vs its own ODE)", "--"),
           "fisher": ("E g²‖∇log p_t^ODE − ∇log q_t‖²  (ODE Fisher divergence)", ":"),
           "kl_integrand": ("E g²(s_θ − ∇log q_t)ᵀ(∇log p_t^ODE − ∇log q_t)  (KL integrand)", "-.")}
_COLORS = ["tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple"]


#: curves that are expectations of squared norms: their bands stop at 0 (on the symlog axis a band
#: reaching below 0 would plunge through the linear region into negative decades)
_NON_NEGATIVE = ("first_order", "self_gap", "fisher")


def diagnostics_figure(reports: dict, title: str) -> Figure:
    """Four panels (one per curve) against σ(t), one line per model; ``reports`` maps a model label to
    :func:`hosm_lightning.core.diagnostics.score_report` output. Shaded: ± 2 s.e., clipped at 0 for the
    non-negative curves."""
    fig = Figure(figsize=(12.0, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, (label, ls)) in zip(axes, _CURVES.items()):
        for color, (name, rep) in zip(_COLORS, reports.items()):
            sig, m, se = (np.asarray(rep[k]) for k in ("sigma", key, key + "_se"))
            ax.plot(sig, m, color=color, ls=ls, lw=1.5, label=name)
            lower = np.maximum(m - 2 * se, 0.0) if key in _NON_NEGATIVE else m - 2 * se
            ax.fill_between(sig, lower, m + 2 * se, color=color, alpha=0.15, lw=0)
        ax.set_xscale("log")
        if key != "kl_integrand":
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.axhline(0.0, color="gray", lw=0.6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("σ(t)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig
