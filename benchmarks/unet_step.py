"""Training-step cost of the DDPM++ / NCSN++ U-Nets for DSM orders 1, 2, 3 (docs/design.md §6).

One step = ``HOSMObjective(lambda2=1, lambda3=1, divergence='hutchinson')`` (J·v by forward-mode JVP,
∇ₓ(vᵀJv) by a reverse pass with ``create_graph``) → loss = mean_B(dsm1 + dsm2 + dsm3) (unit weights,
as the reference image code) → ``loss.backward()``; no optimiser update. DDPM++ runs with the VP SDE
(ε-prediction, s = −net/σ), NCSN++ with the VE SDE (the net returns the score).

Configurations:

* CUDA (default): the paper's networks (nf 128, ch_mult (1,2,2,2), 4 blocks, attention at 16×16,
  3×32×32) at batch 48 for orders 1–3 and batch 128 for orders 1–2 (the reference recipe: 128 for
  order ≤ 2, 48 for order 3). Peak memory = ``torch.cuda.max_memory_allocated`` during the timed
  steps minus the allocation before them (weights and inputs excluded, gradients included).
* CPU: a reduced width (nf 32, 1 block per level, same depth/resolutions, 3×32×32, batch 2; printed
  in the header), each (net, order) in a fresh worker process. Peak memory = the peak RSS increase over
  the RSS before the first step (benchmarks/_harness.py ``PeakMemory``; after building the net and
  warming up the forward-AD machinery on a tiny conv net, so one-time library initialisation is not
  counted).

Throughput is images/s = batch / median step time (``time.perf_counter``, CUDA synchronised).
Ratios are to order 1 of the same net and batch in the same run. ``--quick``: a 16×16, nf 16,
ch_mult (1, 2) net, batch 2, one warm-up and two timed steps (a smoke test of the script).

    python -m benchmarks.unet_step [--device cpu|cuda] [--quick] [--threads N] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from hosm_lightning.core import VESDE, VPSDE, HOSMObjective
from hosm_lightning.nets import DDPMpp, NCSNpp, ScoreModel

from ._harness import PeakMemory, environment, markdown_table, ratio, run_rows, timed

NETS = {"ddpmpp": (DDPMpp, VPSDE, "eps", True), "ncsnpp": (NCSNpp, VESDE, "score", False)}
FULL = dict(image_size=32, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,))
CPU_REDUCED = dict(FULL, nf=32, num_res_blocks=1)
QUICK = dict(image_size=16, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def _prime_forward_ad(device: torch.device) -> None:
    """Run jvp + create_graph grad + backward once on a tiny conv net (one-time library set-up)."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU(),
                               torch.nn.Conv2d(4, 3, 3, padding=1)).to(device)
    x = torch.randn(1, 3, 4, 4, device=device, requires_grad=True)
    out, jv = torch.func.jvp(conv, (x,), (torch.ones_like(x),))
    g = torch.autograd.grad((jv * x).sum(), x, create_graph=True)[0]
    (out.sum() + g.square().sum()).backward()


