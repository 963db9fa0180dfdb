"""Evaluation and the Markdown report of the main run of ``python -m benchmarks.synthetic``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from hosm_lightning.checkpoints import load_weights
from hosm_lightning.core import mean_se
from hosm_lightning.core.diagnostics import kl_decomposition, score_report, sigma_grid
from hosm_lightning.core.ode import seeded_prior
from hosm_lightning.diagnose import BANDS, band_integrals
from hosm_lightning.plots import diagnostics_figure, save_figure

from ._figures import figure_1d, figure_2d
from ._protocol import Run, build_model, datamodule, exact_logq, grad_norm_summary, model_logp, quiet, test_points

LABELS = {"o1": "order 1 (control)", "o2": "order 1 → 2", "o3": "order 1 → 3 (exact)",
          "o3h": "order 1 → 3 (Hutchinson)"}


def fmt_se(m: float, se: float, sign: bool = False) -> str:
    """'0.1234 ± 0.0012' (with ``sign``: '+0.1234 ± 0.0012')."""
    return (f"{m:+.4f}" if sign else f"{m:.4f}") + f" ± {se:.4f}"


def _eval_ckpt(dataset, ckpt, x, logq, rtol):
    logp, nfe, secs = model_logp(dataset, Path(ckpt), x, rtol=rtol)
    return {"logp": logp, "nfe": nfe, "seconds": secs,
            "kl": mean_se(logq - logp) if logq is not None else None, "nll": mean_se(-logp)}


# -- main run: one dataset ------------------------------------------------------------------------
def evaluate_dataset(dataset: str, pre: dict, trained: dict, scale: dict, out: str) -> dict:
    """Everything the main table and figures need for one dataset (runs in a worker process)."""
    torch.set_num_threads(1)
    quiet()
    out = Path(out)
    x = test_points(dataset, scale["test_size"] if dataset == "mog1d" else scale["test_size_2d"])
    logq = exact_logq(dataset, x)
    rtol = scale["rtol"]
    # plateau of the first-order pre-training
    steps = sorted(pre["ckpts"])
    pre_evals = {s: _eval_ckpt(dataset, pre["ckpts"][s], x, logq, rtol) for s in steps}
    plateau = []
    for a, b in zip(steps[:-1], steps[1:]):
        plateau.append({"from": a, "to": b, "nll": pre_evals[b]["nll"],
                        "delta": mean_se(pre_evals[a]["logp"] - pre_evals[b]["logp"])})
    trained = {m: trained[m] for m in LABELS if m in trained}  # control first, in table order
    evals = {m: _eval_ckpt(dataset, res["ckpts"][max(res["ckpts"])], x, logq, rtol) for m, res in trained.items()}
    ctrl = evals["o1"]["logp"]
    rows = []
    for m, ev in evals.items():
        rows.append({"method": m, "nll": ev["nll"], "kl": ev["kl"], "nfe": ev["nfe"],
                     "delta": None if m == "o1" else mean_se(ctrl - ev["logp"]), "train_s": trained[m]["seconds"],
                     "norms": grad_norm_summary(Path(trained[m]["log"]))})
    res = {"dataset": dataset, "rows": rows, "plateau": plateau, "entropy": datamodule(dataset, 16, 1, 16).entropy,
           "pre_steps": steps[-1], "pre_s": pre["seconds"]}
    ckpts = {m: r["ckpts"][max(r["ckpts"])] for m, r in trained.items()}
    if dataset in ("mog1d", "gmm2d"):
        res["reverse_kl"] = _reverse_kl(dataset, ckpts, scale)
        res.update(_diagnostics(dataset, ckpts, scale, out))
    res["figure"] = _density_figure(dataset, ckpts, x, scale, out, {m: e["nll"][0] for m, e in evals.items()})
    return res


def _model(ckpt, dim: int):
    """The toy model with a checkpoint's EMA weights, in eval mode."""
    model = build_model(dim, Run())
    load_weights(model, Path(ckpt))
    return model.eval()


def _reverse_kl(dataset: str, ckpts: dict, scale: dict) -> dict:
    """E_{x∼p}[log p(x) − log q₀(x)] on ODE samples; the same prior draws x_T for every model, so the
    difference to the control is paired over x_T."""
    dm = datamodule(dataset, 16, 1, 16)
    vals = {}
    for m, ckpt in ckpts.items():
        model = _model(ckpt, dm.dim)
        ode = model.ode.replace(rtol=scale["rtol"], atol=scale["rtol"], divergence="exact")
        x_T = seeded_prior(model.sde, range(scale["sample_n"]), (dm.dim,), 0, "reverse-kl")
        x = model.sample(x_T, ode).x
        logp = model.log_likelihood(x, None, ode).logp
        vals[m] = logp.double() - dm.mixture.log_prob(x.double())
    return {m: {"rev_kl": mean_se(v), "delta": None if m == "o1" else mean_se(v - vals["o1"])} for m, v in vals.items()}


