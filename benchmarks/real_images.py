"""Real-image benchmark, the paper's protocol on scikit-learn's digits and scikit-image photograph patches.

Per data set (``_images.SETTINGS``; DDPM++ at nf 16 under the VP SDE, ε-prediction):

1. ``pre``: first-order DSM from scratch (batch 64, Adam 2e-3 after 200 warm-up steps, clip 1, the
   project's EMA 0.999 with its decay warm-up min(0.999, (1+n)/(10+n))) in chunks of ``--chunk`` steps. After each chunk the uniform bits/dim of the first
   ``--conv-points`` test points is evaluated (paired: same points, same noise); training stops once the
   change over the last quarter of training is below 0.01 bits/dim, or at ``--max-pre`` steps.
2. From the EMA weights of ``pre`` (weights only, fresh Adam at 2e-4, the same data stream and (t, z, v)
   draws; the EMA restarts from them): ``--finetune`` steps of order 1 (the control), order 2 and order 3 (Hutchinson probes),
   λ₂ = λ₃ = 1 as in the paper's image code, and second-order flow matching (``fm2``, i-DODE's trace form
   with λ₂ = 1/D: fm2 = D (a² + σ²)²/a² dsm2_tr, so at small t this is dsm2's weight on its trace part),
   and ScoreFlow's likelihood weighting with importance-sampled t as a fine-tune, alone (``lw1``) and with
   dsm2 (``lw2``); ``--finetunes`` picks a subset. No setting is tuned on the test points.
   ``--base velocity`` pre-trains and fine-tunes with i-DODE's velocity prediction and its likelihood-
   weighted proposal instead (its own folder runs/<data set>-velocity), every model paired against the
   ``--base sigma2`` run's order 2 on the same points.
3. Every model's EMA weights on the same test points: bits/dim under the uniform protocol (the paper's)
   and the truncated normal with K = 1 and K = 8 (``--k8-points`` points), dopri5 at rtol = atol =
   ``--rtol``; train bits/dim on as many training points; the paired Δ against the control with its s.e.,
   and of every other fine-tune against the paper's recipe (order 2).
4. Sample quality: FID and KID (torchmetrics) in the feature space of a small classifier trained on the
   training split (digit class, or source photograph), ``--samples`` ODE samples per model from the same
   prior draws; FID s.e. by bootstrap of the samples. Sample grids next to real images.
5. Reference rows on the same test images: a full-covariance Gaussian fitted to the training images and
   the lossless codecs PNG and WebP (hosm_lightning/baselines.py).

    python -m benchmarks.real_images                   # → benchmarks/results/real_images.md, .json, figures
    python -m benchmarks.real_images --quick           # CI smoke run (numbers mean nothing)
    python -m benchmarks.real_images --base velocity --finetunes order2 fm2   # → real_images_velocity.md

Every stage is cached under ``--runs`` (default runs/benchmark_real_images/<data set>/run-<hash of the
settings>): trained checkpoints, and every evaluated column in ``evals.json``; an interrupted run
continues where it stopped (a training stage from its last.ckpt), changed settings start a new folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from hosm_lightning.core.stats import mean_se
from hosm_lightning.progress import format_duration

from . import _images as im
from ._real_images_report import report, sample_figure

#: tag → (order, HOSMObjective fields); fm2's λ₂ is 1/D (set per data set in ``finetune_objective``)
LIKELIHOOD = {"weighting": "likelihood", "time_proposal": "importance"}
FINETUNES = {"control": (1, {}), "order2": (2, {}), "order3": (3, {}),
             "fm2": (2, {"higher_order": "flow", "order2_form": "trace"}),
             "lw1": (1, LIKELIHOOD), "lw2": (2, LIKELIHOOD)}
#: the paper's recipe, the reference of the "Δ vs the paper" column
PAPER = "order2"
BUDGET_KEYS = ("test_points", "conv_points", "k8_points", "min_pre", "max_pre", "chunk", "finetune", "samples",
               "batch")


def pretrain(name: str, runs: Path, args, cache: im.Cache, test: torch.Tensor, spec) -> dict:
    """First-order DSM in chunks until the paired test bits/dim moved < 0.01 over the last quarter."""
    root, history, step = runs / "pre", {}, 0
    points = test[: args.conv_points]
    while step < args.max_pre:
        step += args.chunk
        out = im.fit(name, root, steps=step, lr=args.pre_lr, warmup=min(200, step // 4), ema=args.ema,
                     batch=args.batch, save_every=args.chunk, device=args.device, quick=args.quick, base=args.base)
        seconds = out["seconds"]
        vals = cache.get(f"pre:{step}:conv:{len(points)}",
                         lambda: _bpd(im.load(name, out["ckpt"], spec, args.device, args.quick, args.base), points, "test", args))
        history[step] = float(torch.tensor(vals).mean())
        quarter = min(history, key=lambda s: abs(s - 0.75 * step))
        change = history[step] - history[quarter] if quarter != step else float("nan")
        print(f"[{name}] pre step {step}: conv bpd {history[step]:.4f} (change over last quarter {change:+.4f})",
              flush=True)
        if step >= args.min_pre and abs(change) < 0.01:
            break
    return {"ckpt": out["ckpt"], "steps": step, "history": history, "converged": abs(change) < 0.01,
            "last_quarter_change": change, "seconds": seconds}


def _bpd(model, images, split, args, protocol="uniform", k=1) -> list:
    return im.bpd(model, images, split=split, protocol=protocol, k=k, rtol=args.rtol)[0].tolist()


def evaluate(name: str, ckpt: Path, tag: str, cache: im.Cache, train: torch.Tensor, test: torch.Tensor, args,
             spec) -> dict:
    """The bits/dim columns of one checkpoint (its weights are loaded once, and only if a column is not cached)."""
    cols = {"uniform": ("test", test, "uniform", 1), "tn_k1": ("test", test, "truncated_normal", 1),
            "tn_k8": ("test", test[: args.k8_points], "truncated_normal", 8),
            "train_uniform": ("train", train, "uniform", 1)}
    out, model = {}, None

    def column(x, split, protocol, k) -> list:
        nonlocal model
        if model is None:
            model = im.load(name, ckpt, spec, args.device, args.quick, args.base)
        return _bpd(model, x, split, args, protocol, k)

    for col, (split, x, protocol, k) in cols.items():
        start = time.perf_counter()
        out[col] = torch.tensor(cache.get(f"{tag}:{col}:{len(x)}", lambda: column(x, split, protocol, k)),
                                dtype=torch.float64)
        print(f"[{name}] {tag} {col}: {float(out[col].mean()):.4f} bpd ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def quality(name: str, ckpts: dict, runs: Path, args, real_train: torch.Tensor, labels: torch.Tensor,
            real_val, cache: im.Cache, spec) -> tuple[dict, dict]:
    """FID/KID of every model against the training patches in a classifier's feature space; the samples."""
    from hosm_lightning.features import (FeatureExtractor, fid_standard_error, load_feature_net, sample_quality,
                                         save_feature_net, train_feature_net)

    levels = spec.levels
    path = runs / "feature_net.pt"
    if path.is_file():
        net, info = load_feature_net(path), json.loads((runs / "feature_net.json").read_text())
    else:
        net, info = train_feature_net(real_train, labels, levels=levels, steps=args.feature_steps, val=real_val,
                                      flip=name == "photos")
        save_feature_net(net, path)
        (runs / "feature_net.json").write_text(json.dumps(info))
    extractor, results, grids = FeatureExtractor(net), {}, {}
    for tag, ckpt in ckpts.items():
        file = runs / f"samples_{tag}.pt"
        if not file.is_file():
            torch.save(im.samples(im.load(name, ckpt, spec, args.device, args.quick, args.base), args.samples, rtol=args.rtol), file)
        fake = torch.load(file, weights_only=True)
        grids[tag] = fake[:64]
        q = cache.get(f"{tag}:quality:{args.samples}", lambda: {
            **sample_quality(real_train, fake, extractor, kid_subset_size=min(200, len(fake))),
            "fid_se": fid_standard_error(real_train, fake, extractor, n_boot=50)["se"]})
        results[tag] = q
    return {"models": results, "feature_net": info}, grids


