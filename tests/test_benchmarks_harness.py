"""The benchmarks' shared harness (benchmarks/_harness.py): timed repeats, peak memory, worker
processes per row and Markdown tables."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks._harness import PeakMemory, markdown_table, ratio, run_rows, timed


def test_timed_skips_the_warm_up_and_keeps_the_last_result():
    calls = []

    def fn():
        calls.append(len(calls))
        if len(calls) <= 2:
            time.sleep(0.05)  # slow warm-up calls must not reach the timings
        return len(calls)

    t = timed(fn, repeats=3, warmup=2)
    assert len(calls) == 5 and t.result == 5
    assert len(t.seconds) == len(t.cpu_seconds) == 3
    assert max(t.seconds) < 0.04 and t.fastest <= t.median <= max(t.seconds)
    with pytest.raises(ValueError):
        timed(fn, repeats=0)


def test_ratio_and_table():
    assert ratio(3.0, 1.5) == "2.00x" and ratio(1.0, 0.0) == "n/a" and ratio(1.0, None) == "n/a"
    table = markdown_table(["a", "b", "c"], [[1, "x", 2.5]], "lr")
    assert table.splitlines() == ["| a | b | c |", "|---|---:|---|", "| 1 | x | 2.5 |"]


def test_peak_memory_sees_an_allocation_on_the_cpu():
    memory = PeakMemory("cpu").start()
    x = torch.ones(16 * 2**20)  # 64 MiB, touched
    assert float(x[-1]) == 1.0
    del x
    assert memory.peak_mib() > 50, memory.method


@pytest.mark.slow
def test_run_rows_runs_each_row_in_a_fresh_process():
    pids = run_rows(os.getpid, [(), ()], isolate=True)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert run_rows(os.getpid, [()], isolate=False) == [os.getpid()]


_ORPHAN = """
import os, time
from benchmarks._harness import worker_pool
pool = worker_pool(1, poll=0.2)
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 120)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()  # a zombie has exited; nobody may reap it here
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_worker_pool_workers_exit_with_their_parent():
    """A benchmark killed outright (SIGKILL: no cleanup runs) leaves no worker behind."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN], cwd=root, stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    try:
        time.sleep(0.5)
        assert _running(worker)  # busy with its two-minute job
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker)
    finally:
        proc.kill()
        if _running(worker):
            os.kill(worker, 9)