def _diagnostics(dataset: str, ckpts: dict, scale: dict, out: Path) -> dict:
    """Per-time score curves (σ grid) of every model and both sides of the KL identity (control, o3)."""
    dm = datamodule(dataset, 16, 1, 16)
    reports, ident = {}, {}
    for m, ckpt in ckpts.items():
        if m not in ("o1", "o2", "o3") or (m == "o2" and dm.dim > 1):
            continue  # cost: the per-time report of the main comparison (order 1 vs 1 → 3; 1 → 2 in 1-D)
        model = _model(ckpt, dm.dim)
        ode = model.ode.replace(rtol=scale["rtol"], atol=scale["rtol"])
        times = sigma_grid(model.sde, model.sde.resolve_eps(ode.eps), scale["diag_times"])
        reports[LABELS[m]] = score_report(model.score_model, model.sde, dm.mixture, times=times, n=scale["diag_n"],
                                          generator=torch.Generator().manual_seed(5), ode=ode)
        if m in ("o1", "o3"):
            ident[m] = kl_decomposition(model.score_model, model.sde, dm.mixture, n=scale["kl_n"],
                                        generator=torch.Generator().manual_seed(6), ode=ode)
    fig = diagnostics_figure(reports, f"{dataset}: score diagnostics per noise level (mean ± 2 s.e., "
                                      f"{scale['diag_n']} exact draws of x_t per σ)")
    path = save_figure(fig, out / f"diagnostics_{dataset}.png")
    bands = {name: band_integrals(rep) for name, rep in reports.items()}
    return {"reports": reports, "identity": ident, "diag_figure": str(path), "bands": bands}


