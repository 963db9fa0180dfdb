"""The recipe sweep of ``python -m benchmarks.synthetic --sweep``: evaluate every fine-tune of the
converged 1-D model (paired KL on fixed test points), pick the recipe, and report where in σ the
per-term gradients come from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hosm_lightning.checkpoints import load_weights
from hosm_lightning.core import HOSMObjective, mean_se
from hosm_lightning.core.diagnostics import sigma_grid
from hosm_lightning.progress import Progress

from ._harness import worker_pool
from ._protocol import Run, build_model, datamodule, exact_logq, grad_norm_summary, model_logp, quiet, test_points
from ._report import fmt_se


def logp_job(dataset: str, ckpt: str, n: int, rtol: float) -> torch.Tensor:
    """Worker: exact ODE log p of a checkpoint's EMA weights on the first n fixed test points."""
    torch.set_num_threads(1)
    quiet()
    return model_logp(dataset, Path(ckpt), test_points(dataset, n), rtol=rtol)[0]


def _evaluate(todo: dict, n: int, rtol: float, workers: int) -> dict:
    """log p [n] of every checkpoint in ``todo`` (key → path), on ``workers`` processes."""
    with worker_pool(workers) as pool, \
            Progress(len(todo), "sweep: evaluated checkpoints") as progress:
        futs = {k: pool.submit(logp_job, "mog1d", str(c), n, rtol) for k, c in todo.items()}
        logp = {}
        for k, f in futs.items():
            logp[k] = f.result()
            progress.update()
    return logp


def sweep_report(trained: dict, pre: dict, scale, base, out: Path, workers: int = 1) -> dict:
    """Evaluate every sweep checkpoint (paired KL on the test points) and pick the recipe."""
    quiet()
    n = scale.sweep_test_size
    x = test_points("mog1d", n)
    logq = exact_logq("mog1d", x)
    todo = {("pre", None): pre["ckpts"][max(pre["ckpts"])]}
    todo.update({(key, step): res["ckpts"][step] for key, res in trained.items() for step in scale.sweep_eval})
    logp = _evaluate(todo, n, scale.rtol, workers)
    pre_eval = {"kl": mean_se(logq - logp[("pre", None)]), "nll": mean_se(-logp[("pre", None)])}
    rows = []
    for (order, lr, lam, clip), res in trained.items():
        norms = grad_norm_summary(Path(res["log"]))
        for step in scale.sweep_eval:
            lp = logp[((order, lr, lam, clip), step)]
            ctrl = logp[(("o1", lr, None, "warmup" if clip == "warmup" else True), step)]  # same optimizer settings
            d = mean_se(ctrl - lp) if order != "o1" else None  # Δ KL = log p_ctrl − log p
            rows.append({"order": order, "lr": lr, "lambda3": lam, "clip": clip, "steps": step,
                         "kl": mean_se(logq - lp), "delta": d, "norms": norms if step == scale.sweep_eval[-1] else None,
                         "seconds": res["seconds"]})
    o3 = [r for r in rows if r["order"] == "o3" and r["clip"]]  # clipped runs (with or without warmup)
    best = min(o3, key=lambda r: r["kl"][0])
    recipe = {"lr": best["lr"], "lambda3": best["lambda3"], "steps": best["steps"], "ema_decay": base.ema_decay,
              "warmup": scale.sweep_warmup if best["clip"] == "warmup" else 0}
    (out / "sweep.json").write_text(json.dumps({"recipe": recipe, "rows": [
        {k: v for k, v in r.items() if k != "norms"} for r in rows]}, indent=1))
    by_sigma = grad_norm_by_sigma(pre["ckpts"][max(pre["ckpts"])], repeats=3 if scale.sweep_steps > 100 else 1,
                                  batch=1000 if scale.sweep_steps > 100 else 64)
    md = _sweep_markdown(rows, pre_eval, recipe, scale, by_sigma)
    return {"markdown": md, "recipe": recipe, "rows": rows, "by_sigma": by_sigma}


def grad_norm_by_sigma(ckpt, num_sigmas: int = 8, batch: int = 1000, repeats: int = 3) -> list[dict]:
    """‖∇_θ dsm_k‖ (unweighted, k = 1, 2, 3) of a checkpoint's EMA network at fixed noise levels:
    which t the third-order gradient comes from. Mean and max over ``repeats`` batches per σ."""
    model = build_model(1, Run())
    load_weights(model, Path(ckpt))
    dm = datamodule("mog1d", batch, 1, 16)
    params = [p for p in model.parameters() if p.requires_grad]
    objective = HOSMObjective(divergence="hutchinson", probe_product="vjp")
    times = sigma_grid(model.sde, model.sde.resolve_eps(model.objective.eps), num_sigmas)
    out = []
    for i, t in enumerate(times.tolist()):
        norms = {k: [] for k in ("dsm1", "dsm2", "dsm3")}
        for r in range(repeats):
            g = torch.Generator().manual_seed(1000 * i + r)
            x0 = dm.sample(batch, g)
            terms = objective(model.score_model, model.sde, x0, 3, g, t=torch.full((batch,), t))[1].terms()
            for k in norms:
                grads = torch.autograd.grad(terms[k].mean(), params, retain_graph=True, allow_unused=True)
                norms[k].append(float(torch.stack([gr.norm() for gr in grads if gr is not None]).norm()))
        sigma = float(model.sde.marginal(torch.tensor([t]))[1])
        out.append({"t": t, "sigma": sigma, "batch": batch, "repeats": repeats,
                    **{k: (float(np.mean(v)), float(np.max(v))) for k, v in norms.items()}})
    return out


