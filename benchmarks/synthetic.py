"""Synthetic benchmark, the paper's protocol: fine-tune a *converged* first-order model.

Per dataset (mog1d, checkerboard, swissroll, gmm2d — a 2-D mixture with an exact density):

1. ``pre``: first-order DSM from scratch (batch 1000, Adam 1e-3, clip 1, EMA 0.999 from step 500)
   for N1 steps, evaluated every 2000 steps. Plateau criterion: the paired change of the test NLL
   over the last 2000 steps is below 0.01 nats or below 2 standard errors (reported per dataset).
2. From the EMA weights of ``pre`` (weights only: fresh Adam, step 0, the same data stream and
   (t, z, v) draws in every run), N2 more steps of: order 1 (the control: same steps, same
   optimizer), order 2, order 3 with exact derivatives and, on checkerboard and gmm2d, order 3 with
   the Hutchinson probe.
   Learning rate, λ₃ and N2 come from the recipe chosen by ``--sweep`` (benchmarks/results/sweep.json).
3. Exact ODE likelihood (dopri5, rtol = atol = 1e-5, exact divergence) of every EMA checkpoint on
   the same 5000 test points: NLL, the paired KL estimate mean(log q₀ − log p) where q₀ is exact,
   and the paired Δ against the control. Generation quality: the reverse KL E_{x∼p}[log p − log q₀]
   on 2000 ODE samples (same prior draws for every model; mixtures only). For the mixtures: the
   per-time score diagnostics (core/diagnostics.py) of control vs fine-tunes, and both sides of the
   KL identity (consistency of the whole likelihood stack).

``--sweep`` (run once; its table is committed) fine-tunes the converged mog1d model with orders
1/2/3 over learning rates {1e-4, 2e-4, 5e-4} and λ₃ ∈ {0.02, 0.1, 0.5}, evaluated after 250, 500
and 1000 steps, plus order 3 without gradient clipping; it logs the per-term gradient norms
‖∇_θ dsm_k‖ and picks the recipe (lr, λ₃, N2) with the lowest order-3 KL.

    python -m benchmarks.synthetic --sweep [--jobs 2]     # → benchmarks/results/sweep.md, sweep.json
    python -m benchmarks.synthetic [--jobs 2]             # → benchmarks/results/synthetic.md + figures
    python -m benchmarks.synthetic --quick                # CI smoke run (numbers mean nothing)

Training runs are cached under ``--runs`` (default runs/benchmark_synthetic) by their exact spec,
so an interrupted benchmark continues where it stopped. One torch thread per process. Progress with
an estimate of the time left goes to stderr (training weighted by steps, then the evaluations).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hosm_lightning.progress import Progress, format_duration

from . import ROOT
from ._protocol import Run, train_job
from ._harness import worker_pool

DATASETS = ("mog1d", "checkerboard", "swissroll", "gmm2d")
MIXTURES = ("mog1d", "gmm2d")
#: 2-D data with an exact density also get order 3 with the Hutchinson probe (budget: not swissroll)
HUTCHINSON_TOO = ("checkerboard", "gmm2d")


@dataclass
class Scale:
    pre_steps: dict = field(default_factory=lambda: {"mog1d": 8000, "checkerboard": 6000, "swissroll": 6000,
                                                     "gmm2d": 6000})
    pre_save_every: int = 2000
    batch: int = 1000
    test_size: int = 5000           # 1-D; 2-D datasets use test_size_2d (exact 2-D divergence costs 2 passes)
    test_size_2d: int = 2000
    rtol: float = 1e-5
    sample_n: int = 2000
    diag_times: int = 12
    diag_n: int = 200
    kl_n: int = 5000
    grid_1d: int = 401
    grid_2d: int = 40
    sweep_lrs: tuple = (1e-4, 2e-4, 5e-4)
    sweep_lambda3: tuple = (0.02, 0.1, 0.5)
    sweep_steps: int = 1000
    sweep_eval: tuple = (250, 500, 1000)
    sweep_test_size: int = 2500
    sweep_warmup: int = 200


QUICK = Scale(pre_steps={d: 40 for d in DATASETS}, pre_save_every=20, batch=64, test_size=200, test_size_2d=100, rtol=1e-3, sample_n=64, diag_times=3,
              diag_n=8, kl_n=64, grid_1d=41, grid_2d=8, sweep_lrs=(2e-4,), sweep_lambda3=(0.1,), sweep_steps=20,
              sweep_eval=(10, 20), sweep_test_size=100,
              sweep_warmup=5)


@dataclass
class Recipe:
    """The fine-tuning recipe: learning rate, λ₃, steps and EMA decay (λ₂ = 0.5 as the toy code)."""

    lr: float = 2e-4
    lambda3: float = 0.1
    steps: int = 1000
    ema_decay: float = 0.995
    warmup: int = 0


def run_jobs(jobs: dict, n_workers: int, batch: int) -> dict:
    """``jobs`` maps a key to (dataset, runs folder, Run); runs them on ``n_workers`` processes, with
    progress weighted by training steps."""
    total = sum(run.steps for _, _, run in jobs.values())
    with Progress(total, "training steps") as progress:
        if n_workers <= 1:
            out = {}
            for k, (d, r, run) in jobs.items():
                out[k] = train_job(d, str(r), asdict(run), batch)
                progress.update(run.steps)
            return out
        with worker_pool(n_workers) as pool:
            futs = {pool.submit(train_job, d, str(r), asdict(run), batch): k for k, (d, r, run) in jobs.items()}
            done = {}
            for f in as_completed(futs):
                k = futs[f]
                done[k] = f.result()
                progress.update(jobs[k][2].steps)
                progress.write(f"{k}: {'cached' if done[k]['cached'] else 'trained'} ({format_duration(done[k]['seconds'])})")
            return {k: done[k] for k in jobs}


def pre_run(dataset: str, scale: Scale) -> Run:
    n1 = scale.pre_steps[dataset]
    return Run(order=1, steps=n1, lr=1e-3, ema_decay=0.999, ema_start=min(500, n1 // 4), save_every=scale.pre_save_every)


#: 1-D order 3: the Hutchinson probe v = ±1 with Jᵀv (one reverse pass) gives exactly the exact-derivative
#: terms (J is 1×1, v² = 1) at about 60 % of the cost, so 1-D runs use it
ONE_D_ORDER3 = {"divergence": "hutchinson", "probe_product": "vjp"}


def finetune_run(pre_ckpt: str, order: int, recipe: Recipe, save_every: int = 250, **kw) -> Run:
    """λ₃ only matters for order 3 (kept at the default otherwise, so identical runs share a cache)."""
    extra = {**({"warmup": recipe.warmup} if recipe.warmup else {}), **kw.pop("extra", {})}
    return Run(order=order, steps=recipe.steps, lr=recipe.lr, lambda3=recipe.lambda3 if order == 3 else Run.lambda3,
               ema_decay=recipe.ema_decay, ema_start=0, save_every=save_every, init_from=str(pre_ckpt),
               grad_norm_every=25, extra=extra, **kw)


def pretrain(datasets, scale: Scale, runs: Path, workers: int) -> dict:
    jobs = {d: (d, runs, pre_run(d, scale)) for d in datasets}
    return run_jobs(jobs, workers, scale.batch)


# -- sweep ----------------------------------------------------------------------------------------
def sweep(scale: Scale, runs: Path, out: Path, workers: int) -> dict:
    from ._sweep import sweep_report

    pre = pretrain(["mog1d"], scale, runs, workers)["mog1d"]
    pre_ckpt = pre["ckpts"][max(pre["ckpts"])]
    base = Recipe(steps=scale.sweep_steps)
    every = scale.sweep_eval[0]
    jobs = {}
    for lr in scale.sweep_lrs:
        r = replace(base, lr=lr)
        jobs[("o1", lr, None, True)] = finetune_run(pre_ckpt, 1, r, every)
        jobs[("o2", lr, None, True)] = finetune_run(pre_ckpt, 2, r, every)
        jobs[("o3", lr, base.lambda3, True)] = finetune_run(pre_ckpt, 3, r, every, **ONE_D_ORDER3)
    mid = scale.sweep_lrs[len(scale.sweep_lrs) // 2]
    for lam in scale.sweep_lambda3:
        if lam != base.lambda3:
            jobs[("o3", mid, lam, True)] = finetune_run(pre_ckpt, 3, replace(base, lr=mid, lambda3=lam), every,
                                                        **ONE_D_ORDER3)
    jobs[("o3", mid, base.lambda3, False)] = finetune_run(pre_ckpt, 3, replace(base, lr=mid), every,
                                                          extra={"clip": None}, **ONE_D_ORDER3)
    # a linear learning-rate warmup (the paper's image recipe has one; its toy code has none), with its
    # own order-1 control
    warm = replace(base, lr=mid, warmup=scale.sweep_warmup)
    jobs[("o1", mid, None, "warmup")] = finetune_run(pre_ckpt, 1, warm, every)
    jobs[("o2", mid, None, "warmup")] = finetune_run(pre_ckpt, 2, warm, every)
    jobs[("o3", mid, base.lambda3, "warmup")] = finetune_run(pre_ckpt, 3, warm, every, **ONE_D_ORDER3)
    # longest first: better packing on the worker processes
    jobs = dict(sorted(jobs.items(), key=lambda kv: -int(kv[0][0][1])))
    names = {k: f"sweep_{k[0]}_lr{k[1]:g}" + (f"_l3{k[2]:g}" if k[2] is not None else "")
             + {True: "", False: "_noclip", "warmup": "_warmup"}[k[3]] for k in jobs}
    trained = run_jobs({names[k]: ("mog1d", runs, run) for k, run in jobs.items()}, workers, scale.batch)
    result = sweep_report({k: trained[names[k]] for k in jobs}, pre, scale, base, out, workers)
    return result


# -- main run -------------------------------------------------------------------------------------
def load_recipe(out: Path, scale: Scale, quick: bool) -> tuple[Recipe, str]:
    path = out / "sweep.json"
    if quick:
        return Recipe(steps=scale.sweep_steps), "quick defaults"
    if path.is_file():
        return Recipe(**json.loads(path.read_text())["recipe"]), f"chosen by --sweep ({path.name})"
    return Recipe(), "defaults (no sweep.json yet)"


def main_run(datasets, scale: Scale, runs: Path, out: Path, workers: int, quick: bool) -> str:
    from ._report import evaluate_dataset, main_report

    recipe, source = load_recipe(out, scale, quick)
    start = time.perf_counter()
    pre = pretrain(datasets, scale, runs, workers)
    jobs = {}
    for d in datasets:
        ckpt = pre[d]["ckpts"][max(pre[d]["ckpts"])]
        one_d = d == "mog1d"
        methods = {"o3": finetune_run(ckpt, 3, recipe, **(ONE_D_ORDER3 if one_d else {})),
                   "o2": finetune_run(ckpt, 2, recipe), "o1": finetune_run(ckpt, 1, recipe)}
        if d in HUTCHINSON_TOO:  # in 1-D the Hutchinson probe (v = ±1) gives exactly the exact terms
            methods["o3h"] = finetune_run(ckpt, 3, recipe, divergence="hutchinson")
        for m, run in methods.items():
            jobs[(d, m)] = (d, runs, run)
    order = sorted(jobs, key=lambda k: -int(k[1][1]))  # longest (order 3) first
    trained = run_jobs({f"{d}/{m}": jobs[(d, m)] for d, m in order}, workers, scale.batch)
    train_s = time.perf_counter() - start
    results = {}
    with worker_pool(workers) as pool, \
            Progress(len(datasets), "evaluated datasets") as progress:
        futs = {pool.submit(evaluate_dataset, d, pre[d], {m: trained[f"{d}/{m}"] for (dd, m) in jobs if dd == d},
                            asdict(scale), str(out)): d for d in datasets}
        for f in as_completed(futs):
            results[futs[f]] = f.result()
            progress.update()
    results = {d: results[d] for d in datasets}  # table order
    text = main_report(results, scale, recipe, source, quick, train_s, time.perf_counter() - start, out)
    return text


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (about a minute)")
    p.add_argument("--sweep", action="store_true", help="the fine-tuning recipe sweep on mog1d")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of " + ",".join(DATASETS))
    p.add_argument("--jobs", type=int, default=2, help="parallel training processes (one torch thread each)")
    p.add_argument("--out", help="results folder (default benchmarks/results; runs/benchmark_synthetic_quick "
                                 "with --quick, so that a smoke run never overwrites the real results)")
    p.add_argument("--runs", help="training runs (default runs/benchmark_synthetic, <out>/runs with --quick)")
    return p.parse_args(argv)


def toy_setup(args, choices, name: str) -> tuple[list, Path, Path, str]:
    """The data sets, results folder, runs folder and header line of a toy benchmark's command line
    (``--datasets``, ``--jobs``, ``--quick``, ``--out``, ``--runs``); one torch thread per process."""
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if d not in choices]
    if bad or not datasets:
        raise SystemExit(f"--datasets: unknown {bad}; choose from {list(choices)}")
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    torch.set_num_threads(1)
    out = Path(args.out or (ROOT / "runs" / f"benchmark_{name}_quick" if args.quick else ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs) if args.runs else (out / "runs" if args.quick else ROOT / "runs" / f"benchmark_{name}")
    header = (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}: {os.cpu_count()} CPU cores, "
              f"torch {torch.__version__}, {args.jobs} worker processes × 1 thread.")
    return datasets, out, runs, header


def main(argv=None) -> str:
    args = parse(argv)
    datasets, out, runs, header = toy_setup(args, DATASETS, "synthetic")
    scale = QUICK if args.quick else Scale()
    if args.sweep:
        text = sweep(scale, runs, out, args.jobs)["markdown"]
        text = text.replace("{HEADER}", header)
        (out / "sweep.md").write_text(text)
    else:
        text = main_run(datasets, scale, runs, out, args.jobs, args.quick).replace("{HEADER}", header)
        (out / "synthetic.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
