"""LightningCLI end to end: every config, fit/test/sample/likelihood, TensorBoard, config round-trip."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hosm_lightning.cli import main
from hosm_lightning.data import write_fake_cifar10

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["mog1d", "checkerboard", "swissroll", "cifar10_vp_ddpmpp", "cifar10_vp_ddpmpp_deep", "cifar10_ve_ncsnpp"]


#: override files and the base config they are composed on (LightningCLI's repeated --config)
BASES = {"swissroll": "checkerboard", "cifar10_vp_ddpmpp_deep": "cifar10_vp_ddpmpp"}


def _merge(base: dict, over: dict) -> dict:
    """``--config base --config over`` as jsonargparse composes them: mappings merge, other values replace."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(name: str) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    return _merge(load_config(BASES[name]), cfg) if name in BASES else cfg


def small_config(name: str, tmp: Path) -> Path:
    """configs/<name>.yaml (composed on its base) shrunk to CPU-test size (same structure, smaller numbers)."""
    cfg = load_config(name)
    tr, model, data = cfg["trainer"], cfg["model"], cfg["data"]["init_args"]
    tr.update(default_root_dir=str(tmp), max_steps=6, val_check_interval=6, log_every_n_steps=1,
              enable_progress_bar=False, accelerator="cpu", devices=1)
    assert "logger" not in tr  # the CLI's TensorBoard logger writes into default_root_dir (issue 11)
    for cb in tr["callbacks"]:
        if cb["class_path"].endswith("LikelihoodEvaluator"):
            cb["init_args"]["num_repeats"] = 1
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 2
        if cb["class_path"].endswith("DensityPlotCallback"):
            n = 4 if "cifar10" in name else 32
            cb["init_args"].update(grid_size=40, grid_size_2d=8, num_samples=n, ode={"rtol": 1e-3, "atol": 1e-3})
    model["ode"] = {**model.get("ode", {}), "rtol": 1e-3, "atol": 1e-3}
    model["stages"] = [{"order": 1, "steps": 2}, {"order": 2, "steps": 2}, {"order": 3}]
    if "cifar10" in name:
        write_fake_cifar10(tmp / "cifar", n_train=24, n_test=8)
        data.update(root=str(tmp / "cifar"), batch_size=4, eval_batch_size=4, num_workers=0, val_size=4)
        model["net"]["init_args"].update(nf=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    else:
        data.update(batch_size=64, steps_per_epoch=6, val_size=64, test_size=64)
        model["net"]["init_args"].update(encoder_width=32, embed_dim=16, decoder_width=64)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_fast_dev_run_every_config(name, tmp_path):
    cli = main(["fit", "--config", str(small_config(name, tmp_path)), "--trainer.fast_dev_run=2"])
    assert cli.trainer.global_step == 2
    assert cli.trainer.callback_metrics["train/loss"].isfinite()


def _tags(logdir: Path) -> dict:
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags()


@pytest.fixture(scope="module")
def trained_mog1d(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mog1d")
    cfg = small_config("mog1d", tmp)
    cli = main(["fit", "--config", str(cfg)])
    return tmp, cfg, cli


def test_fit_logs_scalars_and_images_to_tensorboard(trained_mog1d):
    tmp, _, cli = trained_mog1d
    assert cli.trainer.global_step == 6
    tags = _tags(Path(cli.trainer.logger.log_dir))
    for tag in ("train/loss", "train/dsm1", "train/dsm2", "train/dsm3", "train/order", "train/grad_norm", "train/lr",
                "val/loss", "val/dsm3", "val/nll", "val/nll_gap", "val/nfe"):
        assert tag in tags["scalars"], tag
    assert {"val/density", "val/samples"} <= set(tags["images"])
    assert (Path(cli.trainer.logger.log_dir) / "config.yaml").exists()


def test_test_sample_and_likelihood_subcommands(trained_mog1d, capsys):
    tmp, cfg, cli = trained_mog1d
    ckpt = str(Path(cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path))
    tested = main(["test", "--config", str(cfg), "--ckpt_path", ckpt])
    metrics = tested.trainer.callback_metrics
    assert metrics["test/nll"].isfinite() and metrics["test/nfe"] > 0
    main(["sample", "--config", str(cfg), "--ckpt_path", ckpt, "--num_samples", "50", "--batch_size", "20",
          "--rtol", "1e-3", "--atol", "1e-3", "--out_dir", str(tmp / "samples")])
    assert (tmp / "samples" / "samples.png").stat().st_size > 0
    import numpy as np

    assert np.load(tmp / "samples" / "samples.npz")["samples"].shape == (50, 1)
    main(["likelihood", "--config", str(cfg), "--ckpt_path", ckpt, "--out_dir", str(tmp / "ll")])
    res = json.loads((tmp / "ll" / "test_nll.json").read_text())
    assert res["n"] == 64 and res["nfe"] > 0 and abs(res["entropy"] + 0.12885) < 1e-4
    assert (tmp / "ll" / "test_per_sample.npz").exists()
    # the likelihood subcommand and `test` agree on the same weights and data
    assert abs(res["mean"] - metrics["test/nll"].item()) < 5e-3
    assert "| test | 64 |" in capsys.readouterr().out


def test_likelihood_after_fit_in_the_same_process_uses_ema_weights(trained_mog1d):
    """After fit, EMAWeightAveraging would load a checkpoint's raw weights; likelihood must use EMA."""
    import torch

    from hosm_lightning.lit.checkpoints import load_weights

    tmp, _, cli = trained_mog1d
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    res = cli.trainer.likelihood(cli.model, cli.datamodule, ckpt_path=ckpt, out_dir=str(tmp / "ll_same"))
    saved = torch.load(ckpt, weights_only=True)
    assert any(not torch.equal(saved["state_dict"][k], saved["current_model_state"][k]) for k in saved["state_dict"])
    load_weights(cli.model, ckpt)  # EMA weights
    x = torch.cat(list(cli.datamodule.test_dataloader()))
    nll = -cli.model.log_likelihood(x)[0].mean().item()
    assert abs(res["mean"] - nll) < 1e-3, (res["mean"], nll)


def test_fit_resumes_with_ckpt_path_last(tmp_path):
    cfg = str(small_config("mog1d", tmp_path))
    main(["fit", "--config", cfg, "--trainer.max_steps=4", "--trainer.limit_val_batches=0"])
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    # the command line wins over the checkpoint's saved hyper-parameters: new stages take effect
    cli = main(["fit", "--config", cfg, "--ckpt_path", "last", "--trainer.limit_val_batches=0",
                "--model.stages", "[{order: 1, steps: 4}, {order: 2}]"])
    assert cli.trainer.ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt")
    assert cli.trainer.global_step == 6
    assert cli.model.current_stage()[1].order == 2 and cli.trainer.callback_metrics["train/order"] == 2


def test_cifar_test_reports_bits_per_dim(tmp_path):
    cfg = small_config("cifar10_vp_ddpmpp", tmp_path)
    cli = main(["fit", "--config", str(cfg), "--trainer.max_steps=2", "--trainer.limit_val_batches=0"])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    tested = main(["test", "--config", str(cfg), "--ckpt_path", ckpt, "--trainer.limit_test_batches=1"])
    bpd = tested.trainer.callback_metrics["test/bpd"].item()
    assert 0 < bpd < 30


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "mog1d.yaml"), "--print_config"])
    first = capsys.readouterr().out
    (tmp_path / "dump.yaml").write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "dump.yaml"), "--print_config"])
    assert capsys.readouterr().out == first
    assert yaml.safe_load(first)["model"]["stages"][2] == {"order": 3, "steps": None, "lr": None}  # lr: per-stage learning rate (issue 9)


