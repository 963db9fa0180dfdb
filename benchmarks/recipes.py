"""Three published ways to raise a diffusion ODE's likelihood, compared on one protocol (VP SDE).

First-order recipes (each pre-trained from scratch to a first-order model, ``pre``):

* ``sigma2``: ε-parameterised DSM with the σ² weighting and uniform t (Lu et al. 2022's base);
* ``likelihood``: likelihood weighting λ = g² with importance-sampled t, p ∝ g²/σ² (ScoreFlow);
* ``velocity``: the velocity parameterisation v = a ε − σ x₀ with its own proposal (i-DODE).

From each pre-trained model's EMA weights (fresh Adam, step 0, the same data stream and draws), the
same number of steps of: the first-order recipe itself (``o1``, the control), second- and (1-D only)
third-order DSM (``dsm2``, ``dsm3``, the paper) and second-order flow matching (``fm2``, i-DODE's trace
form), every fine-tune keeping its base's weighting, proposal and parameterisation. Exact ODE
likelihood (dopri5, rtol = atol = 1e-5, exact divergence) of every EMA checkpoint on the same test
points: KL = mean(log q₀ − log p) (q₀ exact), Δ paired against the base's own control, and against
the paper's recipe (``sigma2`` → ``dsm2``). CPU seconds per step: one torch thread, two runs side by
side.

    python -m benchmarks.recipes [--jobs 2]      # → benchmarks/results/recipes.md, recipes.json
    python -m benchmarks.recipes --quick         # smoke run (numbers mean nothing)

Runs are cached by their exact spec under ``--runs`` (default runs/benchmark_recipes), so an
interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hosm_lightning.core import mean_se
from hosm_lightning.progress import Progress

from ._harness import markdown_table, worker_pool
from ._protocol import Run, exact_logq, model_logp, quiet, test_points
from .synthetic import pre_run, run_jobs, toy_setup

DATASETS = ("mog1d", "gmm2d")
BASES = {
    "sigma2": ("DSM, σ² weighting, uniform t (the paper's base)", {"sde": "vp"}),
    "likelihood": ("likelihood weighting, importance t (ScoreFlow)",
                   {"sde": "vp", "weighting": "likelihood", "time_proposal": "importance"}),
    "velocity": ("velocity parameterisation, its proposal (i-DODE)",
                 {"sde": "vp", "parameterization": "velocity", "weighting": "likelihood", "time_proposal": "velocity"}),
}
METHODS = {"o1": "order 1 (control)", "dsm2": "+ dsm2 (order 2)", "dsm3": "+ dsm3 (order 3)",
           "fm2": "+ fm2 (flow matching)"}
PAPER = ("sigma2", "dsm2")


@dataclass
class Scale:
    pre_steps: dict = field(default_factory=lambda: {"mog1d": 12000, "gmm2d": 8000})
    pre_save_every: int = 4000
    steps: int = 1000
    batch: int = 1000
    lr: float = 2e-4
    test_size: dict = field(default_factory=lambda: {"mog1d": 5000, "gmm2d": 2000})
    rtol: float = 1e-5
    dsm3_datasets: tuple = ("mog1d",)


QUICK = Scale(pre_steps={"mog1d": 30, "gmm2d": 30}, pre_save_every=15, steps=10, batch=64, test_size={"mog1d": 64, "gmm2d": 32}, rtol=1e-3)


def method_run(pre_ckpt: str, method: str, base_extra: dict, dim: int, scale: Scale) -> Run:
    """A fine-tune of ``method`` from a base's checkpoint. λ₂ = 0.5, λ₃ = 0.02 (the toy recipe of
    sweep.md) for DSM; fm2 with λ₂ = 1/D on its trace form: at small t, where a ≈ 1,
    λ₂ fm2 = D (a²+σ²)²/a² dsm2_tr / D ≈ dsm2_tr, the dsm2 recipe's weight on its trace part in 1-D."""
    extra = dict(base_extra)
    order, lambda2 = {"o1": 1, "dsm2": 2, "dsm3": 3, "fm2": 2}[method], 0.5
    if method == "fm2":
        extra.update(higher_order="flow", order2_form="trace")
        lambda2 = 1.0 / dim
    kw = {"divergence": "hutchinson", "probe_product": "vjp"} if dim == 1 and order == 3 else {}
    return Run(order=order, steps=scale.steps, lr=scale.lr, lambda2=lambda2, lambda3=0.02, ema_decay=0.995,
               ema_start=0, save_every=scale.steps, init_from=pre_ckpt, extra=extra, **kw)


