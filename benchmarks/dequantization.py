"""Bits/dim protocols on 8-bit data of known entropy.

Data: ``DiscreteDataModule`` (independent bytes; 1-D, 2-D and 3×8×8), two kinds with the same
bytes and P(k): ``discrete`` (q_0 = point masses at the bin centres) and ``smooth`` (q_0 = the
density before quantisation). The model is the probability-flow ODE of the VP SDE driven by the
**exact** score of q_t (no training), solved in float64 (dopri5, rtol = atol = 1e-6; exact divergence:
the score's Jacobian is diagonal, so a fixed probe v = 1 gives tr J). Reported in bits/dim:

* the exact entropy H and, per protocol, the mean bits/dim ± s.e. over data points and the paired
  gap to the exact −log₂ P(k)/D of the same points ± s.e. (every protocol must be ≥ 0 up to MC error);
* the truncated-normal bits/dim against eps ∈ [1e-6, 1e-2] for K = 1, 8, 64 (1-D; PNG);
* a toy-trained 3×8×8 model (SmallConvNet, first-order DSM through HOSMModule/Lightning, a few
  minutes on the CPU): uniform vs truncated-normal bits/dim of the same weights, through Lightning's
  test loop (``HOSMModule.test_step``: Hutchinson probes, per-sample seeds).

    python -m benchmarks.dequantization [--quick] [--out benchmarks/results] [--train-seconds 120]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from hosm_lightning.core import VPSDE, ODEOptions, bits_per_dim, mean_se, ode_log_likelihood
from hosm_lightning.data import DiscreteDataModule
from hosm_lightning.progress import Progress

from . import ROOT
from ._protocol import split_points

LN2 = math.log(2)
TOL = 1e-6
EPS = 1e-5
PROTOCOLS = (("uniform", 1), ("truncated_normal", 1), ("truncated_normal", 8))


def exact_score_bpd(dm, x, proto, k, eps, seed):
    """(bpd [B], nfe) of the ODE driven by the exact score of dm's q_t."""
    sde, dist = VPSDE(), dm.distribution
    score, nfe = dist.score_fn(sde), [0]

    def log_prob(y):
        y = y.double()
        if y[0].numel() <= 2:
            lik = ode_log_likelihood(score, sde, y, ODEOptions(eps=eps, rtol=TOL, atol=TOL, divergence="exact"))
        else:  # diagonal Jacobian: v = 1 gives the exact trace in one backward pass
            lik = ode_log_likelihood(score, sde, y, ODEOptions(eps=eps, rtol=TOL, atol=TOL, divergence="hutchinson"),
                                     v=torch.ones_like(y))
        nfe[0] += lik.nfe
        return lik.logp

    bound = bits_per_dim(log_prob, x, centered=True, dequantization=proto, num_importance=k, sde=sde, eps=eps,
                         generator=torch.Generator().manual_seed(seed))
    return bound.bpd, nfe[0]


def test_bytes(shape: str, kind: str, n: int) -> tuple[DiscreteDataModule, torch.Tensor]:
    """The data module and its n test points (uint8)."""
    dm = DiscreteDataModule(shape=shape, kind=kind, test_size=n)
    return dm, split_points(dm)


def protocol_table(sizes: dict) -> list[str]:
    rows = ["| data | kind | D | N | exact entropy | protocol | K | bits/dim ± s.e. | gap to exact −log₂P/D ± s.e. | NFE |",
            "|---|---|---:|---:|---:|---|---:|---|---|---:|"]
    with Progress(len(sizes) * 2 * len(PROTOCOLS), "dequantization: protocol table") as progress:
        for shape, n in sizes.items():
            for kind in ("discrete", "smooth"):
                dm, x = test_bytes(shape, kind, n)
                exact = -dm.distribution.log_prob_bytes(x) / (dm.dim * LN2)
                for proto, k in PROTOCOLS:
                    bpd, nfe = exact_score_bpd(dm, x, proto, k, EPS, seed=1)
                    m, se = mean_se(bpd)
                    g, gse = mean_se(bpd.double() - exact)
                    name = "uniform" if proto == "uniform" else "truncated normal"
                    rows.append(f"| {shape} | {kind} | {dm.dim} | {n} | {dm.entropy_bits:.4f} | {name} | {k} | "
                                f"{m:.4f} ± {se:.4f} | {g:+.5f} ± {gse:.5f} | {nfe} |")
                    print(rows[-1], flush=True)
                    progress.update()
    return rows


def eps_row(dm, x, eps: float, ks, exact_i, progress: Progress) -> tuple[list[str], dict]:
    """The cells of one eps (uniform, then truncated normal for each K) and the mean bits/dim per column."""
    cells, means = [], {}
    for k in ["uniform", *ks]:
        proto, kk = ("uniform", 1) if k == "uniform" else ("truncated_normal", k)
        bpd = exact_score_bpd(dm, x, proto, kk, eps, seed=2)[0]
        m, _ = mean_se(bpd)
        g, gse = mean_se(bpd.double() - exact_i)
        means[k] = m
        cells.append(f"{m:.4f} ({g:+.4f} ± {gse:.4f})")
        progress.update()
    return cells, means