def _run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_user_errors_are_one_clear_line(tmp_path):
    res = _run_cli("fit", "--config", "configs/mog1d.yaml", "--model.objective.lambda2=-1")
    assert res.returncode == 2 and "model.objective.lambda2 must be >= 0" in res.stderr and "Traceback" not in res.stderr
    res = _run_cli("fit", "--config", "configs/cifar10_vp_ddpmpp.yaml", f"--data.init_args.root={tmp_path}/nowhere",
                   "--trainer.logger=false", "--trainer.callbacks=[]")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{tmp_path}/nowhere" in res.stderr and "download" in res.stderr


def test_yaml_interpolation_omegaconf_mode(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "configs" / "mog1d.yaml").read_text())
    cfg["data"]["init_args"]["val_size"] = "${data.init_args.test_size}"
    (tmp_path / "interp.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "interp.yaml"), "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["val_size"] == data["test_size"] == 5000


def test_fit_order3_from_imported_score_sde_checkpoint(tmp_path):
    """Issue 5: start a fit at order 3 from a score_sde_pytorch-format first-order checkpoint."""
    import torch

    from hosm_lightning.nets import DDPMpp, save_score_sde_checkpoint

    cfg = small_config("cifar10_vp_ddpmpp", tmp_path)
    tiny = yaml.safe_load(cfg.read_text())["model"]["net"]["init_args"]
    torch.manual_seed(1)
    source = DDPMpp(**tiny)
    save_score_sde_checkpoint(source, tmp_path / "checkpoint_26.pth", step=1300000)
    cli = main(["fit", "--config", str(cfg), "--model.fit.init_from", str(tmp_path / "checkpoint_26.pth"),
                "--model.stages", "[{order: 3}]", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                "--trainer.callbacks=[]", "--trainer.logger=false"])
    assert cli.trainer.global_step == 2 and cli.trainer.callback_metrics["train/dsm3"].isfinite()
    # the weights moved away from the imported ones by two Adam steps only
    moved = [(p - q).abs().max().item() for p, q in zip(cli.model.net.parameters(), source.parameters())]
    assert max(moved) < 1e-2 and max(moved) > 0


@pytest.mark.parametrize("name", sorted(BASES))
def test_override_configs_compose_on_their_base(name, capsys):
    """configs/<override>.yaml after its base through LightningCLI's repeated --config: the base's
    values with the override's few changes (the composed run is what test_fast_dev_run_every_config trains)."""
    base = BASES[name]
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / f"{base}.yaml"), "--config", str(ROOT / "configs" / f"{name}.yaml"),
              "--print_config"])
    composed = yaml.safe_load(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / f"{base}.yaml"), "--print_config"])
    alone = yaml.safe_load(capsys.readouterr().out)
    over = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    assert composed["trainer"]["default_root_dir"] == over["trainer"]["default_root_dir"] != alone["trainer"]["default_root_dir"]
    if name == "swissroll":
        assert composed["data"]["init_args"]["name"] == "swissroll" and alone["data"]["init_args"]["name"] == "checkerboard"
    else:
        assert composed["model"]["net"]["init_args"]["num_res_blocks"] == 8
        assert alone["model"]["net"]["init_args"]["num_res_blocks"] == 4
    # nothing else differs
    composed["trainer"].pop("default_root_dir"), alone["trainer"].pop("default_root_dir")
    for cfg in (composed, alone):
        cfg["data"]["init_args"].pop("name", None), cfg["model"]["net"]["init_args"].pop("num_res_blocks", None)
    assert composed == alone
