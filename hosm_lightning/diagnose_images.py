"""Per-noise-level diagnostics of image models, where no exact density is known: the DSM terms by σ.

For data without a closed-form q_t (real images) the score errors of docs/design.md §8 cannot be
computed, but the objectives that estimate them can. At ``num_times`` noise levels t_j (equally spaced
in log σ) every checkpoint's EMA network is scored on the same test images x₀ with the same noise z
and the same Rademacher probes v (Hutchinson estimates of the Jacobian terms):

    dsm1(t) = E‖σ s_θ(x_t, t) + z‖²,  dsm2(t), dsm3(t)  (docs/design.md §3, eq. 3.2–3.4; per sample)

Each term equals the matching error of its order plus a constant that does not depend on θ, so the
*paired* difference of two checkpoints at one σ is the difference of their score-matching errors
there: where a fine-tune gained or lost against its control. The points x₀ are the test images in the
model range, uniformly dequantized when the data module trains on dequantized data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from .checkpoints import load_weights
from .core.data_range import bytes_to_model
from .core.dequantization import dequantization_draws
from .core.diagnostics import sigma_grid
from .core.seeding import make_generator
from .core.stats import mean_se
from .data.sharding import batch_tensor
from .plots import save_figure
from .progress import Progress

__all__ = ["dsm_by_sigma", "image_points", "run_image_diagnose"]

TERMS = ("dsm1", "dsm2", "dsm3")


def image_points(datamodule, spec, n: int, seed: int) -> Tensor:
    """The first n test images in the model range (dequantized with a seeded draw if the module trains so)."""
    parts, have = [], 0
    for batch in datamodule.test_dataloader():
        x = batch_tensor(batch)
        parts.append(x)
        have += len(x)
        if have >= n:
            break
    k = torch.cat(parts)[:n]
    if k.dtype != torch.uint8:
        return k.float()
    if getattr(datamodule, "train_dequantization", "none") == "uniform":
        return dequantization_draws(k, centered=spec.centered, levels=spec.levels,
                                    generator=torch.Generator().manual_seed(seed))[0][0]
    return bytes_to_model(k, spec.centered, levels=spec.levels)


def dsm_by_sigma(model, x0: Tensor, times: Tensor, *, seed: int = 0, batch: int = 128) -> dict[str, np.ndarray]:
    """Per-sample dsm1/dsm2/dsm3 [T, N] of ``model`` (a HOSMModule) at the times ``times`` [T]; the noise
    and probes of (time j, batch b) come from a generator seeded by (seed, 'diagnose', j, b)."""
    out = {k: np.zeros((len(times), len(x0))) for k in TERMS}
    for j, t in enumerate(times.tolist()):
        for b, lo in enumerate(range(0, len(x0), batch)):
            x = x0[lo:lo + batch]
            g = make_generator(seed, "diagnose", j, b)
            tt = torch.full((len(x),), t, dtype=x.dtype)
            _, terms = model.objective(model.score_model, model.sde, x, 3, g, t=tt)
            for k, v in terms.terms().items():
                out[k][j, lo:lo + len(x)] = v.detach().double().numpy()
    return out


def _figure(sigma: np.ndarray, deltas: dict, title: str) -> Figure:
    fig = Figure(figsize=(12.0, 3.8), layout="constrained")
    for ax, term in zip(fig.subplots(1, 3), TERMS):
        for label, d in deltas.items():
            m, se = d[term]
            ax.plot(sigma, m, lw=1.5, label=label)
            ax.fill_between(sigma, m - 2 * se, m + 2 * se, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.axhline(0.0, color="gray", lw=0.6)
        ax.set_title(f"Δ {term} against the first checkpoint (± 2 s.e.)", fontsize=9)
        ax.set_xlabel("σ(t)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def run_image_diagnose(model, datamodule, spec, ckpts: list[str], labels: list[str], *, num_times: int,
                       num_points: int, seed: int, out: Path) -> dict:
    """dsm1–3 per σ of every checkpoint on the same test images, and their paired differences against the
    first checkpoint (the control); writes diagnose.json / diagnose.png, prints a table per σ."""
    model = model.eval()
    x0 = image_points(datamodule, spec, num_points, seed)
    times = sigma_grid(model.sde, model.sde.resolve_eps(model.objective.eps), num_times).to(torch.float32)
    sigma = model.sde.marginal(times.double())[1].numpy()
    values = {}
    with Progress(len(ckpts), "diagnose: checkpoints") as progress:
        for label, ckpt in zip(labels, ckpts):
            load_weights(model, ckpt)
            values[label] = dsm_by_sigma(model, x0, times, seed=seed)
            progress.update()
    base = labels[0]
    deltas = {label: {k: np.array([mean_se(torch.from_numpy(v[k][j] - values[base][k][j])) for j in range(len(times))]).T
                      for k in TERMS} for label, v in values.items() if label != base}
    result = {"checkpoints": dict(zip(labels, ckpts)), "sigma": sigma.tolist(), "n": len(x0),
              "terms": {label: {k: v[k].mean(1).tolist() for k in TERMS} for label, v in values.items()},
              "delta": {label: {k: {"mean": d[k][0].tolist(), "se": d[k][1].tolist()} for k in TERMS}
                        for label, d in deltas.items()}}
    if deltas:
        result["figure"] = str(save_figure(_figure(sigma, deltas, f"paired DSM terms per noise level ({len(x0)} "
                                                                  f"test images, Hutchinson probes)"), out / "diagnose.png"))
    (out / "diagnose.json").write_text(json.dumps(result, indent=1))
    _print(result, base)
    return result


def _print(result: dict, base: str) -> None:
    print(f"\npaired Δ of the DSM terms against {base} per σ (mean ± s.e. over {result['n']} test images):")
    labels = list(result["delta"])
    print("| σ | " + " | ".join(f"{lab} Δ{k}" for lab in labels for k in TERMS) + " |")
    print("|---" * (1 + 3 * len(labels)) + "|")
    for j, s in enumerate(result["sigma"]):
        cells = [f"{result['delta'][lab][k]['mean'][j]:+.4g} ± {result['delta'][lab][k]['se'][j]:.2g}"
                 for lab in labels for k in TERMS]
        print(f"| {s:.3g} | " + " | ".join(cells) + " |")
