"""What the benchmarks share to measure and report: timed repeats, peak memory, one worker process
per row and Markdown tables (their progress lines come from :mod:`hosm_lightning.progress`).

* :func:`timed`: untimed warm-up calls, then timed repeats (wall clock ``time.perf_counter`` and
  process CPU time ``time.process_time``, the device synchronised before and after every call);
  the benchmarks report the median, and ratios between rows measured in the same run (:func:`ratio`).
* :class:`PeakMemory`: the peak memory of a block above the memory in use when it starts: on CUDA
  ``torch.cuda.max_memory_allocated``, on the CPU the process's peak resident set (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``; else the increase of ``ru_maxrss``).
* :func:`run_rows`: one function call per table row, each in a fresh worker process on the CPU, so that
  a row's peak resident set is not that of the rows before it.
* :func:`worker_pool`: the spawn process pool of the long benchmarks, whose workers exit when the
  benchmark's own process is gone (killed or stopped), instead of training on as orphans.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["sync", "Timing", "timed", "PeakMemory", "run_rows", "worker_pool", "ratio", "markdown_table",
           "environment"]


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall-clock and process CPU seconds of each timed call, and the last call's result."""

    seconds: tuple[float, ...]
    cpu_seconds: tuple[float, ...]
    result: object = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def fastest(self) -> float:
        return min(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds)


def timed(fn: Callable[[], object], *, repeats: int, warmup: int = 0, device=None) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed, ``device`` synchronised
    around every call."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    wall, cpu, out = [], [], None
    for i in range(warmup + repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return Timing(tuple(wall), tuple(cpu), out)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory of the work done between :meth:`start` and :meth:`peak_mib`, above the memory in
    use at :meth:`start`; ``method`` says how it is measured."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.method, self.base = "", 0

    def start(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method, self.base = "cuda.max_memory_allocated", torch.cuda.memory_allocated(self.device)
        elif _reset_peak_rss() and _status_kib("VmRSS") is not None:
            self.method, self.base = "VmHWM (clear_refs) - VmRSS before", _status_kib("VmRSS") * 1024
        else:
            self.method, self.base = "ru_maxrss increase", _ru_maxrss_bytes()
        return self

    def peak_mib(self) -> float:
        if self.method.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = _ru_maxrss_bytes()
        return max(peak - self.base, 0) / 2**20


def _call(module: str, name: str, args: tuple):
    """Worker side of :func:`run_rows`: import the function by name and call it."""
    return getattr(importlib.import_module(module), name)(*args)


def _module_of(fn: Callable) -> str:
    """The importable name of ``fn``'s module (``benchmarks.x`` also when it runs as ``__main__``)."""
    if fn.__module__ != "__main__":
        return fn.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise RuntimeError("run the benchmark as a module from the repository root: python -m benchmarks.<name>")
    return spec.name


def run_rows(fn: Callable, jobs: list[tuple], *, isolate: bool) -> list:
    """``fn(*job)`` for every job, in order; with ``isolate`` each call runs in a fresh worker process
    (one at a time). A forkserver that has imported torch and ``fn``'s module starts the workers where
    available (spawn otherwise), so a row does not pay for importing torch."""
    if not isolate:
        return [fn(*job) for job in jobs]
    module = _module_of(fn)
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", module])
    else:
        ctx = mp.get_context("spawn")
    out = []
    for job in jobs:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            out.append(pool.submit(_call, module, fn.__name__, tuple(job)).result())
    return out


def worker_pool(workers: int, poll: float = 1.0) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that each exit (status 1) within ``poll`` seconds of their
    parent's end: a benchmark stopped by SIGTERM or SIGKILL leaves no worker training on."""
    return ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("spawn"), initializer=_exit_with_parent,
                               initargs=(os.getpid(), poll))


def _exit_with_parent(parent: int, poll: float) -> None:
    def watch():
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def ratio(value: float, base: float | None) -> str:
    """``value / base`` as '1.23x', or 'n/a' without a positive base."""
    return f"{value / base:.2f}x" if base else "n/a"


def markdown_table(header: list[str], rows: list[list], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, 'l' or 'r' (missing letters: 'l')."""
    align = align.ljust(len(header), "l")
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment(device: torch.device | str, threads: int | None = None) -> list[str]:
    """Markdown list items: date, library versions and the device (CPU: cores and torch threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        where = (f"cpu ({platform.processor() or 'unknown'}; os.cpu_count()={os.cpu_count()}, "
                 f"{threads or torch.get_num_threads()} torch threads)")
    return [f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}",
            f"- device: {where}"]