def eps_curve(n: int, eps_list, ks, png: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["Cells: bits/dim (paired gap to the exact −log₂P of the same points ± s.e.).", "",
            "| kind | eps | uniform K=1 | " + " | ".join(f"TN K={k}" for k in ks) + " | exact −log₂P (same points) |",
            "|---|---|---|" + "---|" * len(ks) + "---|"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    with Progress(2 * len(eps_list) * (1 + len(ks)), "dequantization: eps curve") as progress:
        for ax, kind in zip(axes, ("discrete", "smooth")):
            dm, x = test_bytes("1d", kind, n)
            exact_i = -dm.distribution.log_prob_bytes(x) / LN2
            exact = exact_i.mean().item()
            curves = {k: [] for k in ["uniform", *ks]}
            for eps in eps_list:
                cells, means = eps_row(dm, x, eps, ks, exact_i, progress)
                for k, m in means.items():
                    curves[k].append(m)
                rows.append(f"| {kind} | {eps:.0e} | " + " | ".join(cells) + f" | {exact:.4f} |")
                print(rows[-1], flush=True)
            _plot_eps(ax, eps_list, curves, exact, kind, ks)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return rows


def _plot_eps(ax, eps_list, curves: dict, exact: float, kind: str, ks) -> None:
    for k, ys in curves.items():
        ax.plot(eps_list, ys, "o-", label="uniform" if k == "uniform" else f"truncated normal, K={k}")
    ax.axhline(exact, color="k", ls="--", lw=1, label="exact −log₂P (same points)")
    ax.set_xscale("log")
    ax.set_xlabel("eps")
    ax.set_ylabel("bits/dim")
    ax.set_title(f"1-D 8-bit data, {kind} kind, exact score (VP)")
    ax.set_ylim(exact - 0.05, max(max(curves[ks[0]]), exact + 0.2) + 0.1)
    ax.legend(fontsize=7)


def toy_trained(train_seconds: float, n_test: int, quick: bool) -> list[str]:
    """Train a SmallConvNet on 3×8×8 genuinely discrete data; uniform vs TN bits/dim of the same weights."""
    import lightning as L

    from hosm_lightning.lit.module import HOSMModule
    from hosm_lightning.nets import SmallConvNet
    from hosm_lightning.options import EvalOptions, FitOptions

    class TimeLimit(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if time.perf_counter() - start > train_seconds:
                trainer.should_stop = True

    L.seed_everything(0, verbose=False)
    dm = DiscreteDataModule(shape="image", kind="discrete", batch_size=64, eval_batch_size=n_test, test_size=n_test,
                            steps_per_epoch=100000)
    net = SmallConvNet(image_channels=3, image_size=8, channels=16 if quick else 48, depth=1 if quick else 3)
    model = HOSMModule(net, sde=VPSDE(), stages=[{"order": 1}], optimizer=lambda p: torch.optim.Adam(p, lr=2e-3),
                       fit=FitOptions(val_likelihood=False),
                       ode=ODEOptions(rtol=1e-3 if quick else 1e-4, atol=1e-3 if quick else 1e-4))
    trainer = L.Trainer(accelerator="cpu", max_steps=10 if quick else 10**6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[TimeLimit()])
    start = time.perf_counter()
    trainer.fit(model, dm)
    secs, steps = time.perf_counter() - start, trainer.global_step
    rows = [f"SmallConvNet (channels {net.blocks[0][2].in_channels}, depth {len(net.blocks)}), VP, first-order DSM, "
            f"{steps} steps of batch 64 in {secs:.0f} s; {n_test} test images, rtol = atol = {model.ode.rtol:g}, "
            "Hutchinson probe (one per image and importance sample); "
            f"exact entropy {dm.entropy_bits:.4f} bits/dim", "",
            "| protocol | K | bits/dim ± s.e. | gap to exact −log₂P/D ± s.e. | mean NFE | seconds |", "|---|---:|---|---|---:|---:|"]
    with Progress(2, "dequantization: toy-trained model, test runs") as progress:
        for k in (1, 4):
            model.evaluation = EvalOptions(dequantization=["uniform", "truncated_normal"], num_importance=k)
            trainer.test(model, dm, verbose=False)
            res = model.test_results
            for p, e in res["protocols"].items():
                rows.append(f"| {p.replace('_', ' ')} | {k} | {e['mean']:.4f} ± {e['se']:.4f} | {e['gap']:+.4f} ± "
                            f"{e['gap_se']:.4f} | {e['nfe']:.0f} | {res['seconds']:.0f} |")
                print(rows[-1], flush=True)
            progress.update()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--train-seconds", type=float, default=120.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = {"1d": 30, "2d": 16, "image": 2} if a.quick else {"1d": 1000, "2d": 500, "image": 32}
    eps_list = [1e-2, 1e-6] if a.quick else [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    ks = [1, 8] if a.quick else [1, 8, 32]
    head = ["# Bits/dim protocols on 8-bit data of known entropy", "",
            f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}, python {platform.python_version()}; "
            f"cpu, os.cpu_count()={os.cpu_count()}, {a.threads} thread(s){'; QUICK run' if a.quick else ''}",
            f"- VP SDE, eps = {EPS} (except the eps curve), data in [−1, 1]; model = PF-ODE of the exact score, "
            f"float64 dopri5 rtol = atol = {TOL}", ""]
    print("\n".join(head), flush=True)
    t1 = protocol_table(sizes)
    png = out / ("dequantization_eps_quick.png" if a.quick else "dequantization_eps.png")
    t2 = eps_curve(20 if a.quick else 200, eps_list, ks, png)
    t3 = toy_trained(5 if a.quick else a.train_seconds, 4 if a.quick else 64, a.quick)
    text = "\n".join(head + ["## Exact score, three shapes, two kinds", ""] + t1
                     + ["", f"## Truncated normal against eps (1-D, exact score); figure {png.name}", ""] + t2
                     + ["", "## A toy-trained 3×8×8 model: the same weights, both protocols", ""] + t3
                     + ["", f"total {time.perf_counter() - t0:.0f} s"])
    name = "dequantization_quick.md" if a.quick else "dequantization.md"
    (out / name).write_text(text + "\n")
    print(f"\nwrote {out / name} and {png} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
