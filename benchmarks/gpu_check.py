"""One GPU check, one table: DDPM++ and NCSN++ at the paper's size on synthetic 3×32×32 data (no downloads).

Rows:

* ``train``: one training step (``HOSMObjective`` with Hutchinson probes → mean(dsm1+dsm2+dsm3) →
  backward, via ``benchmarks/unet_step.measure``) per order 1/2/3, batch 48 and 128,
  ``probe_product`` jvp and vjp (order 1 has no probe): ms/step, images/s, peak memory (MiB above
  the allocation before the steps).
* ``bpd``: bits/dim throughput (images/s) of the PF-ODE likelihood at rtol = atol = 1e-5 (dopri5,
  Hutchinson probe), uniform and truncated-normal dequantization (K = 1), on random uint8 images.
* ``sample``: ODE sampling throughput for FID (images/s), T → the SDE's sampling eps, rtol = atol = 1e-5.

The networks have **random weights**: step time and memory do not depend on them, but the NFE of
the ODE rows does (a trained network usually needs fewer/more steps), so the NFE is printed and a
solve is cut at ``--max-nfe`` evaluations ("> N NFE"). Every cell catches CUDA OOM and prints
"OOM"; cells past ``--budget`` seconds print "skipped (time budget)".

    bash benchmarks/gpu_check.sh                            # on a GPU: ≤ 8 minutes
    python -m benchmarks.gpu_check --smoke --device cpu     # tiny widths, batch 2 (CI)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch

from hosm_lightning.core import ODEOptions, bits_per_dim, ode_log_likelihood, ode_sample
from hosm_lightning.nets import ScoreModel

from ._harness import markdown_table, timed
from .unet_step import FULL, NETS, measure

SMOKE = dict(image_size=16, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
OOM = (torch.cuda.OutOfMemoryError,)
HEADER = ["row", "net", "batch", "order / protocol", "ms/step", "images/s", "peak MiB", "NFE", "note"]


class _TooManySteps(RuntimeError):
    pass


def _capped(score_fn, max_nfe: int):
    count = [0]

    def fn(x, t):
        count[0] += 1
        if count[0] > max_nfe:
            raise _TooManySteps
        return score_fn(x, t)

    return fn


def _build(name: str, config: dict, dev):
    cls, sde_cls, par, centered = NETS[name]
    torch.manual_seed(0)
    net = cls(**config).to(dev).eval()
    sde = sde_cls()
    return ScoreModel(net, sde, par), sde, centered


def _ode_job(kind: str, proto: str, score, sde, x: torch.Tensor, centered: bool, ode: ODEOptions, gen):
    """One bits/dim or sampling solve: () -> (NFE, note)."""
    if kind == "sample":
        x_T = sde.prior_sample(x.shape, generator=gen, device=x.device)
        return lambda: (ode_sample(score, sde, x_T, ode).nfe, "")
    nfe = [0]

    def log_prob(y):
        lik = ode_log_likelihood(score, sde, y, ode, generator=gen)
        nfe[0] += lik.nfe
        return lik.logp

    def run():
        bound = bits_per_dim(log_prob, x, centered=centered, generator=gen, dequantization=proto, sde=sde, eps=ode.eps)
        return nfe[0], f"{bound.bpd.mean().item():.3f} bits/dim (random weights)"

    return run


def ode_rows(name: str, config: dict, dev, batch: int, tol: float, max_nfe: int) -> list[dict]:
    """bits/dim (both protocols) and sampling throughput of one net."""
    model, sde, centered = _build(name, config, dev)
    size = config["image_size"]
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).to(dev)
    ode = ODEOptions(eps=sde.resolve_eps(), rtol=tol, atol=tol, divergence="hutchinson")
    rows = []
    for kind, proto in [("bpd", "uniform"), ("bpd", "truncated_normal"), ("sample", "-")]:
        cell = {"row": kind, "name": name, "batch": batch, "what": proto}
        gen = torch.Generator(device=dev)
        gen.manual_seed(2)
        t0 = time.perf_counter()
        try:
            timing = timed(_ode_job(kind, proto, _capped(model, max_nfe), sde, x, centered, ode, gen), repeats=1,
                           device=dev)
            (nfe, extra), secs = timing.result, timing.median
            rows.append({**cell, "nfe": nfe, "img_s": batch / secs, "secs": secs, "extra": extra})
        except _TooManySteps:
            rows.append({**cell, "cut": max_nfe, "secs": time.perf_counter() - t0})
        except OOM:
            rows.append({**cell, "oom": True})
            torch.cuda.empty_cache()
    return rows


def train_rows(config: dict, batches: list[int], device: str, reps: int, over) -> list[dict]:
    """One training-step row per net, batch, order and probe product (skipped once ``over()``)."""
    rows = []
    for name in NETS:
        for batch in batches:
            for order in (1, 2, 3):
                for probe in (("jvp",) if order == 1 else ("jvp", "vjp")):
                    cell = {"row": "train", "name": name, "batch": batch, "what": f"order {order}, {probe if order > 1 else '-'}"}
                    if over():
                        rows.append({**cell, "skipped": True})
                        continue
                    try:
                        r = measure(name, order, batch, config, device, 1, reps, None, probe_product=probe)
                    except OOM:
                        r = {"oom": True}
                    rows.append({**cell, **r})
                    print("progress:", " | ".join(map(str, _cells(rows[-1]))), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny widths, batch 2, loose ODE tolerances (CPU CI)")
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds for the training rows (the ODE rows get until budget + 150 s); later cells are skipped")
    p.add_argument("--max-nfe", type=int, default=None, help="cut an ODE solve after this many evaluations")
    p.add_argument("--ode-batch", type=int, default=None, help="images per bits/dim and sampling solve")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if a.smoke:
        config, batches, tol = SMOKE, [2], 1e-3
        max_nfe, ode_batch, reps = a.max_nfe or 60, a.ode_batch or 2, 1
    else:
        config, batches, tol = FULL, [48, 128], 1e-5
        max_nfe, ode_batch, reps = a.max_nfe or 500, a.ode_batch or 32, 2
    start = time.perf_counter()
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print("# GPU check: DDPM++ (VP) and NCSN++ (VE), synthetic 3×32×32 data")
    print(f"- date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; device {dev_name}; "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"- config: {'SMOKE (reduced width, 16×16)' if a.smoke else 'paper size'} {config}; train steps: warm-up 1, "
          f"median of {reps}; ODE: dopri5 rtol = atol = {tol}, batch {ode_batch}, cut at {max_nfe} NFE; random weights",
          flush=True)

    def over(extra: float = 0.0) -> bool:
        return time.perf_counter() - start > a.budget + extra

    rows = train_rows(config, batches, a.device, reps, over)
    for name in NETS:
        if over(150.0):
            rows.append({"row": "bpd/sample", "name": name, "batch": ode_batch, "what": "-", "skipped": True})
            continue
        for r in ode_rows(name, config, dev, ode_batch, tol, max_nfe):
            rows.append(r)
            print("progress:", " | ".join(map(str, _cells(r))), file=sys.stderr, flush=True)
    print()
    print(markdown_table(HEADER, [_cells(r) for r in rows], "llrlrrrrl"))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


def _cells(r: dict) -> list:
    """The table cells of one row."""
    head = [r["row"], r["name"], r["batch"], r["what"]]
    if r.get("skipped"):
        return head + ["", "", "", "", "skipped (time budget)"]
    if r.get("oom"):
        return head + ["OOM", "OOM", "OOM", "", ""]
    if "cut" in r:
        return head + ["", "", "", f"> {r['cut']}", f"cut after {r['secs']:.0f} s"]
    if r["row"] == "train":
        return head + [f"{r['ms']:.1f}", f"{r['img_s']:.2f}", f"{r['peak_mib']:.0f}", "", ""]
    return head + ["", f"{r['img_s']:.3f}", "", r["nfe"], r.get("extra", "")]


if __name__ == "__main__":
    sys.exit(main())
