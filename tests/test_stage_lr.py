"""Per-stage learning rates and per-term gradient norms (issue 9: the fine-tuning recipe in one run)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from hosm_lightning.core import VESDE, dsm_losses
from hosm_lightning.data import SyntheticDataModule
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.lit.stages import lr_factor, validate_stages
from hosm_lightning.nets import ToyScoreNet

from _exact import grouped  # noqa: E402


def _module(stages, **kw):
    torch.manual_seed(0)
    net = ToyScoreNet(dim=1, encoder_width=16, embed_dim=8, decoder_width=32)
    return HOSMModule(net=net, stages=stages, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                      **grouped(lambda2=0.5, lambda3=0.1, val_likelihood=False, **kw))


class _Record(Callback):
    """Learning rate actually used by each optimizer step, and the logged metrics after each step."""

    def __init__(self):
        self.lrs, self.metrics = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _fit(module, steps, tmp_path, rec):
    dm = SyntheticDataModule(name="mog1d", batch_size=16, steps_per_epoch=steps, val_size=16, test_size=16)
    trainer = L.Trainer(max_steps=steps, default_root_dir=tmp_path, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[rec], enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)


def test_per_stage_learning_rate(tmp_path):
    rec = _Record()
    module = _module([{"order": 1, "steps": 3}, {"order": 2, "steps": 2, "lr": 2e-4}, {"order": 1, "lr": 5e-5}])
    _fit(module, 7, tmp_path, rec)
    assert rec.lrs == pytest.approx([1e-3] * 3 + [2e-4] * 2 + [5e-5] * 2)


def test_stage_lr_with_warmup_and_resume_factor():
    stages = validate_stages([{"order": 1, "steps": 4}, {"order": 2, "lr": 1e-4}])
    assert lr_factor(stages, 0, 1e-3, warmup_steps=4) == pytest.approx(0.25)
    assert lr_factor(stages, 3, 1e-3, warmup_steps=4) == pytest.approx(1.0)
    assert lr_factor(stages, 4, 1e-3, warmup_steps=4) == pytest.approx(0.1)
    assert lr_factor(stages, 100, 1e-3) == pytest.approx(0.1)


def test_bad_stage_lr():
    with pytest.raises(ValueError, match=r"stages\[1\].lr must be > 0"):
        validate_stages([{"order": 1, "steps": 2}, {"order": 2, "lr": 0.0}])


def test_grad_norms_per_term(tmp_path):
    """train/grad_norm_dsm1..3 are the norms of the gradients of each unweighted term, computed
    independently here from the same batch and the same (t, z, v)."""
    rec = _Record()
    module = _module([{"order": 3}], grad_norm_every=2)
    _fit(module, 3, tmp_path, rec)
    logged = rec.metrics[0]
    assert {"train/grad_norm_dsm1", "train/grad_norm_dsm2", "train/grad_norm_dsm3"} <= set(logged)
    # step 1 is not a multiple of 2: nothing new is logged there, and step 2 logs again
    assert rec.metrics[2]["train/grad_norm_dsm3"] != logged["train/grad_norm_dsm3"]
    # recompute step 0 by hand from the initial weights
    fresh = _module([{"order": 3}])
    dm = SyntheticDataModule(name="mog1d", batch_size=16, steps_per_epoch=3, val_size=16, test_size=16)
    x0 = next(iter(dm.train_dataloader()))
    gen = fresh.generator("train", 0, 0)
    terms = dsm_losses(fresh.score_model, x0, VESDE(), order=3, eps=fresh.eps, generator=gen, divergence="auto")
    for k in ("dsm1", "dsm2", "dsm3"):
        grads = torch.autograd.grad(terms[k].mean(), list(fresh.parameters()), retain_graph=True, allow_unused=True)
        norm = torch.stack([g.norm() for g in grads if g is not None]).norm()
        assert logged[f"train/grad_norm_{k}"] == pytest.approx(float(norm), rel=1e-4), k


def test_grad_norm_every_rejects_negative():
    with pytest.raises(ValueError, match="grad_norm_every"):
        _module([{"order": 1}], grad_norm_every=-1)
