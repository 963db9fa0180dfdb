"""Cost of one training step of the order-1/2/3 DSM objectives (docs/design.md §3).

One step = ``HOSMObjective(lambda2=0.5, lambda3=0.1)`` → loss = mean_B(dsm1 + 0.5 dsm2 + 0.1 dsm3) →
``loss.backward()`` (no optimiser update). Cases:

* ``mlp``  — the paper's toy score net (docs/design.md §5) on 2-D data, VESDE, batch 5000,
  divergence 'exact' and 'hutchinson';
* ``conv`` — ``SmallConvNet`` (32 channels, 2 blocks) on 3×32×32, VPSDE, batch 8, 'hutchinson',
  eps-parameterisation s = -net(x, t)/σ(t).

Each worker first runs one un-timed priming step on 2 samples (one-time initialisation).
Time (benchmarks/_harness.py): median over ``--reps`` steps after ``--warmup`` steps
(``time.perf_counter``, CUDA synchronised); the extra columns give the fastest step and the median
process CPU time (``time.process_time``, all threads), which is less sensitive than wall time to other
jobs sharing the CPU. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation
before the step; on CPU each (case, divergence, order) runs in a fresh worker process and reports the
peak RSS increase over the RSS right before the first step (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, else ``ru_maxrss``).

    python -m benchmarks.step_cost [--device cpu|cuda] [--threads N] [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from hosm_lightning.core import VESDE, VPSDE, HOSMObjective
from hosm_lightning.nets import ScoreModel, SmallConvNet, ToyScoreNet

from ._harness import PeakMemory, environment, markdown_table, ratio, run_rows, sync, timed

LAMBDA2, LAMBDA3 = 0.5, 0.1  # reference toy weights (docs/design.md §3)
ORDERS = (1, 2, 3)


CASES = {
    # name: (divergences, description)
    "mlp": (("exact", "hutchinson", "hutchinson-vjp"), "toy MLP, 2-D, VESDE"),
    "conv": (("hutchinson", "hutchinson-vjp"), "SmallConvNet 3x32x32, VPSDE"),
}


def build_case(case: str, batch: int, device: torch.device, seed: int = 0):
    """Return (score_fn, x0, sde, net): the library's own networks and score parameterisation."""
    torch.manual_seed(seed)
    if case == "mlp":
        sde, net = VESDE(), ToyScoreNet(dim=2).to(device)  # the paper's toy MLP (470,018 parameters)
        x0 = torch.randn(batch, 2, device=device) * 2.0
    elif case == "conv":
        sde, net = VPSDE(), SmallConvNet(channels=32, depth=2).to(device)
        x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    else:
        raise ValueError(case)
    return ScoreModel(net, sde, "eps"), x0, sde, net


def measure(case: str, divergence: str, order: int, batch: int, device: str, warmup: int, reps: int,
            threads: int | None, seed: int = 0) -> dict:
    """Time and peak memory of one training step (a fresh process per call on CPU, see ``run_rows``)."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    score_fn, x0, sde, net = build_case(case, batch, dev, seed)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed + 1)
    div, _, product = divergence.partition("-")  # 'hutchinson-vjp': Jᵀv probes (reverse mode)
    objective = HOSMObjective(lambda2=LAMBDA2, lambda3=LAMBDA3, divergence=div, probe_product=product or "jvp")

    def step(x=x0):
        net.zero_grad(set_to_none=True)
        loss, _ = objective(score_fn, sde, x, order, gen)
        loss.mean().backward()

    # Priming step on 2 samples: one-time costs (functorch decomposition tables, lazily loaded
    # kernels, allocator pools) are neither timed nor counted as step memory.
    step(x0[:2])
    net.zero_grad(set_to_none=True)
    sync(dev)
    memory = PeakMemory(dev).start()
    timing = timed(step, repeats=reps, warmup=warmup, device=dev)
    return {
        "case": case, "divergence": divergence, "order": order, "batch": batch,
        "ms": 1e3 * timing.median, "ms_min": 1e3 * timing.fastest, "cpu_ms": 1e3 * timing.cpu_median,
        "peak_mib": memory.peak_mib(), "mem_method": memory.method,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch default)")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default 5, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, quick 1)")
    p.add_argument("--mlp-batch", type=int, default=None, help="default 5000, quick 500")
    p.add_argument("--conv-batch", type=int, default=None, help="default 8, quick 4")
    p.add_argument("--cases", default="mlp,conv", help="comma-separated subset of: " + ",".join(CASES))
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up, 2 reps, small batches")
    p.add_argument("--in-process", action="store_true", help="CPU: skip the per-measurement worker process")
    a = p.parse_args(argv)
    q = a.quick
    a.reps = a.reps if a.reps is not None else (2 if q else 5)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    a.mlp_batch = a.mlp_batch if a.mlp_batch is not None else (500 if q else 5000)
    a.conv_batch = a.conv_batch if a.conv_batch is not None else (4 if q else 8)
    a.cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    for c in a.cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}")
    return a


def table(results: list[dict]) -> str:
    """One row per measurement; ratios to order 1 of the same case and divergence in this run."""
    base = {(r["case"], r["divergence"]): r for r in results if r["order"] == 1}
    rows = []
    for r in results:
        b = base.get((r["case"], r["divergence"]))
        rows.append([f"{r['case']} ({CASES[r['case']][1]}, B={r['batch']})", r["divergence"], r["order"],
                     f"{r['ms']:.1f}", ratio(r["ms"], b and b["ms"]), f"{r['peak_mib']:.1f}",
                     ratio(r["peak_mib"], b and b["peak_mib"]), f"{r['ms_min']:.1f}", f"{r['cpu_ms']:.1f}"])
    header = ["case", "divergence", "order", "ms/step", "time ratio to order 1", "peak MiB", "memory ratio to order 1",
              "min ms/step", "CPU ms/step"]
    return markdown_table(header, rows, "llrrrrrrr")


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    isolate = dev.type == "cpu" and not args.in_process
    jobs = []
    for case in args.cases:
        batch = args.mlp_batch if case == "mlp" else args.conv_batch
        for div in CASES[case][0]:
            for order in ORDERS:
                jobs.append((case, div, order, batch, args.device, args.warmup, args.reps, args.threads))

    print("# DSM training-step cost (order 1/2/3)")
    print()
    print("\n".join(environment(dev, args.threads)))
    print(f"- warm-up {args.warmup}, median of {args.reps} steps")
    print(f"- batches: mlp {args.mlp_batch}, conv {args.conv_batch}; loss = dsm1 + {LAMBDA2} dsm2 + {LAMBDA3} dsm3")
    print(f"- memory: {'fresh worker process per row' if isolate else 'in-process'}", flush=True)
    results = run_rows(measure, jobs, isolate=isolate)
    print(f"- memory method: {results[0]['mem_method']}" if results else "")
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