def run_dataset(name: str, args) -> dict:
    start = time.perf_counter()
    if not args.quick:  # the data set's own evaluation budget (``_images.SETTINGS``)
        args = argparse.Namespace(**{**vars(args), **im.SETTINGS[name].get("budget", {})})
    runs = run_dir(name, args)
    cache = im.Cache(runs / "evals.json")
    dm = im.datamodule(name)
    dm.setup()
    test, _ = dm.split_images("test")
    train, train_labels = dm.split_images("train")
    val, val_labels = dm.split_images("val")
    g = torch.Generator().manual_seed(0)
    test = test[torch.randperm(len(test), generator=g)[: args.test_points]]
    train_eval = train[torch.randperm(len(train), generator=g)[: args.test_points]]
    spec = dm.data_spec()
    pre = pretrain(name, runs, args, cache, test, spec)
    ckpts, seconds = {}, {"pre": pre["seconds"]}
    dim = int(torch.tensor(test.shape[1:]).prod())
    for tag in ["control"] + [t for t in args.finetunes if t != "control"]:
        order, objective = FINETUNES[tag]
        if objective.get("higher_order") == "flow":
            objective = {**objective, "lambda2": 1.0 / dim}
        out = im.fit(name, runs / tag, steps=args.finetune, order=order, lr=args.ft_lr, ema=args.ema, batch=args.batch,
                     init_from=str(pre["ckpt"]), device=args.device, objective=objective, quick=args.quick,
                     base=args.base)
        ckpts[tag], seconds[tag] = out["ckpt"], out["seconds"]
        print(f"[{name}] fine-tune {tag}: {out['seconds']:.0f} s", flush=True)
    evals = {tag: evaluate(name, ckpt, tag, cache, train_eval, test, args, spec) for tag, ckpt in ckpts.items()}
    evals["pre"] = evaluate(name, pre["ckpt"], "pre", cache, train_eval, test, args, spec)
    rows, paper = {}, paper_evals(name, args, evals)
    for tag, cols in evals.items():
        rows[tag] = {col: dict(zip(("mean", "se"), mean_se(v))) for col, v in cols.items()}
        for col, v in cols.items():
            if tag != "control":
                rows[tag][col]["delta"], rows[tag][col]["delta_se"] = mean_se(v - evals["control"][col])
            if tag != "pre" and paper is not None and not (args.base == "sigma2" and tag in ("control", PAPER)):
                rows[tag][col]["delta_paper"], rows[tag][col]["delta_paper_se"] = mean_se(v - paper[col])
    refs = cache.get(f"references:{len(test)}", lambda: _references(train, test, dm.levels))
    sq, grids = quality(name, ckpts, runs, args, train, train_labels, (val, val_labels), cache, spec)
    shown = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:64]]
    figure = sample_figure(name if args.base == "sigma2" else f"{name}-{args.base}", grids, shown, Path(args.out),
                           dm.levels)
    diag = diagnostics(name, ckpts, dm, spec, runs, args)
    return {"name": name, "base": args.base, "val_classes_seen": set(val_labels.tolist()) <= set(train_labels.tolist()), "budget": {k: getattr(args, k) for k in BUDGET_KEYS}, "levels": dm.levels, "shape": list(test.shape[1:]), "n_test": len(test),
            "n_train_items": len(train), "pre": {k: v for k, v in pre.items() if k != "ckpt"}, "rows": rows,
            "references": refs, "quality": sq, "seconds": seconds, "figure": figure, "diagnostics": diag,
            "total_seconds": time.perf_counter() - start}


