"""Whole-split likelihood in Lightning's test loop (lit/evaluation.py): per-point NLL and bits/dim, the
paired KL, both dequantization protocols, per-point noise, results on disk, and the `likelihood` command."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from helpers import exact_module, tiny_trainer

from hosm_lightning.cli import main
from hosm_lightning.core import VPSDE, GaussianMixture, SettingsError
from hosm_lightning.data import CIFAR10DataModule, DiscreteDataModule, SyntheticDataModule, write_fake_cifar10
from hosm_lightning.lit.evaluation import gather_rows
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.nets import SmallConvNet
from hosm_lightning.options import EvalOptions, parse_protocols
from hosm_lightning.results import print_likelihood_table, write_results


def _test(module, dm, tmp_path, **kw) -> dict:
    """trainer.test with a quiet CPU trainer; returns the logged metrics (the module keeps ``test_results``)."""
    return tiny_trainer(tmp_path, **kw).test(module, datamodule=dm, verbose=False)[0]


def _exact(score_fn, sde, dim=1, **kw):
    return exact_module(score_fn, sde, dim, rtol=1e-6, atol=1e-6, **kw)


def test_kl_is_zero_for_the_exact_score_and_positive_for_a_perturbed_one(tmp_path):
    dm = SyntheticDataModule(name="mog1d", batch_size=200, test_size=200)
    sde = VPSDE()
    mix = dm.data_spec().mixture
    exact = _exact(mix.score_fn(sde), sde)
    logged = _test(exact, dm, tmp_path)
    res = exact.test_results
    assert res["metric"] == "nll" and res["n"] == 200 and res["kl_se"] > 0
    # the exact score: only the solver error and q_eps vs q_0, log pi vs log q_T (all ≪ 1e-3 nats under VP)
    assert abs(res["kl"]) < 4 * res["kl_se"] + 1e-3, res
    assert res["kl_se"] < res["se"] / 10  # the paired difference is far less noisy than the NLL itself
    assert logged["test/kl"] == pytest.approx(res["kl"]) and logged["test/nll"] == pytest.approx(res["mean"])
    assert logged["test/nll_gap"] == pytest.approx(res["mean"] - dm.data_spec().entropy)
    wider = GaussianMixture(mix.means, mix.variances * 2.0, mix.weights)
    worse = _exact(wider.score_fn(sde), sde)
    _test(worse, dm, tmp_path)
    bad = worse.test_results
    assert bad["kl"] > 5 * bad["kl_se"] and bad["kl"] > 0.05
    # kl = nll − (mean over the same points of −log q0): the NLL gap by paired differences
    dm.setup()
    x = torch.stack([dm.test_dataloader().dataset[i]["x"] for i in range(200)]).double()
    assert abs(bad["kl"] - (bad["mean"] + mix.log_prob(x).mean().item())) < 1e-9


def test_kl_for_the_checkerboard_uses_the_exact_2d_density(tmp_path):
    dm = SyntheticDataModule(name="checkerboard", batch_size=50, test_size=50)
    sde = VPSDE()
    gauss = GaussianMixture(torch.zeros(1, 2), torch.full((1, 2), 8.0))  # a broad Gaussian model
    module = _exact(gauss.score_fn(sde), sde, dim=2)
    _test(module, dm, tmp_path)
    res = module.test_results
    assert abs(res["kl"] - (math.log(1 / 32) + res["mean"])) < 1e-9 and res["kl"] > 0  # log q0 = −log 32 on the support


def test_no_kl_without_an_exact_density(tmp_path):
    dm = SyntheticDataModule(name="swissroll", batch_size=20, test_size=20)
    sde = VPSDE()
    module = _exact(GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2)).score_fn(sde), sde, dim=2)
    logged = _test(module, dm, tmp_path)
    assert "kl" not in module.test_results and "test/kl" not in logged and "test/nll" in logged


class _Counting(HOSMModule):
    """Records the points of every likelihood solve (float data: the solve's input rows are the points)."""

    solved: list

    def log_likelihood(self, x, generator=None, ode=None):
        self.solved.append(x.detach().clone())
        return super().log_likelihood(x, generator, ode)


def test_each_point_is_solved_once_per_repeat_and_max_samples_limits_the_points(tmp_path):
    dm = SyntheticDataModule(name="mog1d", batch_size=4, test_size=11)  # 3 batches, the last one short
    sde = VPSDE()
    mix = dm.data_spec().mixture
    module = _Counting(exact_module(mix.score_fn(sde), sde, 1).net, sde=sde, parameterization="score",
                       evaluation=EvalOptions(num_repeats=2), ode={"rtol": 1e-3, "atol": 1e-3})
    module.solved = []
    _test(module, dm, tmp_path)
    dm.setup()
    points = torch.stack([dm.test_dataloader().dataset[i]["x"] for i in range(11)])
    seen = torch.cat(module.solved)
    counts = [(seen == p).all(1).sum().item() for p in points]
    assert counts == [2] * 11 and len(seen) == 22
    assert module.test_results["per_sample"]["index"].tolist() == list(range(11))
    module.solved, module.evaluation = [], EvalOptions(max_samples=5)
    _test(module, dm, tmp_path)
    assert module.test_results["n"] == 5 and len(torch.cat(module.solved)) == 5
    module.solved, module.evaluation = [], EvalOptions(max_samples=0)
    logged = _test(module, dm, tmp_path)
    assert module.test_results is None and module.solved == [] and "test/nll" not in logged


@pytest.mark.slow
def test_both_protocols_are_logged_and_written(tmp_path):
    dm = DiscreteDataModule(shape="1d", kind="discrete", test_size=40, eval_batch_size=16)
    sde = VPSDE()
    dist = dm.distribution  # the exact score of the discrete data at every t > 0
    module = _exact(dist.score_fn(sde), sde, centered=dm.data_spec().centered,
                    evaluation=EvalOptions(dequantization=["uniform", "truncated_normal"], num_importance=2))
    module.data_spec = dm.data_spec()
    logged = _test(module, dm, tmp_path)
    res = module.test_results
    assert res["metric"] == "bpd" and res["dequantization"] == "uniform" and res["num_importance"] == 2
    uni, tn = res["protocols"]["uniform"], res["protocols"]["truncated_normal"]
    assert res["mean"] == uni["mean"] and tn["tag"] == "tn" and tn["num_importance"] == 2
    # genuinely discrete data: the truncated normal is near exact, the uniform protocol ~2 bits/dim loose
    assert uni["mean"] > tn["mean"] + 0.5 and abs(tn["gap"]) < 5 * tn["gap_se"] + 2e-3
    for tag in ("test/bpd_uniform", "test/bpd_uniform_se", "test/bpd_tn", "test/bpd_tn_se", "test/nfe_tn",
                "test/bpd_tn_gap", "test/n"):
        assert tag in logged, tag
    assert "test/bpd" not in logged  # one name per protocol
    assert logged["test/bpd_uniform"] == pytest.approx(uni["mean"]) and logged["test/bpd_tn"] == pytest.approx(tn["mean"])
    json_path, npz_path = write_results(res, tmp_path / "ll")
    assert json.loads(json_path.read_text())["protocols"]["truncated_normal"]["num_importance"] == 2
    ps = np.load(npz_path)
    assert ps["value_tn"].shape == (40, 1) and np.allclose(ps["value"], ps["value_uniform"])
    assert abs(ps["value_tn"].mean() - tn["mean"]) < 1e-12 and ps["index"].tolist() == list(range(40))
    module.evaluation = EvalOptions(dequantization="tn", max_samples=8)
    logged = _test(module, dm, tmp_path)
    assert "test/bpd_tn" in logged and "test/bpd_uniform" not in logged
    assert module.test_results["dequantization"] == "truncated_normal" and module.test_results["n"] == 8


def test_bits_per_dim_noise_is_per_point_not_per_batch(tmp_path):
    """The dequantization noise and probe of point i depend on (seed, repeat, i) only: with a fixed-step
    solver (no batch-wide error control) the per-point bits/dim do not depend on the batch size."""
    write_fake_cifar10(tmp_path, n_train=8, n_test=5)
    values = {}
    for bs in (3, 1):
        dm = CIFAR10DataModule(str(tmp_path), eval_batch_size=bs, num_workers=0, val_size=2)
        torch.manual_seed(0)
        module = HOSMModule(SmallConvNet(channels=8, depth=1), sde=VPSDE(),
                            evaluation=EvalOptions(max_samples=3, ode={"method": "rk4", "step_size": 0.25}))
        _test(module, dm, tmp_path)
        res = module.test_results
        assert res["metric"] == "bpd" and res["n"] == 3 and 0 < res["mean"] < 40
        values[bs] = res["per_sample"]["uniform"][:, 0]
    np.testing.assert_allclose(values[3], values[1], rtol=1e-5)


def test_a_foreign_data_module_without_indices_is_evaluated_point_by_point(tmp_path):
    class Plain(L.LightningDataModule):
        def test_dataloader(self):
            return torch.utils.data.DataLoader(torch.linspace(-1, 1, 9)[:, None], batch_size=4)

    sde = VPSDE()
    module = _exact(GaussianMixture(torch.zeros(1, 1), torch.ones(1, 1)).score_fn(sde), sde)
    _test(module, Plain(), tmp_path)
    res = module.test_results
    assert res["n"] == 9 and sorted(res["per_sample"]["index"].tolist()) == list(range(9)) and "kl" not in res


class _Gather:
    """A stand-in for a module on rank 0 of W ranks whose rows are given (Lightning's all_gather semantics)."""

    def __init__(self, per_rank):
        self.per_rank, self.device = per_rank, torch.device("cpu")

    def all_gather(self, t):
        if t.dim() == 1 and t.numel() == 1:  # the row count
            return torch.stack([torch.tensor([len(r)]) for r in self.per_rank])
        most = t.shape[0]
        return torch.stack([torch.cat([r, r.new_zeros(most - len(r), r.shape[1])]) for r in self.per_rank])


def test_gather_rows_joins_uneven_shards_in_index_order_and_refuses_duplicates():
    rows = lambda idx: torch.tensor([[i, 10.0 * i] for i in idx], dtype=torch.float64).reshape(-1, 2)  # noqa: E731
    out = gather_rows(_Gather([rows([0, 3, 6]), rows([1, 4]), rows([])]), rows([0, 3, 6]))
    assert out[:, 0].tolist() == [0, 1, 3, 4, 6] and out[:, 1].tolist() == [0, 10, 30, 40, 60]
    with pytest.raises(RuntimeError, match="twice"):
        gather_rows(_Gather([rows([0, 1]), rows([1, 2])]), rows([0, 1]))


def test_eval_options_are_validated_once_and_name_the_field():
    assert EvalOptions(dequantization="uniform,tn").dequantization == ["uniform", "truncated_normal"]
    assert parse_protocols("[uniform, truncated_normal]") == ("uniform", "truncated_normal")
    for kw, field in (({"num_repeats": 0}, "num_repeats"), ({"num_importance": 0}, "num_importance"),
                      ({"max_samples": -1}, "max_samples"), ({"dequantization": ["uniform", "foo"]}, "dequantization"),
                      ({"ode": {"rtol": -1}}, "ode"), ({"ode": {"nope": 1}}, "ode")):
        with pytest.raises(SettingsError) as err:
            EvalOptions(**kw)
        assert err.value.owner == "EvalOptions" and err.value.field == field, err.value
    assert EvalOptions(num_repeats=2).replace(num_repeats=None, num_importance=3).as_dict()["num_importance"] == 3


def test_print_table_shows_protocols_and_kl(capsys):
    base = {"split": "test", "n": 5, "seconds": 1.0, "num_repeats": 1}
    print_likelihood_table({**base, "metric": "nll", "mean": 0.5, "se": 0.1, "nfe": 10, "entropy": 0.4, "kl": 0.1,
                            "kl_se": 0.01})
    out = capsys.readouterr().out
    assert "KL (nats)" in out and "| 0.1000 ± 0.0100 |" in out and "| test | 5 |" in out
    prot = {"uniform": {"mean": 8.0, "se": 0.1, "nfe": 10, "num_importance": 2},
            "truncated_normal": {"mean": 7.0, "se": 0.1, "nfe": 11, "num_importance": 2}}
    print_likelihood_table({**base, "metric": "bpd", "mean": 8.0, "se": 0.1, "nfe": 10, "entropy": 6.9, "protocols": prot})
    out = capsys.readouterr().out
    assert "| uniform | 2 | 8.0000 |" in out and "| truncated_normal | 2 | 7.0000 |" in out and "| 0.1000 |" in out


def _discrete_config(tmp_path):
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"net": {"class_path": "hosm_lightning.nets.ToyScoreNet",
                          "init_args": {"dim": 1, "encoder_width": 16, "embed_dim": 8, "decoder_width": 32}},
                  "sde": {"class_path": "hosm_lightning.core.sde.VPSDE"},
                  "ode": {"rtol": 1e-3, "atol": 1e-3}, "fit": {"val_likelihood": False},
                  "evaluation": {"num_repeats": 2}},
        "data": {"class_path": "hosm_lightning.data.DiscreteDataModule",
                 "init_args": {"shape": "1d", "batch_size": 16, "steps_per_epoch": 2, "test_size": 12, "val_size": 4}},
    }
    path = tmp_path / "discrete.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_likelihood_command_runs_the_test_loop_with_its_own_options(tmp_path, capsys):
    """fit 2 steps on 1-D discrete data; `likelihood` on test and val with both protocols, K = 2: a table,
    JSON and per-point values; the configured model.evaluation and callbacks are left as they were."""
    path = _discrete_config(tmp_path)
    cli = main(["fit", "--config", str(path)])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    callbacks, evaluation = list(cli.trainer.callbacks), cli.model.evaluation
    res = cli.trainer.likelihood(cli.model, cli.datamodule, ckpt_path=ckpt, out_dir=str(tmp_path / "ll"),
                                 dequantization="uniform,tn", num_importance=2, num_repeats=1)
    assert res["num_importance"] == 2 and set(res["protocols"]) == {"uniform", "truncated_normal"}
    assert res["dequantization"] == "uniform" and res["mean"] == res["protocols"]["uniform"]["mean"]
    assert res["n"] == 12 and res["num_repeats"] == 1 and abs(res["entropy"] - 7.2622) < 1e-3
    assert json.loads((tmp_path / "ll" / "test_bpd.json").read_text())["n"] == 12
    out = capsys.readouterr().out
    assert "| test | 12 | uniform | 2 |" in out and "| test | 12 | truncated_normal | 2 |" in out
    assert cli.trainer.callbacks == callbacks and cli.model.evaluation.num_repeats == 2 and evaluation.num_repeats == 2
    val = cli.trainer.likelihood(cli.model, cli.datamodule, ckpt_path=ckpt, split="val", out_dir=str(tmp_path / "ll"))
    assert val["split"] == "val" and val["n"] == 4 and val["num_repeats"] == 2
    assert (tmp_path / "ll" / "val_per_sample.npz").is_file()
    with pytest.raises(SettingsError, match="dequantization"):
        main(["likelihood", "--config", str(path), "--ckpt_path", ckpt, "--out_dir", str(tmp_path / "ll2"),
              "--dequantization", "gaussian"])


@pytest.mark.slow
def test_cli_test_writes_the_results_of_every_point(tmp_path):
    path = _discrete_config(tmp_path)
    ckpt = main(["fit", "--config", str(path)]).trainer.checkpoint_callback.last_model_path
    tested = main(["test", "--config", str(path), "--ckpt_path", ckpt])
    res = json.loads((tmp_path / "likelihood" / "test_bpd.json").read_text())
    assert res["n"] == 12 and res["num_repeats"] == 2
    assert tested.trainer.callback_metrics["test/bpd_uniform"].item() == pytest.approx(res["mean"])
    per = np.load(tmp_path / "likelihood" / "test_per_sample.npz")
    assert per["value"].shape == (12, 2) and per["index"].tolist() == list(range(12))

