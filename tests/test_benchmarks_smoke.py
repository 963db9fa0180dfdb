"""Smoke tests of the timing benchmarks ``python -m benchmarks.step_cost`` and ``benchmarks.unet_step``:
the quick runs finish (one fresh worker process per row on the CPU) and print the full tables."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(module: str, *args: str) -> str:
    # One thread: with other jobs on the machine, OpenMP oversubscription makes timings (and the
    # run time of this test) erratic; the quick run only checks that everything executes.
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--threads", "1", "--device", "cpu", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_step_cost_quick_runs():
    out = _run("benchmarks.step_cost")
    assert "| case | divergence | order | ms/step | time ratio to order 1 | peak MiB | memory ratio to order 1" in out
    assert "- memory: fresh worker process per row" in out
    rows = [line for line in out.splitlines() if line.startswith("| mlp") or line.startswith("| conv")]
    for case, div in [("mlp", "exact"), ("mlp", "hutchinson"), ("conv", "hutchinson")]:
        orders = {int(r.split("|")[3]) for r in rows if r.startswith(f"| {case}") and f"| {div} |" in r}
        assert orders == {1, 2, 3}, (case, div, out)
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[3]) > 0 and re.fullmatch(r"[0-9.]+x", cells[4]), r
        if cells[2] == "1":
            assert cells[4] == "1.00x", r  # each case's order 1 is its own reference


def test_unet_step_quick_runs():
    out = _run("benchmarks.unet_step", "--nets", "ddpmpp", "--reps", "1", "--warmup", "0")
    rows = [line for line in out.splitlines() if line.startswith("| ddpmpp")]
    assert [int(r.split("|")[4]) for r in rows] == [1, 2, 3], out
    for r in rows:
        ms, img_s = float(r.split("|")[5]), float(r.split("|")[6])
        assert ms > 0 and abs(img_s - 2 / ms * 1e3) < 0.01 * img_s, r  # batch 2 / median step time