def base_pre_run(dataset: str, base_extra: dict, scale: Scale) -> Run:
    """The synthetic benchmark's first-order pre-training run with a base's SDE, weighting and parameterisation."""
    return replace(pre_run(dataset, scale), extra=dict(base_extra))


def _evaluate(dataset: str, ckpt: str, run: dict, n: int, rtol: float) -> dict:
    """Exact log p of one checkpoint on the dataset's fixed test points (worker process)."""
    torch.set_num_threads(1)
    quiet()
    x = test_points(dataset, n)
    logp, nfe, secs = model_logp(dataset, Path(ckpt), x, rtol=rtol, run=Run(**run))
    return {"logp": logp.tolist(), "nfe": nfe, "seconds": secs}


def evaluate(jobs: dict, scale: Scale, workers: int) -> dict:
    """``jobs``: key → (dataset, ckpt, Run); log p of each on its test points."""
    out = {}
    with worker_pool(workers) as pool, \
            Progress(len(jobs), "evaluated checkpoints") as progress:
        futs = {pool.submit(_evaluate, d, str(c), asdict(r), scale.test_size[d], scale.rtol): k
                for k, (d, c, r) in jobs.items()}
        for f in as_completed(futs):
            out[futs[f]] = f.result()
            progress.update()
    return out


def _final(res: dict) -> str:
    return res["ckpts"][max(res["ckpts"])]


def run(datasets, scale: Scale, runs: Path, workers: int) -> dict:
    start = time.perf_counter()
    pre_jobs = {f"{d}/{b}/pre": (d, runs, base_pre_run(d, extra, scale)) for d in datasets for b, (_, extra) in BASES.items()}
    pre = run_jobs(pre_jobs, workers, scale.batch)
    jobs = {}
    for d in datasets:
        dim = 1 if d == "mog1d" else 2
        for b, (_, extra) in BASES.items():
            for m in METHODS:
                if m == "dsm3" and d not in scale.dsm3_datasets:
                    continue
                jobs[f"{d}/{b}/{m}"] = (d, runs, method_run(_final(pre[f"{d}/{b}/pre"]), m, extra, dim, scale))
    order = sorted(jobs, key=lambda k: -jobs[k][2].order)  # the longest (order 3) first
    trained = run_jobs({k: jobs[k] for k in order}, workers, scale.batch)
    train_s = time.perf_counter() - start
    evals = {k: (jobs[k][0], _final(trained[k]), jobs[k][2]) for k in jobs}
    for k, (d, _, r) in pre_jobs.items():  # the plateau check: every saved pre-training checkpoint
        for step, ckpt in pre[k]["ckpts"].items():
            evals[f"{k}@{step}"] = (d, ckpt, r)
    logps = evaluate(evals, scale, workers)
    return {"jobs": jobs, "trained": trained, "pre": pre, "logps": logps, "train_s": train_s,
            "total_s": time.perf_counter() - start}


