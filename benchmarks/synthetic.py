"""Synthetic-data likelihood benchmark (GitHub issue 6): first- vs high-order DSM on the paper's toys.

For each dataset (mog1d, checkerboard, swissroll) it trains, through the real CLI and the YAML in
``configs/`` (VE SDE, the paper's toy MLP, exact Jacobians, λ2 = 0.5, λ3 = 0.1, Adam 1e-3, clip 1):

* ``pre``  order-1 pre-training for N1 steps;
* ``o1``   resumed from ``pre`` (``trainer.fit(ckpt_path=...)``: weights, EMA, optimizer, step counter,
           data stream) with stages [{order: 1, steps: N1}, {order: 1}] up to N1 + N2 steps — the fair
           "more first-order steps" baseline (bit-identical to an uninterrupted order-1 run), and the
           reference of every paired comparison;
* ``s2``/``s3``  resumed from ``pre`` with stages [{order: 1, steps: N1}, {order: k}] (fine-tuning);
* ``r2``/``r3``  order 2 / order 3 from scratch for N1 + N2 steps (the reference toy protocol).

All runs share the seed, hence the initial weights and the stream of training batches and (t, z, v).
Resumed runs are parsed and built by the CLI (``main(args, run=False)``) and then fitted with
``ckpt_path``: ``cli.py fit --ckpt_path`` would re-read the model section from the checkpoint's saved
hyper-parameters (LightningCLI ``_parse_ckpt_path``) and silently train the old stages.
Each model is scored with the exact ODE NLL (exact divergence, dopri5, rtol = atol = 1e-5) of its
EMA weights on the datamodule's fixed test set. The paired column is the mean per-point difference
NLL(method) − NLL(o1) on the same test points with the s.e. of that difference.

Scale (default): batch 500, N1 = 1000, N2 = 300, EMA decay 0.99 (from step 100), 2000 test points,
one torch thread. The paper's toy runs use batch 5000 for 100k steps per method (5·10⁸ samples);
this is 6.5·10⁵ samples per method, 0.13 % of the paper's budget — a budget-matched comparison of
the objectives after short training, not a reproduction of converged toy models. Cost model from
per-step times measured on this project's 2 shared CPU cores (1 thread, batch 500, exact Jacobians:
order 1/2/3 ≈ 30/95/175 ms for 2-D data, 30/85/170 ms for 1-D): ≈ 480 s of training per 2-D
dataset and 450 s for mog1d; the exact 2-D NLL costs ≈ 0.1 s per solver evaluation of 2000 points
(NFE 130-200, so ≈ 15-20 s per model), the 40×40 density grids ≈ 35 s per 2-D dataset: ≈ 5 min of
evaluation, about 29 minutes in all (the output reports the measured times). ``--threads 2`` is
faster only on an idle machine: with other jobs on the cores, two OpenMP threads per process were
up to 10× slower per step.
``--quick`` is a smoke run (tiny steps, batches, test sets and rtol = atol = 1e-3; ≈ 40 s): its
numbers mean nothing.

    python benchmarks/synthetic.py [--datasets mog1d,checkerboard] [--out benchmarks/results] [--quick]

Outputs in ``--out``: ``synthetic.md`` (the table, also printed), ``fig1_mog1d.png`` (the paper's
Fig. 1: exact vs first- vs third-order ScoreODE density, full range + zoom on [−0.5, 0]),
``density_checkerboard.png`` and ``density_swissroll.png`` (order-1 vs order-3 heat maps).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic_runs import (  # noqa: E402
    DATASETS, ROOT, Scale, density_plots, fit, load_test_set, model_logp, quiet_lightning, summarize,
)

FULL = Scale(n1=1000, n2=300, batch=500, test_size=2000, rtol=1e-5, ema_decay=0.99, ema_start=100,
             grid_1d=401, grid_2d=40)
QUICK = Scale(n1=20, n2=10, batch=64, test_size=200, rtol=1e-3, ema_decay=0.9, ema_start=5, grid_1d=61, grid_2d=12)
PAPER_SAMPLES = 5000 * 100_000

METHODS = {  # key: (label, schedule template)
    "pre": ("order 1, pre-training only", "1×{n1}"),
    "o1": ("order 1 (baseline)", "1×{tot}"),
    "s2": ("order 1 → 2 (staged)", "1×{n1} → 2×{n2}"),
    "s3": ("order 1 → 3 (staged)", "1×{n1} → 3×{n2}"),
    "r2": ("order 2 from scratch", "2×{tot}"),
    "r3": ("order 3 from scratch", "3×{tot}"),
}


def log(msg: str) -> None:
    print(f"[synthetic {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train_all(dataset: str, scale: Scale, runs: Path) -> tuple[object, dict]:
    """Train the six models of a dataset; return (the pre-training cli, {key: (ckpt, train seconds)})."""
    n1, tot = scale.n1, scale.total
    cli, pre_ckpt, pre_s = fit(dataset, runs / dataset / "pretrain", scale, [{"order": 1}], n1)
    log(f"{dataset}: pre-training, order 1 × {n1} steps: {pre_s:.1f} s")
    out = {"pre": (pre_ckpt, pre_s)}
    for k in (1, 2, 3):
        _, ckpt, secs = fit(dataset, runs / dataset / f"staged{k}", scale,
                            [{"order": 1, "steps": n1}, {"order": k}], tot, resume_from=pre_ckpt)
        out["o1" if k == 1 else f"s{k}"] = (ckpt, pre_s + secs)
        log(f"{dataset}: resumed at step {n1}, order {k} to step {tot}: {secs:.1f} s")
    for k in (2, 3):
        _, ckpt, secs = fit(dataset, runs / dataset / f"scratch{k}", scale, [{"order": k}], tot)
        out[f"r{k}"] = (ckpt, secs)
        log(f"{dataset}: order {k} from scratch × {tot} steps: {secs:.1f} s")
    return cli, out


def run_dataset(dataset: str, scale: Scale, runs: Path, out: Path) -> tuple[list[dict], dict]:
    start = time.perf_counter()
    cli, trained = train_all(dataset, scale, runs)
    train_s = time.perf_counter() - start
    x = load_test_set(cli)
    entropy = cli.datamodule.entropy
    nll, stats = {}, {}
    for key, (ckpt, _) in trained.items():
        logp, nfe, secs = model_logp(cli, ckpt, x)
        nll[key], stats[key] = -logp, (nfe, secs)
        log(f"{dataset}: {key} test NLL {nll[key].mean():.4f} (NFE {nfe:.0f}, {secs:.1f} s)")
    rows = []
    for key, (label, sched) in METHODS.items():
        s = summarize(nll[key], None if key == "o1" else nll["o1"])
        rows.append({"dataset": dataset, "key": key, "method": label,
                     "schedule": sched.format(n1=scale.n1, n2=scale.n2, tot=scale.total),
                     "entropy": entropy, "nfe": stats[key][0], "eval_s": stats[key][1],
                     "train_s": trained[key][1], **s})
    eval_s = time.perf_counter() - start - train_s
    fig_start = time.perf_counter()
    means = {k: v.mean().item() for k, v in nll.items()}
    fig = density_plots(dataset, cli, {k: v[0] for k, v in trained.items()}, x, scale, out, means)
    log(f"{dataset}: wrote {fig} ({time.perf_counter() - fig_start:.1f} s)")
    return rows, {"train": train_s, "eval": eval_s, "figure": time.perf_counter() - fig_start}


def fmt_table(rows: list[dict]) -> str:
    lines = ["| dataset | method | order × steps | test NLL (nats) | ± s.e. | exact entropy | gap | "
             "Δ vs order-1 baseline, paired (± s.e.) | NFE | train s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ent = r["entropy"]
        ent_s, gap = ("n/a", "n/a") if ent is None else (f"{ent:.4f}", f"{r['mean'] - ent:+.4f}")
        paired = "(reference)" if "diff" not in r else f"{r['diff']:+.4f} ± {r['diff_se']:.4f}"
        lines.append(f"| {r['dataset']} | {r['method']} | {r['schedule']} | {r['mean']:.4f} | {r['se']:.4f} | "
                     f"{ent_s} | {gap} | {paired} | {r['nfe']:.0f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def report(rows, timing, scale: Scale, quick: bool, total_s: float, out: Path) -> str:
    samples = scale.batch * scale.total
    head = [
        "# Synthetic benchmark: first- vs high-order DSM, exact ScoreODE NLL" + (" (QUICK smoke run)" if quick else ""),
        "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}: {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads). Generated by `benchmarks/synthetic.py"
        + (" --quick`." if quick else "`."),
        "",
        f"Scale: batch {scale.batch}, N1 = {scale.n1} order-1 pre-training steps, N2 = {scale.n2} fine-tuning "
        f"steps (every method: {scale.total} steps, {samples:,} training samples = {100 * samples / PAPER_SAMPLES:.3g} % "
        "of the paper's toy budget of batch 5000 × 100k steps). EMA decay "
        f"{scale.ema_decay} from step {scale.ema_start}; VE SDE, toy MLP, exact Jacobians, λ2 = 0.5, λ3 = 0.1 "
        f"(configs/*.yaml). NLL: exact ODE likelihood of the EMA weights, dopri5 rtol = atol = {scale.rtol:g}, "
        f"on {scale.test_size} fixed test points per dataset.",
        "",
        "Staged runs resume the order-1 pre-training checkpoint at step N1 (weights, EMA, optimizer, step, data "
        "stream; stages [{order: 1, steps: N1}, {order: k}]), so 'order 1 (baseline)' is exactly an uninterrupted "
        "order-1 run; their train time includes the shared pre-training. The paired "
        "column is mean(NLL_method − NLL_baseline) over the same test points with the s.e. of the per-point "
        "difference; negative = better than spending the same steps on first-order DSM.",
        "",
        fmt_table(rows),
        "",
        "Times (s): " + "; ".join(f"{d}: train {t['train']:.0f}, eval {t['eval']:.0f}, figure {t['figure']:.0f}"
                                  for d, t in timing.items()) + f". Total wall time {total_s:.0f} s.",
        "",
        "Figures: " + ", ".join(f"`{p.name}`" for p in sorted(out.glob("*.png")) if p.stem in
                                {"fig1_mog1d", "density_checkerboard", "density_swissroll"}) + ".",
    ]
    if quick:
        head += ["", "QUICK mode: a few dozen steps and loose tolerances; the numbers only show that the pipeline runs."]
    return "\n".join(head) + "\n"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 90 s)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of " + ",".join(DATASETS))
    p.add_argument("--out", help="results folder (default benchmarks/results; runs/benchmark_synthetic_quick "
                                 "with --quick, so that a smoke run never overwrites the real results)")
    p.add_argument("--runs", default=None, help="checkpoints/TensorBoard folder (default runs/benchmark_synthetic, "
                                                "or <out>/runs with --quick)")
    p.add_argument("--n1", type=int, help="override the pre-training steps")
    p.add_argument("--n2", type=int, help="override the fine-tuning steps")
    p.add_argument("--batch", type=int, help="override the training batch size")
    p.add_argument("--test-size", type=int, help="override the number of test points")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see above)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if d not in DATASETS]
    if bad or not datasets:
        raise SystemExit(f"--datasets: unknown {bad}; choose from {list(DATASETS)}")
    scale = QUICK if args.quick else FULL
    for name, value in (("n1", args.n1), ("n2", args.n2), ("batch", args.batch), ("test_size", args.test_size)):
        if value is not None:
            if value <= 0:
                raise SystemExit(f"--{name.replace('_', '-')} must be positive")
            setattr(scale, name, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or (ROOT / "runs" / "benchmark_synthetic_quick" if args.quick else ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs) if args.runs else (out / "runs" if args.quick else ROOT / "runs" / "benchmark_synthetic")
    quiet_lightning()
    start, rows, timing = time.perf_counter(), [], {}
    for d in datasets:
        r, t = run_dataset(d, scale, runs, out)
        rows += r
        timing[d] = t
    text = report(rows, timing, scale, args.quick, time.perf_counter() - start, out)
    (out / "synthetic.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
