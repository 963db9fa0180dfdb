"""The Lightning layer: staged objective, EMA, resume, non-finite guard, checkpoints."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from hosm_lightning.cli import load_weights
from hosm_lightning.core import VESDE, VPSDE
from hosm_lightning.data import SyntheticDataModule
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.lit.stages import Stage, stage_at, validate_stages
from hosm_lightning.nets import ToyScoreNet

from _exact import grouped  # noqa: E402

STAGES = [Stage(order=1, steps=3), Stage(order=2, steps=3), Stage(order=3)]


def _small_net(dim=1):
    return ToyScoreNet(dim=dim, encoder_width=16, embed_dim=8, decoder_width=32)


def _module(**kw):
    torch.manual_seed(0)
    args = dict(net=_small_net(), stages=STAGES, lambda2=0.5, lambda3=0.1, rtol=1e-3, atol=1e-3)
    args.update(kw)
    return HOSMModule(**grouped(**args))


def _trainer(root, max_steps, callbacks=(), **kw):
    args = dict(
        max_steps=max_steps, default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0, num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(callbacks=list(callbacks), **args)


def _dm():
    return SyntheticDataModule(name="mog1d", batch_size=32, steps_per_epoch=5, val_size=32, test_size=32)


def test_stage_schedule():
    stages = validate_stages([{"order": 1, "steps": 3}, {"order": 2, "steps": 2}, {"order": 3}])
    assert [stage_at(stages, s)[1].order for s in range(8)] == [1, 1, 1, 2, 2, 3, 3, 3]
    bounded = validate_stages([{"order": 2, "steps": 2}, {"order": 1, "steps": 2}])
    assert [stage_at(bounded, s)[1].order for s in range(6)] == [2, 2, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "stages,match",
    [
        ([], "at least one"),
        ([{"order": 4}], r"stages\[0\].order"),
        ([{"order": 1, "steps": 0}, {"order": 2}], r"stages\[0\].steps must be > 0"),
        ([{"order": 1}, {"order": 2}], r"stages\[0\].steps is required"),
    ],
)
def test_bad_stages(stages, match):
    with pytest.raises(ValueError, match=match):
        validate_stages(stages)


@pytest.mark.parametrize(
    "kw,match",
    [({"lambda2": -1.0}, "lambda2"), ({"lambda3": -0.1}, "lambda3"), ({"eps": 0.0}, "eps"), ({"eps": 1.5}, "eps"),
     ({"divergence": "nope"}, "divergence"), ({"parameterization": "x0"}, "parameterization")],
)
def test_bad_module_config(kw, match):
    with pytest.raises(ValueError, match=match):
        _module(**kw)


def test_data_dimension_mismatch_fails_before_training(tmp_path):
    model = _module(net=_small_net(dim=2))
    with pytest.raises(ValueError, match="dim"):
        _trainer(tmp_path, 2).fit(model, _dm())
    assert model.global_step == 0


def test_training_follows_stages_and_logs(tmp_path):
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            seen.append((int(m["train/order"]), sorted(k for k in m if k.startswith("train/dsm"))))

    _trainer(tmp_path, 7, [Record()], log_every_n_steps=1).fit(_module(), _dm())
    assert [o for o, _ in seen] == [1, 1, 1, 2, 2, 2, 3]
    assert seen[-1][1] == ["train/dsm1", "train/dsm2", "train/dsm3"]


class _Crash(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated interruption")


def _final_state(trainer, model):
    ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.clone() for p in ema._average_model.parameters()]


def test_resume_mid_stage_matches_uninterrupted_run(tmp_path):
    """Interrupted at step 5 (stage 2, order 2), resumed from last.ckpt (step 4): same step
    counter, stage, EMA and data stream, and the same final weights as an uninterrupted run."""
    ck = lambda d: ModelCheckpoint(dirpath=d, every_n_train_steps=2, save_last=True, save_top_k=-1)  # noqa: E731
    ref_model = _module()
    ref = _trainer(tmp_path / "ref", 9, [EMAWeightAveraging(decay=0.9), ck(tmp_path / "ref")])
    ref.fit(ref_model, _dm())
    ref_weights, ref_ema = _final_state(ref, ref_model)

    crashed = _trainer(tmp_path / "run", 9, [EMAWeightAveraging(decay=0.9), ck(tmp_path / "run"), _Crash(5)])
    with pytest.raises(RuntimeError, match="simulated"):
        crashed.fit(_module(), _dm())
    last = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and stage_at(STAGES, last["global_step"])[1].order == 2

    model = _module()
    resumed = _trainer(tmp_path / "run", 9, [EMAWeightAveraging(decay=0.9), ck(tmp_path / "run")])
    resumed.fit(model, _dm(), ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    assert resumed.global_step == 9
    weights, ema = _final_state(resumed, model)
    for k in ref_weights:
        torch.testing.assert_close(weights[k], ref_weights[k], msg=k)
    for a, b in zip(ema, ref_ema):
        torch.testing.assert_close(a, b)


class _NaNNet(torch.nn.Module):
    """A small net that starts returning NaN once ``broken`` is set."""

    def __init__(self):
        super().__init__()
        self.inner, self.dim, self.broken = _small_net(), 1, False

    def forward(self, x, t, sigma=None):
        out = self.inner(x, t)
        return out * float("nan") if self.broken else out


def test_non_finite_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path):
    class Break(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 4:
                pl_module.net.broken = True

    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    with pytest.raises(FloatingPointError, match=r"step 4 \(stage 1, order 2\).*dsm1") as err:
        _trainer(tmp_path, 9, [ck, Break()]).fit(_module(net=_NaNNet()), _dm())
    assert "resume" in str(err.value)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_checkpoint_loading_checks(tmp_path):
    _trainer(tmp_path, 2, [ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(_module(), _dm())
    path = tmp_path / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)  # plain tensors and primitives only
    assert not any(k.startswith("net.") for k in ckpt["state_dict"])  # the net is stored once
    fresh = _module()
    load_weights(fresh, path)
    torch.testing.assert_close(fresh.state_dict(), ckpt["state_dict"])
    with pytest.raises(ValueError, match="shape mismatches"):
        load_weights(_module(net=ToyScoreNet(dim=1, encoder_width=8, embed_dim=8, decoder_width=8)), path)
    with pytest.raises(ValueError, match="VPSDE"):
        load_weights(_module(sde=VPSDE()), path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt"):
        load_weights(_module(), bad)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_weights(_module(), tmp_path / "nothere.ckpt")
    assert isinstance(_module().sde, VESDE)


def test_init_from_lightning_checkpoint_weights_only(tmp_path):
    """init_from loads the (EMA or raw) weights, not the optimizer or the step counter."""
    _trainer(tmp_path, 3, [EMAWeightAveraging(decay=0.5), ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(
        _module(), _dm())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert any(not torch.equal(saved["state_dict"][k], saved["current_model_state"][k]) for k in saved["state_dict"])

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.step = trainer.global_step

    for ema, key in ((True, "state_dict"), (False, "current_model_state")):
        probe = AtStart()
        model = _module(init_from=str(tmp_path / "last.ckpt"), init_from_ema=ema, stages=[Stage(order=2)])
        _trainer(tmp_path / f"ft{ema}", 1, [probe]).fit(model, _dm())
        torch.testing.assert_close(probe.state, saved[key])
        assert probe.step == 0


def test_unet_configuration_checks():
    from hosm_lightning.nets import DDPMpp, NCSNpp

    tiny = dict(image_size=8, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    with pytest.raises(ValueError, match="parameterization: score"):
        HOSMModule(net=NCSNpp(**tiny), sde=VESDE(), parameterization="eps")
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        HOSMModule(net=DDPMpp(**tiny, checkpoint_blocks=True), sde=VPSDE(), stages=[Stage(1, 5), Stage(3)])
    HOSMModule(net=DDPMpp(**tiny, checkpoint_blocks=True), sde=VPSDE(), stages=[Stage(1)])  # order 1: fine
    HOSMModule(net=NCSNpp(**tiny), sde=VESDE(), parameterization="score")