def _density_figure(dataset, ckpts, x, scale, out: Path, nll: dict) -> str:
    plot = {LABELS["o1"]: "o1", LABELS["o2"]: "o2", LABELS["o3"]: "o3"}
    if dataset == "mog1d":
        mix = datamodule("mog1d", 16, 1, 16).mixture
        grid = torch.linspace(-1.3, 1.3, scale["grid_1d"])[:, None]
        zoom = torch.linspace(-0.5, 0.0, max(scale["grid_1d"] // 2, 11))[:, None]
        full, part = {"exact": mix.log_prob(grid.double()).numpy()}, {"exact": mix.log_prob(zoom.double()).numpy()}
        for label, m in plot.items():
            full[label] = model_logp(dataset, Path(ckpts[m]), grid, rtol=scale["rtol"])[0].numpy()
            part[label] = model_logp(dataset, Path(ckpts[m]), zoom, rtol=scale["rtol"])[0].numpy()
        title = ("1-D mixture, converged order-1 model fine-tuned; test NLL "
                 + ", ".join(f"{v} {nll[v]:.3f}" for v in plot.values()) + f", entropy {mix.entropy():.3f}")
        return str(save_figure(figure_1d(grid[:, 0].numpy(), zoom[:, 0].numpy(), full, part, title),
                               out / "fig1_mog1d.png"))
    box, g = {"checkerboard": 4.5, "swissroll": 7.0, "gmm2d": 3.0}[dataset], scale["grid_2d"]
    xs = torch.linspace(-box, box, g)
    yy, xx = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([xx, yy], dim=-1).reshape(-1, 2)
    logq = exact_logq(dataset, pts)
    panels = {}
    if logq is not None:
        panels["exact"] = logq.exp().reshape(g, g).numpy()
    else:
        edges = np.linspace(-box - (xs[1] - xs[0]).item() / 2, box + (xs[1] - xs[0]).item() / 2, g + 1)
        hist, _, _ = np.histogram2d(x[:, 1].numpy(), x[:, 0].numpy(), bins=[edges, edges], density=True)
        panels[f"test data histogram (n={len(x)})"] = hist
    for label, m in plot.items():
        panels[f"{label}: NLL {nll[m]:.3f}"] = model_logp(dataset, Path(ckpts[m]), pts, rtol=scale["rtol"])[0].exp() \
            .reshape(g, g).numpy()
    return str(save_figure(figure_2d(xs.numpy(), panels, f"{dataset}: ODE density after fine-tuning (EMA weights)"),
                           out / f"density_{dataset}.png"))


# -- main report ----------------------------------------------------------------------------------
def main_report(results: dict, scale, recipe, source: str, quick: bool, train_s: float, total_s: float,
                out: Path) -> str:
    lines = ["# Synthetic benchmark: fine-tuning a converged first-order ScoreODE" + (" (QUICK smoke run)" if quick else ""),
             "", "{HEADER}", "",
             f"Protocol (benchmarks/synthetic.py): first-order DSM from scratch (batch {scale.batch}, Adam 1e-3, clip 1, "
             "EMA 0.999 from step 500), then from its EMA weights (fresh Adam, same data stream and (t, z, v) draws) "
             f"{recipe.steps} steps of each method at lr {recipe.lr:g}, λ₂ = 0.5, λ₃ = {recipe.lambda3:g}, EMA "
             f"{recipe.ema_decay} (recipe: {source}). VE SDE, the paper's toy MLP. Exact ODE likelihood of the EMA "
             f"weights (dopri5, rtol = atol = {scale.rtol:g}, exact divergence) on {scale.test_size} (1-D) or "
             f"{scale.test_size_2d} (2-D) fixed test points. "
             "KL = mean(log q₀ − log p) over the same points (where q₀ is exact); Δ = paired difference to the "
             "order-1 control (negative = better than spending the same steps on first-order DSM).", "",
             "## First-order pre-training plateau", "",
             "| dataset | steps | test NLL ± s.e. | change over the last interval (paired) | plateau? |",
             "|---|---|---|---|---|"]
    for d, r in results.items():
        for p in r["plateau"]:
            flat = abs(p["delta"][0]) < 0.01 or abs(p["delta"][0]) < 2 * p["delta"][1]
            lines.append(f"| {d} | {p['from']} → {p['to']} | {fmt_se(*p['nll'])} | {fmt_se(*p['delta'], sign=True)} | "
                         f"{'yes' if flat else 'no'} |")
    lines += ["", "## Fine-tuning: paired comparison against the order-1 control", "",
              "| dataset | method | test NLL ± s.e. | KL (nats) ± s.e. | Δ vs control ± s.e. | reverse KL on samples ± s.e. "
              "| Δ reverse KL ± s.e. | NFE | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for d, r in results.items():
        for row in r["rows"]:
            m = row["method"]
            kl = fmt_se(*row["kl"]) if row["kl"] else "n/a"
            delta = "(control)" if row["delta"] is None else fmt_se(*row["delta"], sign=True)
            rk = r.get("reverse_kl", {}).get(m)
            rks = fmt_se(*rk["rev_kl"]) if rk else "n/a"
            rkd = ("(control)" if rk["delta"] is None else fmt_se(*rk["delta"], sign=True)) if rk else "n/a"
            lines.append(f"| {d} | {LABELS[m]} | {fmt_se(*row['nll'])} | {kl} | {delta} | {rks} | {rkd} | "
                         f"{row['nfe']:.0f} | {row['train_s']:.0f} |")
    ent = {d: r["entropy"] for d, r in results.items() if r["entropy"] is not None}
    if ent:
        lines += ["", "Exact entropies (best possible NLL): " + ", ".join(f"{d} {v:.4f}" for d, v in ent.items()) + "."]
    lines += ["", "## Per-term gradient norms during fine-tuning (before clipping, logged every 25 steps)", "",
              "| dataset | method | ‖∇ total‖ mean / p90 | clipped | ‖∇ dsm1‖ | ‖∇ dsm2‖ | ‖∇ dsm3‖ mean / p90 |",
              "|---|---|---|---|---|---|---|"]
    for d, r in results.items():
        for row in r["rows"]:
            n = row["norms"]
            g = lambda k, f="mean": f"{n[k][f]:.3g}" if k in n else "—"  # noqa: E731
            clipped = f"{n['grad_norm']['clipped']:.0%}" if "grad_norm" in n else "—"
            lines.append(f"| {d} | {LABELS[row['method']]} | {g('grad_norm')} / {g('grad_norm', 'p90')} | {clipped} | "
                         f"{g('grad_norm_dsm1')} | {g('grad_norm_dsm2')} | {g('grad_norm_dsm3')} / "
                         f"{g('grad_norm_dsm3', 'p90')} |")
    for d, r in results.items():
        if "identity" not in r:
            continue
        lines += ["", f"## {d}: the KL identity and where in σ the likelihood is lost", "",
                  "Both sides of KL(q_eps‖p_eps^ODE) = KL(q_T‖π) + ½∫ g² E[(s_θ − ∇log q_t)ᵀ(∇log p_t^ODE − ∇log q_t)] dt "
                  f"({scale.kl_n} independent draws for each side):", "",
                  "| model | ODE likelihood side ± s.e. | score side ± s.e. | difference ± s.e. | within 3 s.e.? |",
                  "|---|---|---|---|---|"]
        for m, idt in r["identity"].items():
            ok = abs(idt["diff"]) <= 3 * idt["diff_se"]
            lines.append(f"| {LABELS[m]} | {fmt_se(idt['kl_ode'], idt['kl_ode_se'])} | "
                         f"{fmt_se(idt['kl_scores'], idt['kl_scores_se'])} | {fmt_se(idt['diff'], idt['diff_se'], sign=True)} "
                         f"| {'yes' if ok else 'no'} |")
        lines += ["", "½∫ of the KL integrand by noise band (trapezoid on the diagnostic grid, nats):", "",
                  "| model | " + " | ".join(f"σ ∈ [{lo:g}, {hi if hi < float('inf') else 'σ_max'}]" for lo, hi in BANDS) + " |",
                  "|---|" + "---|" * len(BANDS)]
        for name, vals in r["bands"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:+.4f}" for v in vals) + " |")
        lines += ["", f"Figure: `{Path(r['diag_figure']).name}`."]
    lines += ["", "Figures: " + ", ".join(f"`{Path(r['figure']).name}`" for r in results.values()) + ".", "",
              f"Wall time: training {train_s:.0f} s, total {total_s:.0f} s."]
    if quick:
        lines += ["", "QUICK mode: a few dozen steps and loose tolerances; the numbers only show that the pipeline runs."]
    (out / "synthetic.json").write_text(json.dumps(_jsonable(results), indent=1))
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return None
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