def report(result: dict, datasets, scale: Scale, header: str) -> tuple[str, dict]:
    """The Markdown report and its JSON summary."""
    fmt = lambda m, se: f"{m:+.4f} ± {se:.4f}"  # noqa: E731
    fmt_kl = lambda m, se: f"{m:.4f} ± {se:.4f}"  # noqa: E731
    lines = [f"# Likelihood recipes compared: weighting, parameterisation, higher-order terms\n\n{header}\n",
             f"Protocol (benchmarks/recipes.py): VP SDE, the toy MLP; {', '.join(f'{v} ({k})' for k, v in scale.pre_steps.items())} first-order steps from scratch "
             f"per recipe (batch {scale.batch}, Adam 1e-3, EMA 0.999), then {scale.steps} steps of each method from "
             f"its EMA weights (lr {scale.lr:g}, EMA 0.995, same data and draws). Exact ODE likelihood on "
             f"{scale.test_size['mog1d']} (1-D) / {scale.test_size['gmm2d']} (2-D) fixed test points. KL = "
             "mean(log q₀ − log p); Δ = paired difference (negative = better). No setting was tuned on these points.\n"]
    summary = {}
    for d in datasets:
        logq = exact_logq(d, test_points(d, scale.test_size[d]))
        lp = lambda k: torch.tensor(result["logps"][k]["logp"], dtype=torch.float64)  # noqa: E731
        lines += [f"## {d}\n", "First-order pre-training (plateau check):\n"]
        rows = []
        for b in BASES:
            steps = sorted(result["pre"][f"{d}/{b}/pre"]["ckpts"])
            for s0, s1 in zip(steps[:-1], steps[1:]):
                kl = mean_se(logq - lp(f"{d}/{b}/pre@{s1}"))
                change = mean_se(lp(f"{d}/{b}/pre@{s0}") - lp(f"{d}/{b}/pre@{s1}"))
                rows.append([b, f"{s0} → {s1}", fmt_kl(*kl), fmt(*change)])
        lines += [markdown_table(["recipe", "steps", "KL ± s.e.", "change of KL (paired)"], rows), ""]
        rows = []
        paper = f"{d}/{PAPER[0]}/{PAPER[1]}"
        for k in result["jobs"]:
            if not k.startswith(d + "/"):
                continue
            _, b, m = k.split("/")
            kl = mean_se(logq - lp(k))
            ctrl = None if m == "o1" else mean_se(lp(f"{d}/{b}/o1") - lp(k))
            vs_paper = None if k == paper else mean_se(lp(paper) - lp(k))
            secs = result["trained"][k]["seconds"] / scale.steps
            summary[k] = {"kl": kl, "delta_control": ctrl, "delta_paper": vs_paper, "s_per_step": secs,
                          "nfe": result["logps"][k]["nfe"]}
            rows.append([BASES[b][0], METHODS[m], fmt_kl(*kl), "(control)" if ctrl is None else fmt(*ctrl),
                         "(paper)" if vs_paper is None else fmt(*vs_paper), f"{secs:.3f}",
                         f"{result['logps'][k]['nfe']:.0f}"])
        lines += ["Fine-tuning:\n", markdown_table(["first-order recipe", "method", "KL (nats) ± s.e.",
                                                   "Δ vs its control", "Δ vs the paper's recipe", "CPU s/step", "NFE"],
                                                  rows, "llrrrrr"), ""]
    lines.append(f"Training {result['train_s'] / 60:.1f} min, total {result['total_s'] / 60:.1f} min (wall).")
    return "\n".join(lines) + "\n", summary


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of " + ",".join(DATASETS))
    p.add_argument("--jobs", type=int, default=2, help="parallel processes (one torch thread each)")
    p.add_argument("--out", help="results folder (default benchmarks/results; runs/benchmark_recipes_quick with --quick)")
    p.add_argument("--runs", help="training runs (default runs/benchmark_recipes; <out>/runs with --quick)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse(argv)
    datasets, out, runs, header = toy_setup(args, DATASETS, "recipes")
    scale = QUICK if args.quick else Scale()
    result = run(datasets, scale, runs, args.jobs)
    text, summary = report(result, datasets, scale, header)
    (out / "recipes.md").write_text(text)
    (out / "recipes.json").write_text(json.dumps(summary, indent=1))
    print(text)
    return text


if __name__ == "__main__":
    main()
