"""Exact ODE likelihood: our torchdiffeq evaluator against a solve_ivp baseline (GitHub issue 6).

* **ours**: ``hosm_lightning.core.ode_log_likelihood`` — torchdiffeq dopri5 on the tensor state
  (x, Δlogp), exact divergence, everything stays a torch tensor on the device.
* **scipy**: what the reference codes do — ``scipy.integrate.solve_ivp(method="RK45")`` on one
  flattened float64 numpy state [x, Δlogp]; every function evaluation converts the state to a float32
  torch tensor, evaluates the drift h = f − ½g²s and its exact divergence (autograd), and converts
  back to numpy. Same rtol/atol, same start time eps = 1e-5, same end time T = 1.

Cases (1-D, VE SDE σ ∈ [0.01, 50]):

* ``mixture``: the exact score of the paper's 1-D mixture (``paper_mog1d().score_fn(VESDE())``) on
  N points drawn from it. The error is known: the ODE density of the exact score is
  log q_eps(x) − log q_T(x_T) + log π(x_T) per point (docs/design.md §4), evaluated in float64 at each
  solver's own x_T.
* ``network``: the paper's toy MLP (``ToyScoreNet(dim=1)``) trained briefly with first-order DSM
  (``dsm_losses``), or a Lightning checkpoint given with ``--ckpt`` (a mog1d-config run). The error
  is measured against a float64 copy of the network solved by dopri5 at rtol = atol = 1e-8; the
  agreement |ours − scipy| is reported too.

Times: one solve per row after a warm-up, the median of ``--repeats`` solves at rtol 1e-5; one torch
thread by default (``--threads``). Goal: ours ≥ 2× faster than the baseline at equal or better accuracy.

    python benchmarks/likelihood_speed.py [--n 5000] [--ckpt runs/mog1d/checkpoints/last.ckpt]
        [--device cpu|cuda] [--out benchmarks/results] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hosm_lightning.core import VESDE, dsm_losses, ode_log_likelihood, paper_mog1d  # noqa: E402
from hosm_lightning.core.seeding import make_generator  # noqa: E402
from hosm_lightning.nets import ScoreModel, ToyScoreNet  # noqa: E402

EPS = 1e-5
REF_TOL = 1e-8  # float64 reference solve of the network case


def scipy_log_likelihood(score_fn, sde, x: torch.Tensor, *, eps=EPS, rtol=1e-5, atol=1e-5):
    """The reference codes' evaluator: RK45 on a flat numpy state, torch ↔ numpy at every evaluation."""
    shape, b, device = x.shape, x.shape[0], x.device
    n = x.numel()
    nfe = [0]

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        nfe[0] += 1
        xs = torch.from_numpy(y[:n]).reshape(shape).to(device=device, dtype=torch.float32)
        tt = torch.full((b,), t, dtype=torch.float32, device=device)
        with torch.enable_grad():
            xs.requires_grad_(True)
            h = sde.pf_drift(xs, tt, score_fn(xs, tt))
            hf = h.reshape(b, -1)
            div = torch.zeros(b, device=device)
            for i in range(hf.shape[1]):  # exact divergence, one reverse pass per dimension
                (g,) = torch.autograd.grad(hf[:, i].sum(), xs, retain_graph=i + 1 < hf.shape[1])
                div = div + g.reshape(b, -1)[:, i]
        return np.concatenate([h.detach().cpu().numpy().reshape(-1), div.detach().cpu().numpy()]).astype(np.float64)

    start = time.perf_counter()
    y0 = np.concatenate([x.detach().cpu().numpy().reshape(-1).astype(np.float64), np.zeros(b)])
    sol = solve_ivp(rhs, (eps, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    x_t = torch.from_numpy(sol.y[:n, -1]).reshape(shape)
    logp = sde.prior_logp(x_t) + torch.from_numpy(sol.y[n:, -1])
    return logp, {"nfe": nfe[0], "x_T": x_t, "seconds": time.perf_counter() - start}


def timed(fn, repeats: int):
    """Run ``fn`` ``repeats`` times; return (last result, median seconds)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def train_net(steps: int, batch: int, device) -> ScoreModel:
    """ToyScoreNet(dim=1), first-order DSM on the paper's mixture, Adam 1e-3, clip 1 (seeded)."""
    torch.manual_seed(0)
    sde, mix = VESDE(), paper_mog1d()
    model = ScoreModel(ToyScoreNet(dim=1), sde).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x0 = mix.sample(batch, gen).to(device)
        gen_tzv = make_generator(0, "speed-train", step, device=device)
        loss = dsm_losses(model, x0, sde, order=1, generator=gen_tzv)["dsm1"].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def load_net(ckpt: str, device) -> ScoreModel:
    """The score model of a mog1d Lightning checkpoint (EMA weights), via the CLI's loader."""
    from hosm_lightning.cli import load_weights
    from hosm_lightning.lit.module import HOSMModule

    module = HOSMModule(net=ToyScoreNet(dim=1), sde=VESDE())
    load_weights(module, ckpt)
    return module.score_model.to(device).eval()


def compare(case: str, score_fn, x, sde, rtol: float, repeats: int, truth, with_scipy: bool = True) -> list[dict]:
    """Rows for ours (and scipy): NLL, NFE, median time, mean/max |logp − truth(x_T, logp)|."""
    rows = []
    runners = {"ours (torchdiffeq dopri5)": lambda: ode_log_likelihood(score_fn, sde, x, eps=EPS, rtol=rtol, atol=rtol)}
    if with_scipy:
        runners["scipy solve_ivp RK45"] = lambda: scipy_log_likelihood(score_fn, sde, x, rtol=rtol, atol=rtol)
    for name, fn in runners.items():
        (logp, info), secs = timed(fn, repeats)
        logp = logp.detach().double().cpu()
        err = (logp - truth(info["x_T"].detach().double().cpu())).abs()
        rows.append({"case": case, "rtol": rtol, "evaluator": name, "nll": -logp.mean().item(), "nfe": info["nfe"],
                     "seconds": secs, "mae": err.mean().item(), "max": err.max().item(), "logp": logp})
    return rows


def fmt(rows: list[dict], speed: bool) -> str:
    head = "| case | rtol = atol | evaluator | NLL (nats) | NFE | wall s | ms/eval | mean abs error (nats) | max abs error |"
    head += " speed-up vs scipy |" if speed else ""
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if speed else "")]
    for r in rows:
        line = (f"| {r['case']} | {r['rtol']:.0e} | {r['evaluator']} | {r['nll']:.5f} | {r['nfe']} | {r['seconds']:.3f} | "
                f"{1000 * r['seconds'] / r['nfe']:.2f} | {r['mae']:.2e} | {r['max']:.2e} |")
        if speed:
            line += f" {r['speedup']:.2f}× |" if "speedup" in r else " 1.00× |"
        lines.append(line)
    return "\n".join(lines)


