"""Smoke tests of ``python -m benchmarks.dequantization --quick`` and ``benchmarks/gpu_check.sh --smoke`` (CPU,
both of its tables)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}

pytestmark = pytest.mark.slow


def test_dequantization_quick_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.dequantization", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "dequantization_quick.md").read_text()
    assert (tmp_path / "dequantization_eps_quick.png").stat().st_size > 0
    rows = [r for r in text.splitlines() if r.startswith("| 1d |") or r.startswith("| 2d |") or r.startswith("| image |")]
    assert len(rows) == 3 * 2 * 3, text  # shapes × kinds × protocols
    # genuinely discrete data under the exact score: the truncated normal is within 0.01 bits of exact
    tn = [r for r in rows if "| discrete |" in r and "truncated normal" in r]
    assert all(abs(float(r.split("|")[9].split("±")[0])) < 0.01 for r in tn), tn
    assert "A toy-trained 3×8×8 model" in text and "| truncated normal | 4 |" in text
    # progress with an estimate of the time left, as plain lines (stderr is not a terminal here)
    assert "dequantization: protocol table: 18/18 (100%), " in proc.stderr


def test_gpu_check_smoke_runs_on_cpu():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=420,
                          env={**ENV, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| row | net | batch | order / protocol | ms/step | images/s | peak MiB | NFE | note |" in out
    for net in ("ddpmpp", "ncsnpp"):
        for what in ("order 1, -", "order 2, jvp", "order 2, vjp", "order 3, jvp", "order 3, vjp"):
            assert f"| train | {net} | 2 | {what} |" in out, (net, what)
        for what in ("| bpd | {} | 2 | uniform |", "| bpd | {} | 2 | truncated_normal |", "| sample | {} | 2 | - |"):
            assert what.format(net) in out
    assert "OOM" not in out
    # the CIFAR-shaped real-image run (photos32 at --quick sizes): its table
    assert "## photos32: [3, 32, 32], 256 grey levels" in out and "| + order 3 (Hutchinson) |" in out
