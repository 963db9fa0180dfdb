"""Smoke tests of benchmarks/synthetic.py and benchmarks/likelihood_speed.py (their --quick modes).

Each script runs as a subprocess into a temporary results folder; the tests check that the Markdown
tables and figures exist, have the expected rows, and that every NLL is a finite number.
"""

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["order 1, pre-training only", "order 1 (baseline)", "order 1 → 2 (staged)", "order 1 → 3 (staged)",
           "order 2 from scratch", "order 3 from scratch"]


def _run(script: str, out: Path, timeout: int) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith(f"| {first_cell}")]


def test_synthetic_quick(tmp_path):
    stdout = _run("synthetic.py", tmp_path, timeout=240)
    md = (tmp_path / "synthetic.md").read_text()
    assert "| dataset | method | order × steps | test NLL (nats) |" in md
    assert md.strip() in stdout  # the same table is printed
    for name in ("fig1_mog1d.png", "density_checkerboard.png", "density_swissroll.png"):
        png = tmp_path / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for dataset, entropy in (("mog1d", "-0.1289"), ("checkerboard", "3.4657"), ("swissroll", "n/a")):
        rows = _rows(md, dataset)
        assert [r[1] for r in rows] == METHODS, (dataset, rows)
        for r in rows:
            nll, se = float(r[3]), float(r[4])
            assert math.isfinite(nll) and math.isfinite(se) and se > 0, r
            assert r[5] == entropy, r
            assert r[7] == "(reference)" if r[1] == "order 1 (baseline)" else re.fullmatch(r"[+-][0-9.]+ ± [0-9.]+", r[7]), r
            assert int(r[8]) > 0, r  # NFE
    # order 1 → k staged runs really trained order k after the resume (not the checkpoint's stages)
    mog = {r[1]: float(r[3]) for r in _rows(md, "mog1d")}
    assert mog["order 1 → 2 (staged)"] != mog["order 1 (baseline)"] != mog["order 1 → 3 (staged)"]


def test_likelihood_speed_quick(tmp_path):
    stdout = _run("likelihood_speed.py", tmp_path, timeout=180)
    md = (tmp_path / "likelihood_speed.md").read_text()
    assert md.strip() in stdout
    assert "## Head to head at rtol = atol = 1e-5" in md and "## Tolerance sweep" in md
    assert re.search(r"Goal \(≥ 2× faster at equal or better accuracy\): \*\*(met|not met)\*\*", md)
    assert re.search(r"Agreement on the network, \|ours − scipy\| per point: mean [0-9.e+-]+", md)
    rows = _rows(md, "mixture") + _rows(md, "network")
    assert len(rows) == 2 * 2 + 2 * 2 * 2  # head to head (2 cases × 2) + sweep (2 tolerances × 2 cases × 2)
    tols = set()
    for r in rows:
        tols.add(r[1])
        assert r[2] in ("ours (torchdiffeq dopri5)", "scipy solve_ivp RK45"), r
        nll, nfe, secs, mae = float(r[3]), int(r[4]), float(r[5]), float(r[7])
        assert math.isfinite(nll) and nfe > 0 and secs > 0 and math.isfinite(mae), r
        if r[0].startswith("mixture") and r[1] == "1e-05":
            assert mae < 1e-3, r  # exact score: the ODE NLL matches the closed-form anchor
    assert tols == {"1e-03", "1e-05"}
