"""1 vs 2 DDP processes (gloo, CPU, loopback) give the same test/bpd_tn and test/bpd_uniform
(per-sample seeds for the truncated-normal noise and probes; GitHub issue 12).

This file is also the worker script of the 2-process run:

    python tests/test_ddp_tn.py bpd <devices> <out dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist import clean_env  # noqa: E402
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from hosm_lightning.core.sde import VPSDE  # noqa: E402
from hosm_lightning.data import DiscreteDataModule  # noqa: E402
from hosm_lightning.lit.evaluation import LikelihoodEvaluator  # noqa: E402
from hosm_lightning.lit.module import HOSMModule  # noqa: E402
from hosm_lightning.nets import ToyScoreNet  # noqa: E402

TEST_SIZE = 7  # not divisible by 2: the sampler pads
TOL = 1e-7


def _bpd_run(devices: int, out: Path) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same (untrained) weights in every process
    model = HOSMModule(ToyScoreNet(dim=1, encoder_width=16, embed_dim=8, decoder_width=32), sde=VPSDE())
    evaluator = LikelihoodEvaluator(dequantization=["uniform", "truncated_normal"], num_importance=2,
                                    ode={"rtol": TOL, "atol": TOL, "divergence": "exact"}, per_sample_path=str(out / f"bpd_{devices}proc.npz"))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[evaluator], default_root_dir=str(out))
    dm = DiscreteDataModule(shape="1d", test_size=TEST_SIZE, eval_batch_size=3)
    metrics = trainer.test(model, dm, verbose=False)[0]
    record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "results": evaluator.results,
              "logged": {k: float(v) for k, v in metrics.items()}}
    (out / f"bpd_{devices}proc_rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=2))
    return record


def test_ddp_bpd_tn_equals_single_process(tmp_path):
    import subprocess

    import numpy as np

    one = _bpd_run(1, tmp_path)
    proc = subprocess.run([sys.executable, __file__, "bpd", "2", str(tmp_path)], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=240, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"bpd_2proc_rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for tag in ("test/bpd_tn", "test/bpd_tn_se", "test/bpd_uniform", "test/bpd"):
        a, b = one["logged"][tag], ranks[0]["logged"][tag]
        assert abs(a - b) < 1e-5, (tag, a, b)
        assert ranks[1]["logged"][tag] == b
    assert one["results"]["test"]["n"] == ranks[0]["results"]["test"]["n"] == TEST_SIZE
    p1, p2 = np.load(tmp_path / "bpd_1proc.npz"), np.load(tmp_path / "bpd_2proc.npz")
    assert p1["index"].tolist() == p2["index"].tolist() == list(range(TEST_SIZE))
    np.testing.assert_allclose(p1["value_tn"], p2["value_tn"], atol=5e-5)
    np.testing.assert_allclose(p1["value_uniform"], p2["value_uniform"], atol=5e-5)
    # the two protocols used different noise and give different numbers
    assert abs(one["logged"]["test/bpd_tn"] - one["logged"]["test/bpd_uniform"]) > 1e-3


if __name__ == "__main__":
    if sys.argv[1] != "bpd":
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
    _bpd_run(int(sys.argv[2]), Path(sys.argv[3]))
