"""The ``diagnose`` subcommand: per-noise-level score diagnostics of one or several checkpoints.

On images (no exact density) it reports the paired DSM terms per noise level instead
(:mod:`hosm_lightning.diagnose_images`).

For data with an exact density (a Gaussian mixture: ``mog1d`` or ``gmm``), every checkpoint's EMA
network is compared on x_t ~ q_t (exact draws) at ``num_times`` noise levels equally spaced in
log σ(t) (core/diagnostics.py, docs/design.md §8): the first-order error E g²‖s_θ − ∇log q_t‖², the
gap to the ODE model's own score E g²‖s_θ − ∇log p_t^ODE‖², the ODE Fisher divergence
E g²‖∇log p_t^ODE − ∇log q_t‖² and the KL integrand. Optionally both sides of the KL identity.
Writes ``diagnose.json`` and ``diagnose.png`` to the output folder, adds the figure to TensorBoard,
and prints a table of ½∫(KL integrand) dt per σ band.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .checkpoints import load_weights
from .core.diagnostics import kl_decomposition, score_report, sigma_grid
from .data.spec import describe
from .plots import diagnostics_figure, save_figure
from .progress import Progress

__all__ = ["run_diagnose", "band_integrals"]

BANDS = ((0.0, 0.1), (0.1, 1.0), (1.0, float("inf")))


def band_integrals(report: dict, bands=BANDS) -> list[float]:
    """½ ∫ (KL integrand) dt over σ bands, nats: trapezoid segments of the report's time grid, each
    assigned to the band of its midpoint σ (geometric mean of its end points)."""
    t, sig, k = (np.asarray(report[key]) for key in ("t", "sigma", "kl_integrand"))
    seg = 0.25 * (k[1:] + k[:-1]) * np.diff(t)
    mid = np.sqrt(sig[1:] * sig[:-1])
    return [float(seg[(mid >= lo) & (mid < hi)].sum()) for lo, hi in bands]


def _check(datamodule, ckpts, labels, num_times, num_points, identity_points):
    spec = describe(datamodule)
    if spec.mixture is None and not spec.is_image:
        raise ValueError("diagnose needs data with an exact density (a Gaussian mixture: data.init_args.name: "
                         "mog1d or gmm) or images (the DSM terms per noise level)")
    if not ckpts:
        raise ValueError("diagnose needs at least one checkpoint: --ckpt_path PATH [--compare PATH ...]")
    if labels is not None and len(labels) != len(ckpts):
        raise ValueError(f"--labels must name every checkpoint ({len(ckpts)}), got {len(labels)}")
    if num_times < 2 or num_points < 2 or identity_points < 0:
        raise ValueError("--num_times and --num_points must be >= 2 and --identity_points >= 0")
    return spec


def run_diagnose(model, datamodule, ckpts: list[str], labels: list[str] | None, *, num_times: int, num_points: int,
                 identity_points: int, rtol: float | None, seed: int, out: Path, loggers=()) -> dict:
    """Score reports (and optionally the KL identity) of each checkpoint; returns the JSON dict."""
    spec = _check(datamodule, ckpts, labels, num_times, num_points, identity_points)
    labels = labels or [Path(c).stem for c in ckpts]
    if spec.mixture is None:  # images: the paired DSM terms per σ
        from .diagnose_images import run_image_diagnose

        return run_image_diagnose(model, datamodule, spec, ckpts, labels, num_times=num_times,
                                  num_points=num_points, seed=seed, out=out)
    mixture = spec.mixture
    model = model.eval()
    ode = model.ode.replace(rtol=rtol, atol=rtol)  # the model's ODE options; --rtol sets rtol = atol
    eps = model.sde.resolve_eps(ode.eps)
    reports, identity = {}, {}
    with Progress(len(ckpts) * (2 if identity_points else 1), "diagnose: checkpoints × analyses") as progress:
        for label, ckpt in zip(labels, ckpts):
            load_weights(model, ckpt)
            times = sigma_grid(model.sde, eps, num_times)
            reports[label] = score_report(model.score_model, model.sde, mixture, times=times, n=num_points,
                                          generator=torch.Generator().manual_seed(seed), ode=ode)
            reports[label]["bands"] = band_integrals(reports[label])
            progress.update()
            if identity_points:
                identity[label] = kl_decomposition(model.score_model, model.sde, mixture, n=identity_points,
                                                   generator=torch.Generator().manual_seed(seed + 1), ode=ode)
                progress.update()
    fig = diagnostics_figure(reports, f"score diagnostics per noise level ({num_points} exact draws of x_t per σ)")
    png = save_figure(fig, out / "diagnose.png")
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("diagnose/scores", fig, global_step=0, close=False)
    result = {"checkpoints": dict(zip(labels, ckpts)), "reports": reports, "identity": identity,
              "bands": [list(b) for b in BANDS], "figure": str(png)}
    (out / "diagnose.json").write_text(json.dumps(result, indent=1, default=str))
    _print(reports, identity)
    return result


def _print(reports: dict, identity: dict) -> None:
    heads = [f"σ∈[{lo:g},{hi:g})" for lo, hi in BANDS]
    print("\n½∫ g² E[(s_θ − ∇log q)ᵀ(∇log p^ODE − ∇log q)] dt by noise band (nats):")
    print("| checkpoint | " + " | ".join(heads) + " | total |")
    print("|---" * (len(heads) + 2) + "|")
    for label, rep in reports.items():
        b = rep["bands"]
        print(f"| {label} | " + " | ".join(f"{v:+.4f}" for v in b) + f" | {sum(b):+.4f} |")
    if identity:
        print("\nKL identity: ODE-likelihood side vs score side (nats):")
        print("| checkpoint | KL (ODE) | KL (scores) | difference |")
        print("|---|---|---|---|")
        for label, r in identity.items():
            print(f"| {label} | {r['kl_ode']:.4f} ± {r['kl_ode_se']:.4f} | {r['kl_scores']:.4f} ± "
                  f"{r['kl_scores_se']:.4f} | {r['diff']:+.4f} ± {r['diff_se']:.4f} |")
