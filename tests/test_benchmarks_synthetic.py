"""Smoke tests of ``python -m benchmarks.synthetic``, ``benchmarks.likelihood_speed``,
``benchmarks.dsm3_weighting`` and ``benchmarks.recipes`` (their --quick modes).

Each benchmark runs as a subprocess into a temporary results folder; the tests check that the Markdown
tables and figures exist, have the expected rows, and that every NLL is a finite number.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["order 1 (control)", "order 1 → 2", "order 1 → 3 (exact)"]

pytestmark = pytest.mark.slow


def _run(module: str, out: Path, timeout: int, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith(f"| {first_cell}")]


def test_synthetic_quick(tmp_path):
    """The paper's protocol end to end at toy scale: pre-training, fine-tunes from its checkpoint,
    paired table, diagnostics and the KL identity for the mixtures, figures."""
    stdout = _run("synthetic", tmp_path, 600, "--datasets", "mog1d,gmm2d,checkerboard")
    md = (tmp_path / "synthetic.md").read_text()
    assert md.strip() in stdout  # the same report is printed
    assert "| dataset | method | test NLL ± s.e. | KL (nats) ± s.e. | Δ vs control ± s.e. |" in md
    for name in ("fig1_mog1d.png", "density_gmm2d.png", "density_checkerboard.png", "diagnostics_mog1d.png",
                 "diagnostics_gmm2d.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for dataset in ("mog1d", "gmm2d", "checkerboard"):
        rows = [r for r in _rows(md, dataset)  # the main table's rows (9 columns), not the gradient-norm table's
                if len(r) == 9 and r[1] in METHODS + ["order 1 → 3 (Hutchinson)"]]
        expected = METHODS + ([] if dataset == "mog1d" else ["order 1 → 3 (Hutchinson)"])
        assert sorted(r[1] for r in rows) == sorted(expected), (dataset, rows)
        for r in rows:
            nll, se = (float(v) for v in r[2].split(" ± "))
            assert math.isfinite(nll) and se > 0, r
            kl = r[3]
            assert re.fullmatch(r"-?[0-9.]+ ± [0-9.]+", kl), r  # exact density known for all three
            assert r[4] == "(control)" if r[1] == METHODS[0] else re.fullmatch(r"[+-][0-9.]+ ± [0-9.]+", r[4]), r
    # the fine-tunes really trained their own objective (different weights → different NLL)
    mog = {r[1]: r[2] for r in _rows(md, "mog1d") if len(r) == 9}
    assert len({mog[m] for m in METHODS}) == 3
    assert "## mog1d: the KL identity" in md and "## gmm2d: the KL identity" in md
    data = json.loads((tmp_path / "synthetic.json").read_text())
    assert set(data["mog1d"]["identity"]) == {"o1", "o3"}


def test_synthetic_sweep_quick(tmp_path):
    stdout = _run("synthetic", tmp_path, 600, "--sweep")
    md = (tmp_path / "sweep.md").read_text()
    assert md.strip() in stdout
    rec = json.loads((tmp_path / "sweep.json").read_text())["recipe"]
    assert set(rec) == {"lr", "lambda3", "steps", "ema_decay", "warmup"}
    assert "**Chosen recipe**" in md
    orders = {r[0] for r in _rows(md, "1") + _rows(md, "2") + _rows(md, "3") if len(r) == 7}  # the KL table
    assert orders == {"1", "2", "3"}
    assert "none" in md  # the no-clipping run is in the table


def test_likelihood_speed_quick(tmp_path):
    stdout = _run("likelihood_speed", tmp_path, timeout=180)
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


def test_dsm3_weighting_quick(tmp_path):
    """benchmarks.dsm3_weighting at toy scale: every variant trained from the same checkpoint and
    evaluated on the same points (a finite KL per row, paired differences where they apply)."""
    stdout = _run("dsm3_weighting", tmp_path, 600)
    md = (tmp_path / "dsm3_weighting.md").read_text()
    assert md.strip() in stdout
    rows = [r for r in _rows(md, "order")]
    assert [r[0] for r in rows] == ["order 1 (control)", "order 2", "order 3, λ₃ 0.02 (recipe)", "order 3, λ₃ 0.02, σ_c 1",
                                    "order 3, λ₃ 0.1, σ_c 1", "order 3, λ₃ 0.1, σ_c 0.1", "order 3, λ₃ 0.5, σ_c 0.1"]
    for r in rows:
        assert math.isfinite(float(r[1].split("±")[0])), r
    assert rows[0][2] == "—" and rows[1][3] == "—" and rows[3][3] != "—"


def test_recipes_quick(tmp_path):
    """The recipe comparison end to end at toy scale: three first-order bases on the VP SDE, each with its
    control and fine-tunes; every KL finite and every paired Δ consistent with the KLs it pairs."""
    stdout = _run("recipes", tmp_path, 600)
    md = (tmp_path / "recipes.md").read_text()
    assert md.strip() in stdout
    data = json.loads((tmp_path / "recipes.json").read_text())
    bases, methods = ("sigma2", "likelihood", "velocity"), {"mog1d": ("o1", "dsm2", "dsm3", "fm2"),
                                                             "gmm2d": ("o1", "dsm2", "fm2")}
    assert set(data) == {f"{d}/{b}/{m}" for d, ms in methods.items() for b in bases for m in ms}
    for key, row in data.items():
        d, b, m = key.split("/")
        kl, se = row["kl"]
        assert math.isfinite(kl) and se > 0 and row["s_per_step"] > 0 and row["nfe"] > 0, key
        control, paper = data[f"{d}/{b}/o1"]["kl"][0], data[f"{d}/sigma2/dsm2"]["kl"][0]
        # Δ = mean(log p_ref − log p) = KL − KL_ref on the same points: the pairing adds no offset
        assert (row["delta_control"] is None) == (m == "o1"), key
        if m != "o1":
            assert row["delta_control"][0] == pytest.approx(kl - control, abs=1e-9), key
        assert (row["delta_paper"] is None) == (key == f"{d}/sigma2/dsm2"), key
        if row["delta_paper"] is not None:
            assert row["delta_paper"][0] == pytest.approx(kl - paper, abs=1e-9), key
    # each base really trained its own first-order recipe: the three controls differ
    for d in methods:
        assert len({data[f"{d}/{b}/o1"]["kl"][0] for b in bases}) == 3, d
    assert "First-order pre-training (plateau check)" in md and "| velocity parameterisation" in md
