"""The `diagnose` subcommand: score diagnostics of several checkpoints on one figure."""

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from hosm_lightning.cli import main
from hosm_lightning.core import VESDE
from hosm_lightning.data import SyntheticDataModule
from hosm_lightning.lit.diagnose import band_integrals
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.lit.options import FitOptions
from hosm_lightning.nets import ToyScoreNet

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(path: Path, steps: int, dim: int = 1) -> Path:
    torch.manual_seed(0)
    model = HOSMModule(net=ToyScoreNet(dim=dim), sde=VESDE(), stages=[{"order": 1}], fit=FitOptions(val_likelihood=False))
    dm = SyntheticDataModule(name="mog1d" if dim == 1 else "checkerboard", batch_size=64, steps_per_epoch=steps, val_size=16, test_size=16)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=path.parent)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(path)
    return path


def test_diagnose_two_checkpoints(tmp_path, capsys):
    a = _checkpoint(tmp_path / "a.ckpt", 5)
    b = _checkpoint(tmp_path / "b.ckpt", 40)
    out = tmp_path / "diag"
    main(["diagnose", "--config", str(ROOT / "configs" / "mog1d.yaml"), f"--trainer.default_root_dir={tmp_path / 'run'}",
          "--ckpt_path", str(a), "--compare", json.dumps([str(b)]), "--labels", json.dumps(["short", "longer"]),
          "--num_times", "3", "--num_points", "16", "--identity_points", "32", "--rtol", "1e-3", "--out_dir", str(out)])
    res = json.loads((out / "diagnose.json").read_text())
    assert list(res["reports"]) == ["short", "longer"]
    for rep in res["reports"].values():
        assert len(rep["t"]) == 3 and rep["n"] == 16
        for key in ("first_order", "self_gap", "fisher", "kl_integrand"):
            assert all(math.isfinite(v) for v in rep[key]), key
        assert rep["first_order"][0] > 0  # a briefly trained network is not the exact score
        assert len(rep["bands"]) == 3
    assert res["reports"]["short"]["first_order"] != res["reports"]["longer"]["first_order"]
    assert set(res["identity"]) == {"short", "longer"}
    assert (out / "diagnose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| short |" in printed and "| longer |" in printed and "KL identity" in printed


def test_band_integrals_trapezoid():
    rep = {"t": [0.0, 0.5, 1.0], "sigma": [0.01, 0.5, 50.0], "kl_integrand": [2.0, 2.0, 2.0]}
    # ½ ∫ 2 dt over [0, 1] = 1, split at the segment midpoints σ = √(0.01·0.5) ≈ 0.07 and √(0.5·50) = 5
    assert band_integrals(rep) == pytest.approx([0.5, 0.0, 0.5])


def test_diagnose_needs_an_exact_density(tmp_path):
    ckpt = _checkpoint(tmp_path / "cb.ckpt", 2, dim=2)
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "diagnose", "--config",
                           str(ROOT / "configs" / "checkerboard.yaml"), f"--trainer.default_root_dir={tmp_path}",
                           "--ckpt_path", str(ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hosm-lightning: error:") and "exact density" in last, proc.stderr
