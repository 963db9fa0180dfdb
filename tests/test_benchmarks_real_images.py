"""Smoke test of ``python -m benchmarks.real_images --quick``: every stage runs (pre-training in chunks,
the control and three fine-tunes: the paper's order 2, flow matching, likelihood weighting; bits/dim
under three protocols, FID/KID, reference rows, the sample figure), the table is consistent with its
JSON, and a second run reuses every cached stage. And how a ``--base velocity`` run finds the paper's
recipe it is paired with."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import _images as im
from benchmarks import real_images

ROOT = Path(__file__).resolve().parents[1]

FINETUNES = ("order2", "fm2", "lw2")


def _run(runs: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.real_images", "--quick", "--threads", "1",
                           "--runs", str(runs), "--finetunes", *FINETUNES], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_real_images_quick_run_and_its_resume(tmp_path):
    first = _run(tmp_path / "runs")
    out = tmp_path / "runs_quick" / "results"
    text = (out / "real_images.md").read_text()
    res = json.loads((out / "real_images.json").read_text())["results"]["digits"]
    assert res["levels"] == 17 and res["shape"] == [1, 8, 8]
    for tag in ("first-order pre-training (start)", "+ order 1 (control)", "+ order 2", "+ fm2 (flow matching, λ₂ = 1/D)",
                "+ order 2, likelihood weighting, importance t",
                "full-covariance Gaussian", "PNG (lossless, tiled)", "WebP lossless (tiled)"):
        assert f"| {tag} |" in text, tag
    rows = res["rows"]
    for tag in FINETUNES:
        for col in ("uniform", "tn_k1", "tn_k8", "train_uniform"):
            # the paired Δ is the difference of the means (same points in every column)
            assert abs(rows[tag][col]["delta"] - (rows[tag][col]["mean"] - rows["control"][col]["mean"])) < 1e-9
            # and so is the Δ against the paper's recipe (order 2), for every other fine-tune
            assert ("delta_paper" in rows[tag][col]) == (tag != "order2")
            if tag != "order2":
                assert abs(rows[tag][col]["delta_paper"]
                           - (rows[tag][col]["mean"] - rows["order2"][col]["mean"])) < 1e-9
    assert "Paired against the paper's recipe (order 2 " in text
    assert set(res["quality"]["models"]) == {"control", *FINETUNES}
    assert Path(res["figure"]).is_file() and "[digits] pre step 8" in first.stdout
    # everything is cached: the second run trains nothing (no checkpoint rewritten, the recorded stage
    # seconds reported again) and prints the same table
    ckpts = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs_quick").rglob("*.ckpt")}
    _run(tmp_path / "runs")
    assert ckpts and {p: p.stat().st_mtime_ns for p in ckpts} == ckpts
    again = json.loads((out / "real_images.json").read_text())["results"]["digits"]
    assert again["seconds"] == res["seconds"] and res["seconds"]["lw2"] > 0
    assert (out / "real_images.md").read_text().split("\n## ")[1].split("Seconds:")[0] == \
        text.split("\n## ")[1].split("Seconds:")[0]


def _budgeted(argv: list[str], name: str) -> argparse.Namespace:
    args = real_images.parse(argv)
    return argparse.Namespace(**{**vars(args), **im.SETTINGS[name].get("budget", {})})


def test_a_velocity_base_is_paired_with_the_sigma2_runs_order2(tmp_path):
    """--base velocity trains in its own folder and reads the paper's recipe (order 2 of the sigma2 run of the
    same settings) from that run's cache, column by column at the same point counts."""
    args = _budgeted(["--runs", str(tmp_path), "--base", "velocity", "--finetunes", "order2", "fm2"], "photos")
    sigma2 = real_images.run_dir("photos", argparse.Namespace(**{**vars(args), "base": "sigma2"}))
    velocity = real_images.run_dir("photos", args)
    assert (sigma2.parent.name, velocity.parent.name) == ("photos", "photos-velocity")
    assert sigma2.name == velocity.name  # the base is not part of the settings hash: the folder says it
    evals = {"control": {"uniform": torch.tensor([1.0, 2.0, 3.0]), "tn_k8": torch.tensor([1.0])}}
    assert real_images.paper_evals("photos", args, evals) is None  # the sigma2 run has not evaluated order 2
    (sigma2 / "evals.json").write_text(json.dumps({"order2:uniform:3": [0.5, 1.5, 2.0], "order2:uniform:4": [9] * 4,
                                                   "control:tn_k8:1": [5.0]}))
    assert real_images.paper_evals("photos", args, evals) is None  # one column missing: no partial pairing
    (sigma2 / "evals.json").write_text(json.dumps({"order2:uniform:3": [0.5, 1.5, 2.0], "order2:uniform:4": [9] * 4,
                                                   "order2:tn_k8:1": [0.7]}))
    paper = real_images.paper_evals("photos", args, evals)
    assert paper["uniform"].tolist() == [0.5, 1.5, 2.0] and paper["tn_k8"].tolist() == [0.7]
    # the sigma2 run pairs with its own order 2
    own = {**evals, "order2": {"uniform": torch.zeros(3), "tn_k8": torch.zeros(1)}}
    assert real_images.paper_evals("photos", _budgeted(["--runs", str(tmp_path)], "photos"), own) is own["order2"]


def test_likelihood_weighted_fine_tunes_belong_to_the_sigma2_base(capsys):
    with pytest.raises(SystemExit) as err:
        real_images.parse(["--base", "velocity", "--finetunes", "order2", "lw1"])
    assert err.value.code == 2 and "--base velocity keeps its own weighting" in capsys.readouterr().err
