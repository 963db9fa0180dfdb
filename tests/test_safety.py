"""Training safety: no update with non-finite gradients, decided identically on every DDP rank.

This file is also the worker of the 2-process run: ``python tests/test_safety.py nanrank <out dir>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _dist import clean_env  # noqa: E402
from _exact import grouped  # noqa: E402

from hosm_lightning.core import ODEOptions  # noqa: E402

from hosm_lightning.data import SyntheticDataModule  # noqa: E402
from hosm_lightning.lit.module import HOSMModule  # noqa: E402
from hosm_lightning.nets import ToyScoreNet  # noqa: E402

TIMEOUT = 240


class _NaNNet(ToyScoreNet):
    """A toy net whose output turns NaN while ``broken`` is set."""

    broken = False

    def forward(self, x, t, sigma=None):
        out = super().forward(x, t)
        return out * float("nan") if self.broken else out


def _module(**kw):
    torch.manual_seed(0)
    return HOSMModule(net=_NaNNet(dim=1, encoder_width=16, embed_dim=8, decoder_width=32),
                      stages=[{"order": 1, "steps": 4}, {"order": 2}], **grouped(lambda2=0.5, val_likelihood=False, **kw))


def _dm():
    return SyntheticDataModule(name="mog1d", batch_size=16, steps_per_epoch=20, val_size=16, test_size=16)


def _trainer(root, steps, callbacks, **kw):
    return L.Trainer(max_steps=steps, default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
                     callbacks=callbacks, **kw)


def test_nan_gradients_with_a_finite_loss_never_reach_the_weights(tmp_path):
    """A NaN injected into one gradient (the loss stays finite) at step 5 — not a multiple of
    check_finite_every — stops training before the update; every checkpoint written stays finite."""

    class PoisonGrad(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 5:
                next(pl_module.parameters()).grad.view(-1)[0] = float("nan")

    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, save_last=True)
    import pytest

    with pytest.raises(FloatingPointError, match=r"step 5 \(stage 1, order 2\).*finite loss with non-finite gradients"):
        _trainer(tmp_path, 10, [ck, PoisonGrad()]).fit(_module(check_finite_every=100), _dm())
    files = sorted(tmp_path.glob("*.ckpt"))
    assert len(files) >= 5
    for f in files:
        state = torch.load(f, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), f.name


def test_nan_on_one_ddp_rank_stops_both_ranks(tmp_path):
    """A NaN in the network output of rank 1 only, at step 3 of a 2-process gloo run: both ranks stop
    with the same error within the timeout (a per-rank check would leave rank 0 in the all-reduce)."""
    import pytest

    proc = subprocess.Popen([sys.executable, __file__, "nanrank", str(tmp_path)], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    start = time.monotonic()
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"the DDP run hung (> {TIMEOUT} s)\n{err[-3000:]}")
    messages = {r: (tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").is_file() else None
                for r in (0, 1)}
    assert messages[0] is not None and messages[1] is not None, (messages, err[-3000:])
    assert "non-finite gradients at step 3" in messages[0]
    assert messages[0].split(":")[0] == messages[1].split(":")[0]  # same step, same stage, both ranks
    assert "dsm" in messages[1]  # the rank with the NaN batch names the term
    assert time.monotonic() - start < TIMEOUT


def _run_worker(args: list[str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_validation_counts_each_point_once_under_ddp(tmp_path):
    """val/nll of 5 points (not divisible by 2) with 2 processes equals the 1-process value: no padded
    points counted twice, and means weighted by the number of points each rank evaluated."""
    values = {}
    for devices in (1, 2):
        proc = _run_worker(["validate", str(devices), str(tmp_path)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        values[devices] = json.loads((tmp_path / f"val_{devices}.json").read_text())
    assert values[1]["n_points"] == 5 and values[2]["n_points"] == 5
    assert abs(values[1]["val/nll"] - values[2]["val/nll"]) < 1e-5, values
    # the padded mean (point 0 counted twice) would differ by far more than the tolerance
    assert abs(values[1]["padded"] - values[1]["val/nll"]) > 1e-3, values


def _validate_worker(devices: int, out: Path) -> None:
    torch.manual_seed(0)
    module = HOSMModule(net=ToyScoreNet(dim=1, encoder_width=16, embed_dim=8, decoder_width=32),
                        stages=[{"order": 1}], ode=ODEOptions(rtol=1e-7, atol=1e-7))
    dm = SyntheticDataModule(name="mog1d", batch_size=2, steps_per_epoch=2, val_size=5, test_size=5)
    counter = _CountPoints()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[counter])
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    n_points = trainer.strategy.reduce(torch.tensor(float(counter.n)), reduce_op="sum")
    if trainer.is_global_zero:
        dm.setup("validate")
        logp, _ = module.log_likelihood(dm._val.clone())
        padded = float(-torch.cat([logp, logp[:1]]).mean())  # DistributedSampler padding of 5 points on 2 ranks
        (out / f"val_{devices}.json").write_text(json.dumps({"val/nll": metrics["val/nll"], "n_points": int(n_points),
                                                             "padded": padded}))


class _CountPoints(L.Callback):
    def __init__(self):
        self.n = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.n += len(batch)


def _nanrank_worker(out: Path) -> None:
    class BreakRank1(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.net.broken = trainer.global_rank == 1 and trainer.global_step == 3

    trainer = _trainer(out, 8, [BreakRank1()], strategy="ddp", devices=2, enable_checkpointing=False)
    try:
        trainer.fit(_module(), _dm())
    except FloatingPointError as err:
        (out / f"rank{trainer.global_rank}.txt").write_text(str(err))
        sys.exit(3)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "nanrank":
    _nanrank_worker(Path(sys.argv[2]))
if __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == "validate":
    _validate_worker(int(sys.argv[2]), Path(sys.argv[3]))
