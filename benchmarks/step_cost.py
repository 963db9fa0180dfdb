"""Cost of one training step of the order-1/2/3 DSM objectives (docs/design.md §3).

One step = ``dsm_losses`` → loss = mean_B(dsm1 + 0.5 dsm2 + 0.1 dsm3) → ``loss.backward()``
(no optimiser update). Cases:

* ``mlp``  — the paper's toy score net (docs/design.md §5) on 2-D data, VESDE, batch 5000,
  divergence 'exact' and 'hutchinson';
* ``conv`` — ``SmallConvNet`` (32 channels, 2 blocks) on 3×32×32, VPSDE, batch 8, 'hutchinson',
  eps-parameterisation s = -net(x, t)/σ(t).

Each worker first runs one un-timed priming step on 2 samples (one-time initialisation).
Time: median over ``--reps`` steps after ``--warmup`` steps (``time.perf_counter``, CUDA synchronised);
the extra columns give the fastest step and the median process CPU time (``time.process_time``, all
threads), which is less sensitive than wall time to other jobs sharing the CPU.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the step; on CPU
each (case, divergence, order) runs in a fresh worker process and reports the peak RSS increase over
the RSS right before the first step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``,
else ``ru_maxrss``).

    python benchmarks/step_cost.py [--device cpu|cuda] [--threads N] [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import gc
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import warnings

import torch

from hosm_lightning.core.losses import dsm_losses
from hosm_lightning.core.sde import VESDE, VPSDE
from hosm_lightning.nets import ScoreModel, SmallConvNet, ToyScoreNet

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


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def measure(case: str, divergence: str, order: int, batch: int, device: str, warmup: int, reps: int,
            threads: int | None, seed: int = 0) -> dict:
    """Time and peak memory of one training step; run in a fresh process on CPU."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    score_fn, x0, sde, net = build_case(case, batch, dev, seed)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed + 1)

    def step(x=x0):
        net.zero_grad(set_to_none=True)
        div, _, product = divergence.partition("-")  # 'hutchinson-vjp': Jᵀv probes (reverse mode)
        losses = dsm_losses(score_fn, x, sde, order=order, generator=gen, divergence=div,
                            probe_product=product or "jvp")
        loss = losses["dsm1"]
        if order >= 2:
            loss = loss + LAMBDA2 * losses["dsm2"]
        if order >= 3:
            loss = loss + LAMBDA3 * losses["dsm3"]
        loss.mean().backward()

    # Priming step on 2 samples: one-time costs (functorch decomposition tables, lazily loaded
    # kernels, allocator pools) are neither timed nor counted as step memory.
    step(x0[:2])
    net.zero_grad(set_to_none=True)
    _sync(dev)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        mem_method = "cuda.max_memory_allocated"
    else:
        hwm_ok = _reset_hwm() and _status_kib("VmRSS") is not None
        if hwm_ok:
            base = _status_kib("VmRSS") * 1024
            mem_method = "VmHWM (clear_refs) - VmRSS before"
        else:
            base = _ru_maxrss_kib() * 1024
            mem_method = "ru_maxrss increase"

    times, cpu_times = [], []
    for i in range(warmup + reps):
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)

    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    elif hwm_ok:
        peak = _status_kib("VmHWM") * 1024 - base
    else:
        peak = _ru_maxrss_kib() * 1024 - base
    return {
        "case": case, "divergence": divergence, "order": order, "batch": batch,
        "ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
        "cpu_ms": 1e3 * statistics.median(cpu_times),
        "peak_mib": max(peak, 0) / 2**20, "mem_method": mem_method,
    }


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
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


def _executor(isolate: bool):
    if not isolate:
        return None
    # A fresh process per measurement; forkserver (torch preloaded once) avoids re-importing torch
    # in every worker, spawn is the portable fallback.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "hosm_lightning.core.losses"])
    else:
        ctx = mp.get_context("spawn")
    return ctx


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    isolate = dev.type == "cpu" and not args.in_process
    ctx = _executor(isolate)

    jobs = []
    for case in args.cases:
        batch = args.mlp_batch if case == "mlp" else args.conv_batch
        for div in CASES[case][0]:
            for order in ORDERS:
                jobs.append((case, div, order, batch, args.device, args.warmup, args.reps, args.threads))

    threads = args.threads or torch.get_num_threads()
    print("# DSM training-step cost (order 1/2/3)")
    print()
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    if dev.type == "cuda":
        print(f"- device: cuda ({torch.cuda.get_device_name(dev)})")
    else:
        print(f"- device: cpu ({platform.processor() or 'unknown'}; os.cpu_count()={os.cpu_count()})")
    print(f"- threads: {threads}; warm-up {args.warmup}, median of {args.reps} steps")
    print(f"- batches: mlp {args.mlp_batch}, conv {args.conv_batch}; loss = dsm1 + {LAMBDA2} dsm2 + {LAMBDA3} dsm3")
    print(f"- memory: {'fresh worker process per row' if isolate else 'in-process'}", flush=True)

    results = []
    for job in jobs:
        if isolate:
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
                res = ex.submit(measure, *job).result()
        else:
            res = measure(*job)
        results.append(res)
    print(f"- memory method: {results[0]['mem_method']}" if results else "")
    print()

    base = {(r["case"], r["divergence"]): r for r in results if r["order"] == 1}
    print("| case | divergence | order | ms/step | time ratio to order 1 | peak MiB | memory ratio to order 1 "
          "| min ms/step | CPU ms/step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        b = base.get((r["case"], r["divergence"]))
        tr = r["ms"] / b["ms"] if b else float("nan")
        mr = r["peak_mib"] / b["peak_mib"] if b and b["peak_mib"] > 0 else float("nan")
        name = f"{r['case']} ({CASES[r['case']][1]}, B={r['batch']})"
        print(f"| {name} | {r['divergence']} | {r['order']} | {r['ms']:.1f} | {tr:.2f}x "
              f"| {r['peak_mib']:.1f} | {mr:.2f}x | {r['ms_min']:.1f} | {r['cpu_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
