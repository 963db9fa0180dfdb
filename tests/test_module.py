"""The LightningModule: staged objective, per-stage learning rates, logging, resume, the non-finite
guard, configuration checks and checkpoints."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from hosm_lightning.core import VESDE, VPSDE, HOSMObjective, SettingsError
from hosm_lightning.checkpoints import load_weights
from hosm_lightning.lit.ema import HOSMEMA
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.core.stages import Stage, lr_factor, stage_at, validate_stages
from hosm_lightning.nets import DDPMpp, NCSNpp, ToyScoreNet

from helpers import LinearSigmaSDE, tiny_data, tiny_module, tiny_net, tiny_trainer

STAGES = [Stage(order=1, steps=3), Stage(order=2, steps=3), Stage(order=3)]


class _Record(Callback):
    """Learning rate of every optimizer step and the logged metrics after every step."""

    def __init__(self):
        self.lrs, self.metrics = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


# -- stages -------------------------------------------------------------------------------------
def test_stage_schedule():
    stages = validate_stages([{"order": 1, "steps": 3}, {"order": 2, "steps": 2}, {"order": 3}])
    assert [stage_at(stages, s)[1].order for s in range(8)] == [1, 1, 1, 2, 2, 3, 3, 3]
    bounded = validate_stages([{"order": 2, "steps": 2}, {"order": 1, "steps": 2}])
    assert [stage_at(bounded, s)[1].order for s in range(6)] == [2, 2, 1, 1, 1, 1]


@pytest.mark.parametrize("stages,match", [
    ([], "at least one"),
    ([{"order": 4}], r"stages\[0\].order"),
    ([{"order": 1, "steps": 0}, {"order": 2}], r"stages\[0\].steps must be > 0"),
    ([{"order": 1}, {"order": 2}], r"stages\[0\].steps is required"),
    ([{"order": 1, "steps": 2}, {"order": 2, "lr": 0.0}], r"stages\[1\].lr must be > 0"),
])
def test_bad_stages(stages, match):
    with pytest.raises(ValueError, match=match):
        validate_stages(stages)


def test_training_follows_stages_and_logs(tmp_path):
    rec = _Record()
    tiny_trainer(tmp_path, 7, [rec], log_every_n_steps=1).fit(tiny_module(stages=STAGES), tiny_data())
    assert [int(m["train/order"]) for m in rec.metrics] == [1, 1, 1, 2, 2, 2, 3]
    assert sorted(k for k in rec.metrics[-1] if k.startswith("train/dsm")) == ["train/dsm1", "train/dsm2", "train/dsm3"]
    assert {"train/loss", "train/grad_norm", "train/lr", "train/stage"} <= set(rec.metrics[-1])


def test_per_stage_learning_rate(tmp_path):
    rec = _Record()
    module = tiny_module(stages=[{"order": 1, "steps": 3}, {"order": 2, "steps": 2, "lr": 2e-4}, {"order": 1, "lr": 5e-5}],
                         optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), fit={"val_likelihood": False})
    tiny_trainer(tmp_path, 7, [rec]).fit(module, tiny_data(batch_size=16, steps_per_epoch=7))
    assert rec.lrs == pytest.approx([1e-3] * 3 + [2e-4] * 2 + [5e-5] * 2)


def test_stage_lr_with_warmup_factor():
    stages = validate_stages([{"order": 1, "steps": 4}, {"order": 2, "lr": 1e-4}])
    assert lr_factor(stages, 0, 1e-3, warmup_steps=4) == pytest.approx(0.25)
    assert lr_factor(stages, 3, 1e-3, warmup_steps=4) == pytest.approx(1.0)
    assert lr_factor(stages, 4, 1e-3, warmup_steps=4) == pytest.approx(0.1)
    assert lr_factor(stages, 100, 1e-3) == pytest.approx(0.1)


# -- what a step computes and logs ----------------------------------------------------------------
def test_step_loss_is_the_objective_of_the_step_generator(tmp_path):
    """train/loss of step 0 is the mean per-sample objective (3.5) of the first batch with the (t, z, v) of
    the generator derived from (seed, rank 0, 'train', step 0, batch 0), and train/grad_norm is the norm of
    the concatenated gradient (Lightning's grad_norm)."""
    rec = _Record()
    module = tiny_module(stages=[{"order": 3}], fit={"val_likelihood": False})
    fresh = tiny_module(stages=[{"order": 3}])
    dm = tiny_data(batch_size=16, steps_per_epoch=2)
    tiny_trainer(tmp_path, 1, [rec], log_every_n_steps=1, gradient_clip_val=None).fit(module, dm)
    x0 = next(iter(tiny_data(batch_size=16, steps_per_epoch=2).train_dataloader()))  # stream key (seed, rank 0, epoch 0)
    loss, terms = fresh.objective(fresh.score_model, fresh.sde, x0, 3, fresh.generator("train", 0, 0))
    assert rec.metrics[0]["train/loss"] == pytest.approx(float(loss.mean().detach()), rel=1e-6)
    assert rec.metrics[0]["train/dsm3"] == pytest.approx(float(terms.dsm3.mean()), rel=1e-6)
    loss.mean().backward()
    flat = torch.cat([p.grad.flatten() for p in fresh.parameters() if p.grad is not None])
    assert rec.metrics[0]["train/grad_norm"] == pytest.approx(float(flat.norm()), rel=1e-5)


def test_grad_norms_per_term(tmp_path):
    """train/grad_norm_dsm1..3 are the norms of the gradients of each unweighted term, recomputed here
    from the same batch and the same (t, z, v)."""
    rec = _Record()
    module = tiny_module(stages=[{"order": 3}], fit={"grad_norm_every": 2, "val_likelihood": False})
    dm = tiny_data(batch_size=16, steps_per_epoch=3)
    tiny_trainer(tmp_path, 3, [rec], log_every_n_steps=1).fit(module, dm)
    logged = rec.metrics[0]
    assert {"train/grad_norm_dsm1", "train/grad_norm_dsm2", "train/grad_norm_dsm3"} <= set(logged)
    assert rec.metrics[2]["train/grad_norm_dsm3"] != logged["train/grad_norm_dsm3"]  # step 2 logs again
    fresh = tiny_module(stages=[{"order": 3}])
    x0 = next(iter(tiny_data(batch_size=16, steps_per_epoch=3).train_dataloader()))
    _, terms = fresh.objective(fresh.score_model, fresh.sde, x0, 3, fresh.generator("train", 0, 0))
    for k, v in terms.terms().items():
        grads = torch.autograd.grad(v.mean(), list(fresh.parameters()), retain_graph=True, allow_unused=True)
        norm = torch.stack([g.norm() for g in grads if g is not None]).norm()
        assert logged[f"train/grad_norm_{k}"] == pytest.approx(float(norm), rel=1e-4), k


def test_velocity_parameterization_with_flow_matching_trains_and_logs_fm2(tmp_path):
    """i-DODE's setting end to end: a velocity-predicting net, the likelihood weighting with t from the
    velocity proposal, flow-matching higher orders. Order 1 logs dsm1; order 2 logs fm2 (and its gradient
    norm) in place of dsm2, in training and validation; train/loss of step 0 is the mean weighted dsm1."""
    rec = _Record()
    objective = {"weighting": "likelihood", "time_proposal": "velocity", "higher_order": "flow"}
    stages = [{"order": 1, "steps": 2}, {"order": 2}]
    make = lambda: tiny_module(sde=VPSDE(), parameterization="velocity", objective=objective, stages=stages,  # noqa: E731
                               fit={"val_likelihood": False, "grad_norm_every": 1})
    module = make()
    assert module.score_model.parameterization == "velocity" and module.objective.higher_order == "flow"
    trainer = tiny_trainer(tmp_path, 4, [rec], log_every_n_steps=1, limit_val_batches=1)
    trainer.fit(module, tiny_data(batch_size=16, steps_per_epoch=4))
    assert [int(m["train/order"]) for m in rec.metrics] == [1, 1, 2, 2]
    terms = lambda m, prefix: sorted(k for k in m if k.startswith(prefix))  # noqa: E731
    assert terms(rec.metrics[0], "train/dsm") == ["train/dsm1"] and terms(rec.metrics[0], "train/fm") == []
    last = rec.metrics[-1]
    assert terms(last, "train/dsm") == ["train/dsm1"] and terms(last, "train/fm") == ["train/fm2"]
    assert "train/grad_norm_fm2" in last and "train/grad_norm_dsm2" not in last
    assert all(math.isfinite(v) for v in last.values()) and last["train/fm2"] > 0
    val = trainer.callback_metrics
    assert "val/fm2" in val and "val/dsm2" not in val and math.isfinite(float(val["val/fm2"]))
    # step 0: the loss is the mean of weight1 · dsm1 with weight1 = ((a² + σ²)/a)² of the velocity proposal
    fresh = make()
    x0 = next(iter(tiny_data(batch_size=16, steps_per_epoch=4).train_dataloader()))
    loss, first = fresh.objective(fresh.score_model, fresh.sde, x0, 1, fresh.generator("train", 0, 0))
    assert not torch.allclose(first.weight1, torch.ones_like(first.weight1))
    torch.testing.assert_close(loss, first.weight1 * first.dsm1)
    assert rec.metrics[0]["train/loss"] == pytest.approx(float(loss.mean().detach()), rel=1e-5)
    assert rec.metrics[0]["train/dsm1"] == pytest.approx(float(first.dsm1.mean().detach()), rel=1e-5)


# -- resume ---------------------------------------------------------------------------------------
class _Crash(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def _final_state(trainer, path):
    """(raw weights, EMA weights) as a checkpoint written now holds them."""
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    return ckpt["current_model_state"], ckpt["state_dict"]


def test_resume_mid_stage_matches_uninterrupted_run(tmp_path):
    """Crashed at step 5 (stage 2, order 2), resumed from last.ckpt (step 4): same step counter, stage,
    EMA and data stream, and the same final weights as an uninterrupted run."""
    ck = lambda d: ModelCheckpoint(dirpath=d, every_n_train_steps=2, save_last=True, save_top_k=-1)  # noqa: E731
    ref_model = tiny_module(stages=STAGES)
    ref = tiny_trainer(tmp_path / "ref", 9, [HOSMEMA(decay=0.9), ck(tmp_path / "ref")], enable_checkpointing=True)
    ref.fit(ref_model, tiny_data())
    ref_weights, ref_ema = _final_state(ref, tmp_path / "ref_final.ckpt")

    crashed = tiny_trainer(tmp_path / "run", 9, [HOSMEMA(decay=0.9), ck(tmp_path / "run"), _Crash(5)],
                           enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="simulated"):
        crashed.fit(tiny_module(stages=STAGES), tiny_data())
    last = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and stage_at(STAGES, last["global_step"])[1].order == 2

    model = tiny_module(stages=STAGES)
    resumed = tiny_trainer(tmp_path / "run", 9, [HOSMEMA(decay=0.9), ck(tmp_path / "run")], enable_checkpointing=True)
    resumed.fit(model, tiny_data(), ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    assert resumed.global_step == 9
    weights, ema = _final_state(resumed, tmp_path / "run_final.ckpt")
    for k in ref_weights:
        torch.testing.assert_close(weights[k], ref_weights[k], msg=k)
        torch.testing.assert_close(ema[k], ref_ema[k], msg=k)


# -- the non-finite guard -------------------------------------------------------------------------
class _NaNNet(ToyScoreNet):
    """A toy net whose output turns NaN while ``broken`` is set."""

    broken = False

    def forward(self, x, t, sigma=None):
        out = super().forward(x, t)
        return out * float("nan") if self.broken else out


def _nan_module(**fit):
    torch.manual_seed(0)
    net = _NaNNet(dim=1, encoder_width=16, embed_dim=8, decoder_width=32)
    return tiny_module(net=net, stages=[{"order": 1, "steps": 4}, {"order": 2}], fit={"val_likelihood": False, **fit})


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_finite_checkpoints(tmp_path):
    class Break(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 4:
                pl_module.net.broken = True

    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    with pytest.raises(FloatingPointError, match=r"step 4 \(stage 1, order 2\).*dsm1") as err:
        tiny_trainer(tmp_path, 9, [ck, Break()], enable_checkpointing=True).fit(_nan_module(), tiny_data())
    assert "resume" in str(err.value)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_nan_gradients_with_a_finite_loss_never_reach_the_weights(tmp_path):
    """A NaN injected into one gradient (the loss stays finite) at step 5 stops training before the update;
    every checkpoint written stays finite."""

    class PoisonGrad(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 5:
                next(pl_module.parameters()).grad.view(-1)[0] = float("nan")

    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, save_last=True)
    with pytest.raises(FloatingPointError, match=r"step 5 \(stage 1, order 2\).*finite loss with non-finite gradients"):
        tiny_trainer(tmp_path, 10, [ck, PoisonGrad()], enable_checkpointing=True).fit(
            _nan_module(check_finite_every=100), tiny_data(steps_per_epoch=20))
    files = sorted(tmp_path.glob("*.ckpt"))
    assert len(files) >= 5
    for f in files:
        state = torch.load(f, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), f.name


# -- configuration checks -----------------------------------------------------------------------
def test_module_checks_objective_settings_that_depend_on_the_sde():
    likelihood = HOSMObjective(weighting="likelihood", time_proposal="importance")
    with pytest.raises(SettingsError, match="no 'importance' time proposal for LinearSigmaSDE") as err:
        HOSMModule(net=tiny_net(), sde=LinearSigmaSDE(), objective=likelihood)
    assert err.value.owner == "HOSMObjective" and err.value.field == "time_proposal"
    HOSMModule(net=tiny_net(), sde=LinearSigmaSDE(), objective=HOSMObjective())  # uniform t needs no closed form
    for sde in (VESDE(), VPSDE()):
        HOSMModule(net=tiny_net(), sde=sde, objective=likelihood)


@pytest.mark.parametrize("kw,match", [({"parameterization": "x0"}, "parameterization"),
                                      ({"fit": {"grad_norm_every": -1}}, "grad_norm_every"),
                                      ({"fit": {"seed": 1.5}}, "seed")])
def test_bad_module_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_module(**kw)


def test_data_dimension_mismatch_fails_before_training(tmp_path):
    model = tiny_module(dim=2)
    with pytest.raises(ValueError, match="dim"):
        tiny_trainer(tmp_path, 2).fit(model, tiny_data())
    assert model.global_step == 0


def test_unet_configuration_checks():
    tiny = dict(image_size=8, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    with pytest.raises(ValueError, match="parameterization: score"):
        HOSMModule(net=NCSNpp(**tiny), sde=VESDE(), parameterization="eps")
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        HOSMModule(net=DDPMpp(**tiny, checkpoint_blocks=True), sde=VPSDE(), stages=[Stage(1, 5), Stage(3)])
    HOSMModule(net=DDPMpp(**tiny, checkpoint_blocks=True), sde=VPSDE(), stages=[Stage(1)])  # order 1: fine
    HOSMModule(net=NCSNpp(**tiny), sde=VESDE(), parameterization="score")


# -- checkpoints ----------------------------------------------------------------------------------
def test_checkpoint_loading_checks(tmp_path):
    ck = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    tiny_trainer(tmp_path, 2, [ck], enable_checkpointing=True).fit(tiny_module(), tiny_data())
    path = tmp_path / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)  # plain tensors and primitives only
    assert not any(k.startswith("net.") for k in ckpt["state_dict"])  # the net is stored once
    assert ckpt["hyper_parameters"]["evaluation"]["num_repeats"] == 1
    fresh = tiny_module()
    load_weights(fresh, path)
    torch.testing.assert_close(fresh.state_dict(), ckpt["state_dict"])
    with pytest.raises(ValueError, match="shape mismatches"):
        load_weights(tiny_module(net=ToyScoreNet(dim=1, encoder_width=8, embed_dim=8, decoder_width=8)), path)
    with pytest.raises(ValueError, match="VPSDE"):
        load_weights(tiny_module(sde=VPSDE()), path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt"):
        load_weights(tiny_module(), bad)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_weights(tiny_module(), tmp_path / "nothere.ckpt")
    assert isinstance(tiny_module().sde, VESDE)


def test_init_from_loads_weights_only_when_the_module_is_built(tmp_path):
    """init_from loads the (EMA or raw) weights, not the optimizer or the step counter: the module holds
    them as soon as it is constructed, so they are what fit starts from."""
    ck = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    tiny_trainer(tmp_path, 3, [HOSMEMA(decay=0.5), ck], enable_checkpointing=True).fit(tiny_module(), tiny_data())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert any(not torch.equal(saved["state_dict"][k], saved["current_model_state"][k]) for k in saved["state_dict"])

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.step = trainer.global_step

    for ema, key in ((True, "state_dict"), (False, "current_model_state")):
        model = tiny_module(fit={"init_from": str(tmp_path / "last.ckpt"), "init_from_ema": ema}, stages=[Stage(order=2)])
        torch.testing.assert_close(model.state_dict(), saved[key])
        probe = AtStart()
        tiny_trainer(tmp_path / f"ft{ema}", 1, [probe]).fit(model, tiny_data())
        torch.testing.assert_close(probe.state, saved[key])
        assert probe.step == 0
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        tiny_module(fit={"init_from": str(tmp_path / "missing.ckpt")})