def _variant(clip, scale) -> str:
    return {True: "1.0", False: "none", "warmup": f"1.0 + warmup {scale.sweep_warmup}"}[clip]


def _sweep_markdown(rows, pre_eval, recipe, scale, by_sigma=None) -> str:
    lines = ["# Fine-tuning recipe sweep on the 1-D mixture (python -m benchmarks.synthetic --sweep)", "", "{HEADER}", "",
             f"Converged first-order model: {scale.pre_steps['mog1d']} steps (batch {scale.batch}); its paired test "
             f"KL = {fmt_se(*pre_eval['kl'])} nats (NLL {fmt_se(*pre_eval['nll'])}). Every fine-tune starts from its EMA "
             "weights with a fresh Adam, EMA 0.995 from step 0, λ₂ = 0.5, global-norm clip 1 (unless 'none'), no "
             f"learning-rate warmup (unless '+ warmup {scale.sweep_warmup}': linear over that many steps), the same data "
             f"stream and (t, z, v) draws. KL: mean over the same {scale.sweep_test_size} test points of log q₀ − log p "
             "(nats); Δ: paired difference to order 1 at the same learning rate and length (negative = better).", "",
             "| order | lr | λ₃ | clip | steps | KL (nats) ± s.e. | Δ vs order 1 ± s.e. |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lam = "—" if r["lambda3"] is None else f"{r['lambda3']:g}"
        d = "(control)" if r["delta"] is None else fmt_se(*r["delta"], sign=True)
        lines.append(f"| {r['order'][1]} | {r['lr']:g} | {lam} | {_variant(r['clip'], scale)} | {r['steps']} | "
                     f"{fmt_se(*r['kl'])} | {d} |")
    lines += ["", "Per-term gradient norms over the whole fine-tune (logged every 25 steps, before clipping; "
              "`clipped` = share of logged steps whose total norm exceeded the clip norm 1.0):", "",
              "| order | lr | λ₃ | clip | ‖∇ total‖ mean / p90 | clipped | ‖∇ dsm1‖ mean | ‖∇ dsm2‖ mean | ‖∇ dsm3‖ mean / p90 | "
              "train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["norms"]
        if not n:
            continue
        get = lambda k, f="mean": f"{n[k][f]:.3g}" if k in n else "—"  # noqa: E731
        lam = "—" if r["lambda3"] is None else f"{r['lambda3']:g}"
        lines.append(f"| {r['order'][1]} | {r['lr']:g} | {lam} | {_variant(r['clip'], scale)} | "
                     f"{get('grad_norm')} / {get('grad_norm', 'p90')} | "
                     f"{n['grad_norm']['clipped'] if 'grad_norm' in n else float('nan'):.0%} | "
                     f"{get('grad_norm_dsm1')} | {get('grad_norm_dsm2')} | {get('grad_norm_dsm3')} / "
                     f"{get('grad_norm_dsm3', 'p90')} | {r['seconds']:.0f} |")
    if by_sigma:
        lines += ["", "Where the third-order gradient comes from: ‖∇_θ dsm_k‖ (unweighted) of the converged order-1 "
                  f"model at fixed noise levels (mean / max over {by_sigma[0].get('repeats', 3)} batches of "
                  f"{by_sigma[0].get('batch', 1000)}):", "",
                  "| σ(t) | ‖∇ dsm1‖ | ‖∇ dsm2‖ | ‖∇ dsm3‖ mean / max |", "|---|---|---|---|"]
        for r in by_sigma:
            lines.append(f"| {r['sigma']:.3g} | {r['dsm1'][0]:.3g} | {r['dsm2'][0]:.3g} | {r['dsm3'][0]:.3g} / "
                         f"{r['dsm3'][1]:.3g} |")
    lines += ["", f"**Chosen recipe** (lowest order-3 KL with clipping): lr {recipe['lr']:g}, λ₃ {recipe['lambda3']:g}, "
              f"{recipe['steps']} fine-tuning steps, learning-rate warmup {recipe['warmup']} steps, EMA {recipe['ema_decay']}."]
    return "\n".join(lines) + "\n"