def measure(name: str, order: int, batch: int, config: dict, device: str, warmup: int, reps: int,
            threads: int | None, seed: int = 0, probe_product: str = "jvp") -> dict:
    """Time and peak memory of one training step (a fresh process per call on CPU, see ``run_rows``)."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cls, sde_cls, par, centered = NETS[name]
    torch.manual_seed(seed)
    net = cls(**config).to(dev).train()
    sde = sde_cls()
    model = ScoreModel(net, sde, par)
    size = config["image_size"]
    x0 = torch.rand(batch, 3, size, size, device=dev)
    x0 = 2 * x0 - 1 if centered else x0
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed + 1)
    objective = HOSMObjective(lambda2=1.0, lambda3=1.0, divergence="hutchinson", probe_product=probe_product)

    def step():
        net.zero_grad(set_to_none=True)
        loss, _ = objective(model, sde, x0, order, gen)
        loss.mean().backward()

    _prime_forward_ad(dev)
    memory = PeakMemory(dev).start()
    try:
        timing = timed(step, repeats=reps, warmup=warmup, device=dev)
    except torch.cuda.OutOfMemoryError:
        return {"name": name, "order": order, "batch": batch, "oom": True}
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    ms = timing.median * 1e3
    return {"name": name, "order": order, "batch": batch, "oom": False, "ms": ms, "img_s": batch / ms * 1e3,
            "peak_mib": memory.peak_mib(), "mem_method": memory.method, "params": params}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nets", default="ddpmpp,ncsnpp", help="comma-separated subset of: " + ",".join(NETS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default 3, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny net, batch 2: a smoke test")
    p.add_argument("--in-process", action="store_true", help="CPU: no fresh worker process per row")
    a = p.parse_args(argv)
    a.reps = a.reps if a.reps is not None else (2 if a.quick else 3)
    a.warmup = a.warmup if a.warmup is not None else 1
    a.nets = [n.strip() for n in a.nets.split(",") if n.strip()]
    for n in a.nets:
        if n not in NETS:
            p.error(f"unknown net {n!r}")
    return a


def plan(args) -> tuple[dict, list[tuple[int, int]], str]:
    """(net config, [(batch, order)], description)."""
    if args.quick:
        return QUICK, [(2, o) for o in (1, 2, 3)], "quick: 3×16×16, nf 16, ch_mult (1,2), 1 block, attn 8, batch 2"
    if args.device.startswith("cuda"):
        return FULL, [(48, o) for o in (1, 2, 3)] + [(128, o) for o in (1, 2)], (
            "paper networks: 3×32×32, nf 128, ch_mult (1,2,2,2), 4 blocks, attn 16; batch 48 (orders 1–3), 128 (orders 1–2)")
    return CPU_REDUCED, [(2, o) for o in (1, 2, 3)], (
        "CPU, REDUCED width: 3×32×32, nf 32 (paper 128), ch_mult (1,2,2,2), 1 block per level (paper 4), attn 16, batch 2")


def table(results: list[dict]) -> str:
    """One row per measurement; ratios to order 1 of the same net and batch in this run."""
    base = {(r["name"], r["batch"]): r for r in results if r["order"] == 1 and not r["oom"]}
    rows = []
    for r in results:
        if r["oom"]:
            rows.append([r["name"], "", r["batch"], r["order"], "OOM", "", "", "", ""])
            continue
        b = base.get((r["name"], r["batch"]))
        rows.append([r["name"], f"{r['params'] / 1e6:.2f}M", r["batch"], r["order"], f"{r['ms']:.1f}",
                     f"{r['img_s']:.2f}", ratio(r["ms"], b and b["ms"]), f"{r['peak_mib']:.1f}",
                     ratio(r["peak_mib"], b and b["peak_mib"])])
    header = ["net", "params", "batch", "order", "ms/step", "images/s", "time ratio to order 1", "peak MiB",
              "memory ratio to order 1"]
    return markdown_table(header, rows, "lrrrrrrrr")


def main(argv=None) -> int:
    args = parse_args(argv)
    config, plan_rows, desc = plan(args)
    dev = torch.device(args.device)
    isolate = dev.type == "cpu" and not args.in_process
    jobs = [(name, order, batch, config, args.device, args.warmup, args.reps, args.threads)
            for name in args.nets for batch, order in plan_rows]
    print("# DDPM++ / NCSN++ training step, DSM orders 1/2/3")
    print()
    print("\n".join(environment(dev, args.threads)))
    print(f"- config: {desc}")
    print(f"- step: HOSMObjective (hutchinson) → mean(dsm1 + dsm2 + dsm3) → backward; warm-up {args.warmup}, "
          f"median of {args.reps} steps")
    print("- memory: " + ("torch.cuda.max_memory_allocated − allocated before the steps" if dev.type == "cuda"
                          else "peak RSS increase over the RSS before the first step, fresh process per row"
                          if isolate else "peak RSS increase, in-process"))
    print(flush=True)
    results = run_rows(measure, jobs, isolate=isolate)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
