"""LikelihoodEvaluator: KL(q0 ‖ p) = E[log q0 − log p] on data of known density, and the
`likelihood` subcommand with --dequantization / --num_importance (GitHub issues 9 and 12)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from hosm_lightning.cli import _print_table, main
from hosm_lightning.core import VPSDE, GaussianMixture
from hosm_lightning.data import SyntheticDataModule
from hosm_lightning.lit.evaluation import LikelihoodEvaluator

from _exact import exact_module  # noqa: E402


def _module(score_fn, sde, dim=None):
    return exact_module(score_fn, sde, dim or 1, rtol=1e-6, atol=1e-6)


def _trainer(dm):
    return SimpleNamespace(datamodule=dm, world_size=1, global_rank=0, is_global_zero=True, progress_bar_callback=None,
                           strategy=SimpleNamespace(all_gather=lambda t: t))


def test_kl_is_zero_for_the_exact_score_and_positive_for_a_perturbed_one():
    dm = SyntheticDataModule(name="mog1d", batch_size=200, test_size=200)
    dm.setup()
    sde, mix = VPSDE(), dm.mixture
    ev = LikelihoodEvaluator(ode={"divergence": "exact"})
    exact = ev.evaluate(_trainer(dm), _module(mix.score_fn(sde), sde), "test")
    assert exact["metric"] == "nll" and "kl" in exact and exact["kl_se"] > 0
    # the exact score: only the solver error and q_eps vs q_0, log pi vs log q_T (all ≪ 1e-3 nats under VP)
    assert abs(exact["kl"]) < 4 * exact["kl_se"] + 1e-3, exact
    # the per-point difference has a far smaller s.e. than the NLL itself
    assert exact["kl_se"] < exact["se"] / 10
    wider = GaussianMixture(mix.means, mix.variances * 2.0, mix.weights)  # KL ≈ 0.5(½ − 1 + log 2) = 0.097 per component
    worse = ev.evaluate(_trainer(dm), _module(wider.score_fn(sde), sde), "test")
    assert worse["kl"] > 5 * worse["kl_se"] and worse["kl"] > 0.05
    # kl = nll − (mean over the same points of −log q0): the NLL gap estimated with paired differences
    x = dm.test_dataloader().dataset.tensors[0].double()
    assert abs(worse["kl"] - (worse["mean"] + mix.log_prob(x).mean().item())) < 1e-9


def test_kl_for_the_checkerboard_uses_the_exact_2d_density():
    dm = SyntheticDataModule(name="checkerboard", batch_size=50, test_size=50)
    dm.setup()
    sde = VPSDE()
    gauss = GaussianMixture(torch.zeros(1, 2), torch.full((1, 2), 8.0))  # a broad Gaussian model
    res = LikelihoodEvaluator(ode={"divergence": "exact"}).evaluate(_trainer(dm), _module(gauss.score_fn(sde), sde), "test")
    expected = math.log(1 / 32) + res["mean"]  # log q0 = −log 32 on the support
    assert abs(res["kl"] - expected) < 1e-9 and res["kl"] > 0


def test_no_kl_without_an_exact_density():
    dm = SyntheticDataModule(name="swissroll", batch_size=20, test_size=20)
    dm.setup()
    sde = VPSDE()
    gauss = GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2))
    res = LikelihoodEvaluator(ode={"divergence": "exact"}).evaluate(_trainer(dm), _module(gauss.score_fn(sde), sde), "test")
    assert "kl" not in res


def test_print_table_shows_protocols_and_kl(capsys):
    base = {"split": "test", "n": 5, "seconds": 1.0, "num_repeats": 1}
    _print_table({**base, "metric": "nll", "mean": 0.5, "se": 0.1, "nfe": 10, "entropy": 0.4, "kl": 0.1, "kl_se": 0.01})
    out = capsys.readouterr().out
    assert "KL (nats)" in out and "| 0.1000 ± 0.0100 |" in out and "| test | 5 |" in out
    prot = {"uniform": {"mean": 8.0, "se": 0.1, "nfe": 10, "num_importance": 2},
            "truncated_normal": {"mean": 7.0, "se": 0.1, "nfe": 11, "num_importance": 2}}
    _print_table({**base, "metric": "bpd", "mean": 8.0, "se": 0.1, "nfe": 10, "entropy": 6.9, "protocols": prot})
    out = capsys.readouterr().out
    assert "| uniform | 2 | 8.0000 |" in out and "| truncated_normal | 2 | 7.0000 |" in out and "| 0.1000 |" in out


def test_likelihood_subcommand_with_both_protocols(tmp_path, capsys):
    """fit 2 steps on 1-D discrete data, then `likelihood --dequantization uniform,tn --num_importance 2`."""
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"net": {"class_path": "hosm_lightning.nets.ToyScoreNet",
                          "init_args": {"dim": 1, "encoder_width": 16, "embed_dim": 8, "decoder_width": 32}},
                  "sde": {"class_path": "hosm_lightning.core.sde.VPSDE"},
                  "ode": {"rtol": 1e-3, "atol": 1e-3}, "fit": {"val_likelihood": False}},
        "data": {"class_path": "hosm_lightning.data.DiscreteDataModule",
                 "init_args": {"shape": "1d", "batch_size": 16, "steps_per_epoch": 2, "test_size": 12, "val_size": 4}},
    }
    path = tmp_path / "discrete.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(path)])
    ckpt = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    assert ckpt
    main(["likelihood", "--config", str(path), "--ckpt_path", ckpt, "--out_dir", str(tmp_path / "ll"),
          "--dequantization", "uniform,tn", "--num_importance", "2"])
    res = json.loads((tmp_path / "ll" / "test_bpd.json").read_text())
    assert res["num_importance"] == 2 and set(res["protocols"]) == {"uniform", "truncated_normal"}
    assert res["dequantization"] == "uniform" and res["mean"] == res["protocols"]["uniform"]["mean"]
    assert abs(res["entropy"] - 7.2622) < 1e-3
    out = capsys.readouterr().out
    assert "| test | 12 | uniform | 2 |" in out and "| test | 12 | truncated_normal | 2 |" in out
    with pytest.raises(ValueError, match="dequantization"):
        main(["likelihood", "--config", str(path), "--ckpt_path", ckpt, "--out_dir", str(tmp_path / "ll2"),
              "--dequantization", "gaussian"])