def diagnostics(name: str, ckpts: dict, dm, spec, runs: Path, args) -> dict:
    """Paired dsm1–3 per σ of the fine-tunes against the control on the test images (``diagnose`` on images)."""
    from hosm_lightning.diagnose_images import run_image_diagnose

    out = runs / "diagnose"
    if (out / "diagnose.json").is_file():
        return json.loads((out / "diagnose.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    n = min(args.test_points, 128)
    return run_image_diagnose(im.build_model(name, quick=args.quick, base=args.base), dm, spec, [str(c) for c in ckpts.values()],
                              list(ckpts), num_times=8, num_points=n, seed=0, out=out)


def run_dir(name: str, args) -> Path:
    """runs/<data set>[-<base>]/run-<hash of every setting that changes a number>: changed settings never reuse
    a stale stage; the same settings continue an interrupted run."""
    keep = {k: v for k, v in vars(args).items()
            if k not in ("runs", "out", "threads", "device", "datasets", "finetunes", "base")}
    spec = json.dumps({"data": im.SETTINGS[name]["data"], "net": im.net_settings(name, args.quick), "args": keep},
                      sort_keys=True)
    folder = name if args.base == "sigma2" else f"{name}-{args.base}"
    root = Path(args.runs) / folder / f"run-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.json").write_text(spec)
    return root


def paper_evals(name: str, args, evals: dict) -> dict | None:
    """The per-point columns of the paper's recipe (order 2 from the ε/σ² base) on the same points: this
    run's own, or those cached by the ``--base sigma2`` run of the same settings; None if not computed yet."""
    if PAPER in evals and args.base == "sigma2":
        return evals[PAPER]
    cached = im.Cache(run_dir(name, argparse.Namespace(**{**vars(args), "base": "sigma2"})) / "evals.json").data
    cols = {col: cached.get(f"{PAPER}:{col}:{len(v)}") for col, v in evals["control"].items()}
    if any(v is None for v in cols.values()):
        return None
    return {col: torch.tensor(v, dtype=torch.float64) for col, v in cols.items()}


def _references(train, test, levels) -> list:
    from hosm_lightning.baselines import reference_rows

    return [{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
            for r in reference_rows(train, test, levels=levels)]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=None, choices=list(im.SETTINGS),
                   help="default: digits photos (--quick: digits)")
    p.add_argument("--runs", default="runs/benchmark_real_images")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny steps and point counts")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=1000)
    p.add_argument("--min-pre", type=int, default=2000)
    p.add_argument("--max-pre", type=int, default=6000)
    p.add_argument("--pre-lr", type=float, default=2e-3)
    p.add_argument("--finetune", type=int, default=400)
    p.add_argument("--ft-lr", type=float, default=2e-4)
    p.add_argument("--finetunes", nargs="+", default=list(FINETUNES), choices=list(FINETUNES),
                   help="which fine-tunes to run (the control always runs); each has its own folder, so the "
                        "choice does not change the run folder")
    p.add_argument("--base", default="sigma2", choices=list(im.BASES),
                   help="the first-order recipe of the pre-training and of every fine-tune: sigma2 (ε-prediction, σ² "
                        "weighting, uniform t: the paper's) or velocity (i-DODE's velocity prediction with its "
                        "likelihood-weighted proposal); a non-default base has its own folder runs/<data set>-<base>")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (HOSMEMA: warmed up as min(decay, (1+n)/(10+n)))")
    p.add_argument("--test-points", type=int, default=256)
    p.add_argument("--conv-points", type=int, default=128)
    p.add_argument("--k8-points", type=int, default=64)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--feature-steps", type=int, default=600)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="the device of every stage: cpu or cuda")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = args.runs + "_quick"
        args.out = str(Path(args.runs) / "results")
        args.chunk, args.min_pre, args.max_pre, args.finetune = 4, 8, 8, 2
        args.test_points, args.conv_points, args.k8_points, args.samples, args.feature_steps = 8, 4, 2, 16, 20
        args.rtol = 1e-2
    args.datasets = args.datasets or (["digits"] if args.quick else ["digits", "photos"])
    if args.base != "sigma2" and {"lw1", "lw2"} & set(args.finetunes):
        p.error("--finetunes lw1/lw2 (likelihood weighting with importance t) fine-tune the sigma2 base; "
                f"--base {args.base} keeps its own weighting: leave them out")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    im.quiet()
    start = time.perf_counter()
    results = {name: run_dataset(name, args) for name in args.datasets}
    total = time.perf_counter() - start
    text = report(results, vars(args), total)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "real_images" if args.base == "sigma2" else f"real_images_{args.base}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "results": results, "seconds": total},
                                                     indent=1, default=str))
    print(text)
    print(f"total {format_duration(total)}; wrote {out / f'{stem}.md'}")
    return results


if __name__ == "__main__":
    main()
