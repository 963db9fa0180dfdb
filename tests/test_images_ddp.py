"""Real images under DDP through the CLI (gloo, loopback): a 2-process fine-tune of configs/digits.yaml with
the paper's recipe (configs/images_finetune.yaml), then `test` of its checkpoint on 2 processes and on 1:
every test digit is evaluated once, and its bits/dim is the same on 1 and 2 processes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, clean_env, wait_all

from hosm_lightning.nets import DDPMpp
from hosm_lightning.nets.checkpoint_import import save_score_sde_checkpoint

pytestmark = pytest.mark.slow

N_TEST = 7  # not divisible by the world size
#: a fixed-step solver: a point's value does not depend on the batch it is in (tests/test_ddp.py)
EVAL = ["--model.evaluation.max_samples", str(N_TEST), "--model.evaluation.num_repeats", "1",
        "--model.evaluation.ode", "{method: rk4, step_size: 0.25}", "--data.init_args.eval_batch_size", "3"]


def _cli(args: list[str], world: int) -> None:
    cmd = [sys.executable, str(ROOT / "cli.py"), args[0], "--config", str(ROOT / "configs" / "digits.yaml"), *args[1:],
           "--trainer.accelerator", "cpu", "--trainer.devices", str(world),
           "--trainer.strategy", "ddp" if world > 1 else "auto"]
    if world == 1:
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)]
    else:
        env = clean_env()
        procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "LOCAL_RANK": str(r), "NODE_RANK": "0", "WORLD_SIZE": "2"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
                 for r in range(world)]
    for code, out, err in wait_all(procs, timeout=300):
        assert code == 0, out[-2000:] + err[-4000:]


def test_two_process_fine_tune_and_test_of_real_digits_match_one_process(tmp_path):
    torch.manual_seed(0)  # a first-order model to fine-tune (score_sde format: weights only)
    net = DDPMpp(image_size=8, in_channels=1, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    init = tmp_path / "init.pth"
    save_score_sde_checkpoint(net, init)
    run = tmp_path / "finetune"
    _cli(["fit", "--config", str(ROOT / "configs" / "images_finetune.yaml"), "--model.fit.init_from", str(init),
          "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--data.init_args.batch_size", "8",
          "--trainer.default_root_dir", str(run)], world=2)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    fine_tuned = state["state_dict"]
    assert any(not torch.equal(fine_tuned[f"score_model.net.{k}"], v) for k, v in net.state_dict().items())
    values = {}
    for world in (2, 1):
        out = tmp_path / f"test{world}"
        _cli(["test", "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(out), *EVAL], world=world)
        res = np.load(out / "likelihood" / "test_per_sample.npz")
        assert res["index"].tolist() == list(range(N_TEST))  # every test digit once, none twice
        values[world] = {k: res[k] for k in ("value_uniform", "value_tn")}
    for key, v in values[1].items():
        assert np.isfinite(v).all() and v.shape == (N_TEST, 1)
        np.testing.assert_allclose(values[2][key], v, rtol=1e-6, atol=0, err_msg=key)
