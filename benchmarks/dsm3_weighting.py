"""Does weighting dsm3 down at large σ let third-order fine-tuning catch up with second order?

The follow-up named in the README ("Why order 3 lags"): the gradient of dsm3 grows like σ⁴ at large
noise, so the chosen recipe needs a tiny λ₃ (0.02) and order 3 stays behind order 2 on mog1d. Here
dsm3 of a sample at noise σ is weighted by w(σ) = min(1, (σ_c/σ)²) (``HOSMObjective.dsm3_sigma_cap``;
the minimiser at every t is unchanged). Protocol of ``synthetic.py``: from the same converged order-1
mog1d model (cached run), 1000 fine-tuning steps (lr 2e-4, clip 1, EMA 0.995, the same data stream and
(t, z, v) draws) per variant; exact ODE likelihood of the EMA weights on the same 5000 test points; KL =
mean of log q₀ − log p, Δ = paired difference to the order-1 control and to unweighted order 3.

    python -m benchmarks.dsm3_weighting [--jobs 2]      # → benchmarks/results/dsm3_weighting.md
    python -m benchmarks.dsm3_weighting --quick         # smoke run (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import datetime
import time
from dataclasses import replace
from pathlib import Path

import torch

from hosm_lightning.core import mean_se
from hosm_lightning.progress import Progress

from . import ROOT
from ._protocol import exact_logq, model_logp, test_points
from .synthetic import ONE_D_ORDER3, QUICK, Scale, finetune_run, load_recipe, pretrain, run_jobs

#: (label, λ₃, σ_c) of the third-order variants; σ_c None = the paper's unweighted objective
VARIANTS = [("order 3, λ₃ 0.02 (recipe)", 0.02, None), ("order 3, λ₃ 0.02, σ_c 1", 0.02, 1.0),
            ("order 3, λ₃ 0.1, σ_c 1", 0.1, 1.0), ("order 3, λ₃ 0.1, σ_c 0.1", 0.1, 0.1),
            ("order 3, λ₃ 0.5, σ_c 0.1", 0.5, 0.1)]


def train(recipe, scale: Scale, runs: Path, workers: int) -> tuple[dict, dict]:
    """The fine-tunes from the converged order-1 model: {label: Run} and {label: trained run}."""
    pre = pretrain(["mog1d"], scale, runs, workers)["mog1d"]
    ckpt = pre["ckpts"][max(pre["ckpts"])]
    jobs = {"order 1 (control)": finetune_run(ckpt, 1, recipe), "order 2": finetune_run(ckpt, 2, recipe)}
    for label, lam, cap in VARIANTS:
        extra = {"dsm3_sigma_cap": cap} if cap is not None else {}
        jobs[label] = finetune_run(ckpt, 3, replace(recipe, lambda3=lam), extra=extra, **ONE_D_ORDER3)
    return jobs, run_jobs({k: ("mog1d", runs, r) for k, r in jobs.items()}, workers, scale.batch)


def paired_kl(trained: dict, scale: Scale) -> dict:
    """Per test point log q₀ − log p of every fine-tune's EMA weights (the same points for all)."""
    x = test_points("mog1d", scale.test_size)
    logq = exact_logq("mog1d", x)
    kl = {}
    with Progress(len(trained), "dsm3_weighting: evaluated fine-tunes") as progress:
        for k, t in trained.items():
            kl[k] = logq - model_logp("mog1d", Path(t["ckpts"][max(t["ckpts"])]), x, rtol=scale.rtol)[0]
            progress.update()
    return kl


def table(kl: dict, trained: dict) -> list[str]:
    """KL ± s.e. per fine-tune and its paired differences to the control and to unweighted order 3."""
    base3 = VARIANTS[0][0]
    lines = ["| fine-tune | KL (nats) | Δ vs control | Δ vs unweighted order 3 | train s |", "|---|---|---|---|---|"]
    for k in kl:
        m, se = mean_se(kl[k])
        dc = "—" if k.startswith("order 1") else "{:+.4f} ± {:.4f}".format(*mean_se(kl[k] - kl["order 1 (control)"]))
        d3 = "—" if k in ("order 1 (control)", "order 2", base3) else "{:+.4f} ± {:.4f}".format(*mean_se(kl[k] - kl[base3]))
        lines.append(f"| {k} | {m:.4f} ± {se:.4f} | {dc} | {d3} | {trained[k]['seconds']:.0f} |")
    return lines


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", help="results folder (default benchmarks/results; runs/benchmark_dsm3_quick with --quick)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    scale = QUICK if a.quick else Scale()
    out = Path(a.out) if a.out else ROOT / ("runs/benchmark_dsm3_quick" if a.quick else "benchmarks/results")
    runs = out / "runs" if a.quick else ROOT / "runs" / "benchmark_synthetic"
    out.mkdir(parents=True, exist_ok=True)
    recipe, _ = load_recipe(ROOT / "benchmarks" / "results", scale, a.quick)
    start = time.perf_counter()
    jobs, trained = train(recipe, scale, runs, a.jobs)
    kl = paired_kl({k: trained[k] for k in jobs}, scale)
    lines = ["# Third-order DSM with dsm3 weighted down at large σ (mog1d)", "",
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}, 1 thread per process, {a.jobs} processes; "
             f"{recipe.steps} fine-tuning steps from the converged order-1 model, lr {recipe.lr:g}, "
             f"{scale.test_size} test points; w(σ) = min(1, (σ_c/σ)²) on dsm3. Total {time.perf_counter() - start:.0f} s.",
             "", *table(kl, trained)]
    text = "\n".join(lines) + "\n"
    (out / "dsm3_weighting.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
