"""Smoke test of ``python -m benchmarks.real_images --quick``: every stage runs (pre-training in chunks,
three fine-tunes, bits/dim under three protocols, FID/KID, reference rows, the sample figure), the
table is consistent with its JSON, and a second run reuses every cached stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(runs: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.real_images", "--quick", "--threads", "1",
                           "--runs", str(runs)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_real_images_quick_run_and_its_resume(tmp_path):
    first = _run(tmp_path / "runs")
    out = tmp_path / "runs_quick" / "results"
    text = (out / "real_images.md").read_text()
    res = json.loads((out / "real_images.json").read_text())["results"]["digits"]
    assert res["levels"] == 17 and res["shape"] == [1, 8, 8]
    for tag in ("first-order pre-training (start)", "+ order 1 (control)", "+ order 2", "+ order 3 (Hutchinson)",
                "full-covariance Gaussian", "PNG (lossless, tiled)", "WebP lossless (tiled)"):
        assert f"| {tag} |" in text, tag
    rows = res["rows"]
    for tag in ("order2", "order3"):
        for col in ("uniform", "tn_k1", "tn_k8", "train_uniform"):
            # the paired Δ is the difference of the means (same points in every column)
            assert abs(rows[tag][col]["delta"] - (rows[tag][col]["mean"] - rows["control"][col]["mean"])) < 1e-9
    assert set(res["quality"]["models"]) == {"control", "order2", "order3"}
    assert Path(res["figure"]).is_file() and "[digits] pre step 8" in first.stdout
    # everything is cached: the second run trains nothing (no checkpoint rewritten, the recorded stage
    # seconds reported again) and prints the same table
    ckpts = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs_quick").rglob("*.ckpt")}
    _run(tmp_path / "runs")
    assert ckpts and {p: p.stat().st_mtime_ns for p in ckpts} == ckpts
    again = json.loads((out / "real_images.json").read_text())["results"]["digits"]
    assert again["seconds"] == res["seconds"] and res["seconds"]["order3"] > 0
    assert (out / "real_images.md").read_text().split("\n## ")[1].split("Seconds:")[0] == \
        text.split("\n## ")[1].split("Seconds:")[0]
