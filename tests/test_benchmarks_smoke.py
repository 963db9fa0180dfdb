"""Smoke test of benchmarks/step_cost.py: the quick run finishes and prints the full table."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_cost_quick_runs():
    # One thread: with other jobs on the machine, OpenMP oversubscription makes timings (and the
    # run time of this test) erratic; the quick run only checks that everything executes.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--quick", "--threads", "1", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "| case | divergence | order | ms/step | time ratio to order 1 | peak MiB | memory ratio to order 1" in out
    rows = [line for line in out.splitlines() if line.startswith("| mlp") or line.startswith("| conv")]
    for case, div in [("mlp", "exact"), ("mlp", "hutchinson"), ("conv", "hutchinson")]:
        orders = {int(r.split("|")[3]) for r in rows if r.startswith(f"| {case}") and f"| {div} |" in r}
        assert orders == {1, 2, 3}, (case, div, out)
    for r in rows:
        ms = float(r.split("|")[4])
        assert ms > 0 and re.search(r"\| [0-9.]+x \|", r), r
