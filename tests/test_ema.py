"""Weight averaging (``HOSMEMA``): the decay and its warm-up, when the average starts, which weights
validation / test / likelihood / sample see after a fit, save and resume, and ``init_from``."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from hosm_lightning.lit.checkpointing import HOSMCheckpoint
from hosm_lightning.lit.ema import HOSMEMA, warmup_decay
from hosm_lightning.lit.trainer import HOSMTrainer

from helpers import tiny_data, tiny_module, tiny_trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def _differ(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class _RawWeights(L.Callback):
    """The module's weights after every optimizer step."""

    def __init__(self):
        self.after_step = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after_step[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class _SeenByValidation(L.Callback):
    """The weights the module holds when each validation epoch evaluates its first batch."""

    def __init__(self):
        self.states = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.states.append((trainer.global_step, {k: v.detach().clone() for k, v in pl_module.state_dict().items()}))


def _checkpoints(dirpath, every=1) -> HOSMCheckpoint:
    return HOSMCheckpoint(dirpath=str(dirpath), every_n_train_steps=every, save_top_k=-1, filename="step{step}")


# -- the decay and its warm-up ---------------------------------------------------------------------
def test_warmup_forgets_the_untrained_first_weights():
    """decay 0.999 from the first step: without the warm-up 82 % of the average after 200 updates
    would still be the first weights; with it, less than 0.1 %."""
    share_warm, share_plain = 1.0, 1.0
    for n in range(1, 200):
        share_warm *= warmup_decay(0.999, n)
        share_plain *= warmup_decay(0.999, n, warmup=False)
    assert share_warm < 1e-3
    assert share_plain == pytest.approx(0.999 ** 199)
    assert [warmup_decay(0.9, n) for n in (0, 8, 80, 10_000)] == pytest.approx([0.1, 0.5, 0.9, 0.9])


@pytest.mark.parametrize("kwargs,match", [
    ({"decay": 1.5}, "decay"),
    ({"decay": -0.1}, "decay"),
    ({"update_every_n_steps": 0}, "update_every_n_steps"),
    ({"update_starting_at_step": -1}, "update_starting_at_step"),
    ({"update_starting_at_step": 1.5}, "update_starting_at_step"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HOSMEMA(**kwargs)


def _resolved_start(start, max_steps: int) -> HOSMEMA:
    ema = HOSMEMA(update_starting_at_step=start)
    ema.setup(SimpleNamespace(max_steps=max_steps), tiny_module(), "fit")
    return ema


def test_the_start_may_be_a_fraction_of_the_run():
    ema = _resolved_start(0.05, 200)
    assert ema.update_starting_at_step == 10
    assert not ema.should_update(step_idx=9) and ema.should_update(step_idx=10)
    assert _resolved_start(2.0, 200).update_starting_at_step == 2  # a float with an integer value is a step
    assert _resolved_start(None, 200).should_update(step_idx=0)


@pytest.mark.parametrize("start,max_steps,match", [
    (500, 100, "never be updated"),  # e.g. mog1d_order1.yaml (start 500) with a shortened run
    (100, 100, "never be updated"),
    (0.05, -1, "max_steps"),  # a fraction of a run without max_steps
])
def test_an_average_that_would_never_be_updated_is_a_configuration_error(start, max_steps, match):
    with pytest.raises(ValueError, match=match):
        _resolved_start(start, max_steps)


# -- what the average holds after real training steps ---------------------------------------------
@pytest.mark.slow
def test_the_average_follows_the_warmup_decay_from_its_start_step(tmp_path):
    """start 0.25 of 12 steps = step 3, every 2nd step: updates after steps 5, 7, 9, 11 (0-based 4, 6, 8,
    10); the first copies the weights, then avg <- d_n avg + (1 - d_n) w with d_n = min(0.9, (1+n)/(10+n))."""
    raw = _RawWeights()
    ema = HOSMEMA(decay=0.9, update_starting_at_step=0.25, update_every_n_steps=2)
    optimizer = functools.partial(torch.optim.Adam, lr=1e-2)
    tiny_trainer(tmp_path, 12, [raw, ema, _checkpoints(tmp_path / "ck", every=12)], enable_checkpointing=True) \
        .fit(tiny_module(optimizer=optimizer), tiny_data())
    expected = {k: v.clone() for k, v in raw.after_step[5].items()}
    for n, step in enumerate((7, 9, 11), start=1):
        d = warmup_decay(0.9, n)
        expected = {k: d * expected[k] + (1 - d) * raw.after_step[step][k] for k in expected}
    saved = torch.load(tmp_path / "ck" / "step12.ckpt", weights_only=True)
    torch.testing.assert_close(saved["state_dict"], expected)
    torch.testing.assert_close(saved["current_model_state"], raw.after_step[12])
    assert int(saved["averaging_state"]["n_averaged"]) == 4
    assert _differ(expected, raw.after_step[12]) > 1e-3  # the check can tell the average from the raw weights


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """6 steps with a slow average (decay 0.99, no warm-up) and a checkpoint after every step; validation
    (one batch) at the end of the first epoch (step 5). The averaged and raw weights differ clearly."""
    tmp = tmp_path_factory.mktemp("fitted")
    seen = _SeenByValidation()
    trainer = HOSMTrainer(max_steps=6, default_root_dir=str(tmp), accelerator="cpu", devices=1, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                          limit_val_batches=1, callbacks=[HOSMEMA(decay=0.99, warmup=False), _checkpoints(tmp / "ck"),
                                                          seen])
    model = tiny_module(fit={"val_likelihood": False}, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    data = tiny_data()
    trainer.fit(model, data)
    return SimpleNamespace(tmp=tmp, trainer=trainer, model=model, data=data, seen=seen,
                           ckpt=lambda step: tmp / "ck" / f"step{step}.ckpt")


def _saved(path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_checkpoints_and_validation_hold_the_average_and_the_module_ends_with_it(fitted):
    last = _saved(fitted.ckpt(6))
    assert _differ(last["state_dict"], last["current_model_state"]) > 1e-3
    torch.testing.assert_close(fitted.model.state_dict(), last["state_dict"])  # after fit: the average
    [(step, state)] = fitted.seen.states
    assert step == 5
    torch.testing.assert_close(state, _saved(fitted.ckpt(5))["state_dict"])  # validation saw the average


def _fresh(weights: dict):
    model = tiny_module(fit={"val_likelihood": False})
    model.load_state_dict(weights)
    return model


def _test_nll(model, data) -> float:
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False) \
        .test(model, datamodule=data, verbose=False)
    return model.test_results["mean"]


@pytest.mark.slow
def test_evaluations_after_fit_in_the_same_process_use_the_checkpoints_average(fitted, tmp_path):
    """After a fit the trainer still holds the averaged copy of the last step; test / validate /
    likelihood / sample of an earlier checkpoint must evaluate that checkpoint's averaged weights."""
    trainer, model, data = fitted.trainer, fitted.model, fitted.data
    step2 = _saved(fitted.ckpt(2))
    ema_nll, raw_nll = _test_nll(_fresh(step2["state_dict"]), data), _test_nll(_fresh(step2["current_model_state"]), data)
    assert abs(ema_nll - raw_nll) > 1e-3

    trainer.test(model, datamodule=data, ckpt_path=str(fitted.ckpt(2)), verbose=False)
    assert model.test_results["mean"] == pytest.approx(ema_nll, abs=1e-5)

    res = trainer.likelihood(model, data, ckpt_path=str(fitted.ckpt(2)), out_dir=str(tmp_path / "ll"))
    assert res["mean"] == pytest.approx(ema_nll, abs=1e-5)
    per_point = np.load(tmp_path / "ll" / "test_per_sample.npz")["mean"]
    assert per_point.mean() == pytest.approx(ema_nll, abs=1e-5)

    seen = _SeenByValidation()
    trainer.callbacks.append(seen)
    try:
        trainer.validate(model, datamodule=data, ckpt_path=str(fitted.ckpt(2)), verbose=False)
    finally:
        trainer.callbacks.remove(seen)
    torch.testing.assert_close(seen.states[0][1], step2["state_dict"])

    def samples(module, ckpt, name):
        out = trainer.sample(module, data, ckpt_path=ckpt, num_samples=8, batch_size=8, out_dir=str(tmp_path / name))
        return np.load(out / "samples.npz")["samples"]

    got = samples(model, str(fitted.ckpt(2)), "s")
    np.testing.assert_allclose(got, samples(_fresh(step2["state_dict"]), None, "ema"), atol=1e-6)
    assert np.abs(got - samples(_fresh(step2["current_model_state"]), None, "raw")).max() > 1e-4


# -- save and resume -------------------------------------------------------------------------------
class _Crash(L.Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("resume_at", [2, 6], ids=["before-the-average-starts", "after"])
@pytest.mark.slow
def test_a_resumed_run_continues_the_same_average(resume_at, tmp_path):
    """The average starts at step 4 (a third of 12), every 2nd step, with the warm-up counter: a run that
    crashed and resumed from a checkpoint written before or after that ends with the uninterrupted
    run's average, raw weights and update count."""
    def run(root, *extra, ckpt_path=None):
        ema = HOSMEMA(decay=0.9, update_starting_at_step=1 / 3, update_every_n_steps=2)
        trainer = tiny_trainer(root, 12, [ema, *extra, _checkpoints(root / "ck", every=2)], enable_checkpointing=True)
        trainer.fit(tiny_module(optimizer=functools.partial(torch.optim.Adam, lr=1e-2)), tiny_data(),
                    ckpt_path=ckpt_path)
        return _saved(root / "ck" / "last.ckpt")

    whole = run(tmp_path / "whole")
    assert int(whole["averaging_state"]["n_averaged"]) == 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "part", _Crash(resume_at + 1))
    first = _saved(tmp_path / "part" / "ck" / "last.ckpt")
    assert first["global_step"] == resume_at
    assert int(first["averaging_state"]["n_averaged"]) == (0 if resume_at < 5 else 1)
    resumed = run(tmp_path / "part", ckpt_path=str(tmp_path / "part" / "ck" / "last.ckpt"))
    assert resumed["global_step"] == 12
    for key in ("state_dict", "current_model_state", "averaging_state"):
        torch.testing.assert_close(resumed[key], whole[key], msg=key)


# -- init_from ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_average_starts_from_the_init_from_weights(tmp_path):
    """The sanity check validates the average before step 1: with init_from it must be the loaded
    weights (the average is copied from the module, which loads them when it is built), not a fresh
    initialisation."""
    tiny_trainer(tmp_path / "src", 3, [HOSMEMA(decay=0.99, warmup=False), _checkpoints(tmp_path / "src" / "ck")],
                 enable_checkpointing=True).fit(tiny_module(optimizer=functools.partial(torch.optim.Adam, lr=1e-2)),
                                                tiny_data())
    source = tmp_path / "src" / "ck" / "last.ckpt"
    loaded = _saved(source)["state_dict"]
    assert _differ(loaded, tiny_module().state_dict()) > 1e-3

    seen = _SeenByValidation()
    model = tiny_module(fit={"init_from": str(source), "val_likelihood": False})
    tiny_trainer(tmp_path / "ft", 1, [HOSMEMA(decay=0.99), seen], limit_val_batches=1, num_sanity_val_steps=1) \
        .fit(model, tiny_data())
    step, state = seen.states[0]
    assert step == 0
    torch.testing.assert_close(state, loaded)