def why(rows: list[dict]) -> str:
    """One paragraph explaining the measured ratio from the head-to-head rows (mixture, network)."""
    mo, ms, no, ns = rows
    per = lambda r: 1000 * r["seconds"] / r["nfe"]  # noqa: E731
    return (
        f"Both evaluators run the same Dormand–Prince 5(4) pair, and the step counts are close (network: NFE "
        f"{no['nfe']} ours vs {ns['nfe']} scipy; mixture: {mo['nfe']} vs {ms['nfe']}; torchdiffeq's error norm is "
        "the max of the RMS norms of x and Δlogp, scipy's one RMS over the flat state). On the network each "
        f"evaluation costs {per(no):.1f} ms (ours) vs {per(ns):.1f} ms (scipy): it is the net's forward and reverse "
        "pass, identical in both. What scipy adds — copying 2N floats torch ↔ numpy and doing the RK bookkeeping in "
        f"numpy — is visible only with the cheap exact score: {per(mo):.2f} vs {per(ms):.2f} ms per evaluation, "
        "where torchdiffeq's own Python overhead per step is no smaller. On a CPU the network dominates, so the "
        "ratio is ≈ the NFE ratio; a device-resident solver gains where scipy forces a device→host copy and sync "
        "every evaluation (GPU), which this CPU-only run does not measure."
    )


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="500 points, 2 tolerances, a few training steps")
    p.add_argument("--n", type=int, help="number of points (default 5000; 500 with --quick)")
    p.add_argument("--ckpt", help="mog1d Lightning checkpoint for the network case (default: train briefly)")
    p.add_argument("--train-steps", type=int, help="DSM steps when no --ckpt (default 400; 30 with --quick)")
    p.add_argument("--repeats", type=int, help="timed solves per row (median; default 3, 1 with --quick)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="results folder (default benchmarks/results; runs/likelihood_speed_quick with --quick)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    n = a.n or (500 if a.quick else 5000)
    repeats = a.repeats or (1 if a.quick else 3)
    tols = (1e-3, 1e-5) if a.quick else (1e-3, 1e-4, 1e-5, 1e-6)
    sde, mix = VESDE(), paper_mog1d()
    t0 = time.perf_counter()
    x = mix.sample(n, torch.Generator().manual_seed(0)).to(device)

    def anchor(x_t):  # exact ODE density of the exact score, per point
        xd = x.detach().double().cpu()
        return mix.log_prob(xd, EPS, sde) - mix.log_prob(x_t, sde.T, sde) + sde.prior_logp(x_t)

    exact_fn = mix.score_fn(sde)
    if a.ckpt:
        net, net_src = load_net(a.ckpt, device), f"checkpoint `{a.ckpt}`"
    else:
        steps = a.train_steps or (30 if a.quick else 400)
        tt = time.perf_counter()
        net = train_net(steps, 1000, device)
        net_src = f"trained here: {steps} first-order DSM steps, batch 1000 ({time.perf_counter() - tt:.0f} s)"
    net64 = copy.deepcopy(net).double()
    ref_logp, ref_info = ode_log_likelihood(net64, sde, x.double(), eps=EPS, rtol=REF_TOL, atol=REF_TOL)
    ref_logp = ref_logp.detach().cpu()

    ode_log_likelihood(exact_fn, sde, x[:8], eps=EPS)  # warm-up (one-time initialisation)
    scipy_log_likelihood(net, sde, x[:8])
    sweep = []
    for rtol in tols:  # the reference setting 1e-5 gets the median of `repeats` solves, the others one
        reps = repeats if rtol == 1e-5 else 1
        sweep += compare("mixture (exact score)", exact_fn, x, sde, rtol, reps, anchor)
        sweep += compare("network (toy MLP)", net, x, sde, rtol, reps, lambda _: ref_logp)
    for i in range(0, len(sweep), 2):
        sweep[i]["speedup"] = sweep[i + 1]["seconds"] / sweep[i]["seconds"]
    main_rows = [r for r in sweep if r["rtol"] == 1e-5]
    agree = (main_rows[2]["logp"] - main_rows[3]["logp"]).abs()
    met = all(r["speedup"] >= 2 and r["mae"] <= s["mae"] * 1.05 + 1e-7 for r, s in zip(main_rows[::2], main_rows[1::2]))
    text = "\n".join([
        "# Exact ODE likelihood: torchdiffeq (ours) vs scipy solve_ivp (reference codes)" + (" (QUICK)" if a.quick else ""),
        "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}: {os.cpu_count()} CPU cores, device {device}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads). `benchmarks/likelihood_speed.py"
        + (" --quick`." if a.quick else "`.") + f" N = {n} points of the paper's 1-D mixture, VE SDE, eps = 1e-5, "
        f"exact divergence; wall time = one solve (median of {repeats} at rtol 1e-5); ms/eval = wall time / NFE.",
        "",
        "Errors: mixture — against the exact anchor log q_eps(x) − log q_T(x_T) + log π(x_T); network — against "
        f"a float64 copy of the net solved at rtol = atol = {REF_TOL:g} (NFE {ref_info['nfe']}; the float32 "
        f"rounding of the net itself bounds the attainable error). Network: {net_src}.",
        "",
        "## Head to head at rtol = atol = 1e-5 (the reference setting)",
        "",
        fmt(main_rows, speed=True),
        "",
        f"Agreement on the network, |ours − scipy| per point: mean {agree.mean():.2e}, max {agree.max():.2e} nats.",
        "",
        f"Goal (≥ 2× faster at equal or better accuracy): **{'met' if met else 'not met'}**. " + why(main_rows),
        "",
        "## Tolerance sweep",
        "",
        fmt(sweep, speed=True),
        "",
        f"Total benchmark time {time.perf_counter() - t0:.0f} s.",
    ]) + "\n"
    out = Path(a.out or (ROOT / "runs" / "likelihood_speed_quick" if a.quick else ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "likelihood_speed.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
