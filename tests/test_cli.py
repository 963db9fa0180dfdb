"""The command line end to end on a tiny config: fit / validate / test / sample / likelihood / diagnose,
where their outputs go, resuming, checkpoints checked before anything reads them, one-line user errors
(exit status 2) that name the config key, and ``--help``.

The documented commands and the shipped configs are exercised in tests/test_docs.py.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hosm_lightning.cli import CONFIG_KEYS, error_message, main, run_cli
from hosm_lightning.core import HOSMObjective, ODEOptions, SettingsError, VPSDE
from hosm_lightning.diagnose import band_integrals
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.nets import ToyScoreNet
from hosm_lightning.options import EvalOptions, FitOptions

from helpers import ROOT

NET = {"encoder_width": 32, "embed_dim": 16, "decoder_width": 64}


def tiny_config(path: Path, root: Path) -> Path:
    """A complete config at test size: 6 steps of orders 1 → 2 → 3, EMA, a checkpoint every 2 steps,
    one validation (exact NLL and density plot) at step 6; run folder ``root``."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 6, "val_check_interval": 6, "log_every_n_steps": 1,
            "gradient_clip_val": 1.0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "hosm_lightning.lit.ema.HOSMEMA", "init_args": {"decay": 0.9}},
                {"class_path": "hosm_lightning.lit.checkpointing.HOSMCheckpoint",
                 "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "filename": "step{step:06d}"}},
                {"class_path": "hosm_lightning.lit.callbacks.DensityPlotCallback",
                 "init_args": {"grid_size": 20, "num_samples": 16, "ode": {"rtol": 1e-3, "atol": 1e-3}}},
            ],
        },
        "model": {
            "net": {"class_path": "hosm_lightning.nets.ToyScoreNet", "init_args": {"dim": 1, **NET}},
            "sde": {"class_path": "hosm_lightning.core.sde.VESDE"},
            "stages": [{"order": 1, "steps": 2}, {"order": 2, "steps": 2}, {"order": 3}],
            "objective": {"lambda2": 0.5, "lambda3": 0.1, "divergence": "exact"},
            "ode": {"rtol": 1e-3, "atol": 1e-3},
        },
        "data": {"class_path": "hosm_lightning.data.SyntheticDataModule",
                 "init_args": {"name": "mog1d", "batch_size": 64, "steps_per_epoch": 6, "val_size": 64,
                               "test_size": 64}},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    """In-process runs see only their own arguments (LightningCLI also reads sys.argv)."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``python cli.py ARGS`` in this process, through the console entry point: (exit status, stdout, stderr)."""
    sys.argv = ["cli.py", *args]
    try:
        run_cli()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = ["cli.py"]
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    """The single ``hosm-lightning: error:`` line of stderr (informational log lines may precede it)."""
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("hosm-lightning: error: "), err[-3000:]
    return errors[0]


def printed_paths(stdout: str) -> list[str]:
    """The paths of the 'outputs:' block a command prints at its end."""
    block = stdout.split("\noutputs:\n")[-1] if "\noutputs:\n" in stdout else ""
    return re.findall(r"^  [^:\n]+:\s+(\S+)$", block, re.M)


def tb_tags(logdir: Path) -> dict:
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`fit` of the tiny config from an empty working directory; its stdout is kept."""
    tmp = tmp_path_factory.mktemp("cli")
    cwd = tmp / "cwd"
    cwd.mkdir()
    cfg = tiny_config(tmp / "tiny.yaml", tmp / "run")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(sys, "argv", ["cli.py"])
        with redirect_stdout(out):
            fitted = main(["fit", "--config", str(cfg)])
    return SimpleNamespace(root=tmp / "run", cfg=str(cfg), cli=fitted, stdout=out.getvalue(), cwd=cwd, tmp=tmp,
                           last=str(tmp / "run" / "checkpoints" / "last.ckpt"))


# -- fit ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fit_writes_everything_of_the_run_into_its_folder(run):
    assert run.cli.trainer.global_step == 6
    ckpts = sorted(p.name for p in (run.root / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step000002.ckpt", "step000004.ckpt", "step000006.ckpt"]
    for rel in ("config.yaml", "hparams.yaml", "plots/density_latest.png", "plots/density_step000006.png",
                "plots/samples_latest.png"):
        assert (run.root / rel).is_file(), rel
    tags = tb_tags(run.root)  # TensorBoard writes into the run folder itself (no version_N)
    for tag in ("train/loss", "train/dsm1", "train/dsm2", "train/dsm3", "train/order", "train/stage",
                "train/grad_norm", "train/lr", "val/loss", "val/dsm3", "val/nll", "val/nll_gap", "val/nfe"):
        assert tag in tags["scalars"], tag
    assert "hp_metric" not in tags["scalars"]
    assert {"val/density", "val/samples"} <= set(tags["images"])
    assert not list(run.tmp.rglob("version_*")) and not list(run.tmp.rglob("lightning_logs"))
    assert list(run.cwd.iterdir()) == []  # nothing outside the run folder
    shown = printed_paths(run.stdout)
    assert str(run.root) in shown and run.last in shown and all(Path(p).exists() for p in shown), run.stdout
    # config.yaml is the full config of the run, defaults filled in
    saved = yaml.safe_load((run.root / "config.yaml").read_text())
    assert saved["model"]["stages"][2] == {"order": 3, "steps": None, "lr": None}
    assert saved["trainer"]["max_steps"] == 6 and saved["data"]["init_args"]["test_size"] == 64


# -- evaluation subcommands from a checkpoint ---------------------------------------------------------------
@pytest.mark.slow
def test_test_and_likelihood_write_the_result_of_every_point(run, capsys, monkeypatch):
    monkeypatch.chdir(run.cwd)
    tested = main(["test", "--config", run.cfg, "--ckpt_path", run.last])
    metrics = {k: float(v) for k, v in tested.trainer.callback_metrics.items()}
    summary = json.loads((run.root / "likelihood" / "test_nll.json").read_text())
    per = np.load(run.root / "likelihood" / "test_per_sample.npz")
    assert summary["n"] == 64 and summary["metric"] == "nll" and summary["split"] == "test"
    assert summary["entropy"] == pytest.approx(-0.12885, abs=1e-4)
    assert per["index"].tolist() == list(range(64)) and per["value"].shape == (64, 1)
    assert per["mean"].mean() == pytest.approx(summary["mean"], abs=1e-9)
    assert metrics["test/nll"] == pytest.approx(summary["mean"], abs=1e-5)
    assert metrics["test/nll_gap"] == pytest.approx(summary["mean"] - summary["entropy"], abs=1e-5)
    assert metrics["test/kl"] == pytest.approx(summary["kl"], abs=1e-5) and metrics["test/nfe"] > 0
    assert set(printed_paths(capsys.readouterr().out)) >= {str(run.root / "likelihood" / "test_nll.json"),
                                                            str(run.root / "likelihood" / "test_per_sample.npz")}

    out = run.tmp / "ll"
    main(["likelihood", "--config", run.cfg, "--ckpt_path", run.last, "--out_dir", str(out)])
    res = json.loads((out / "test_nll.json").read_text())
    assert res["mean"] == pytest.approx(summary["mean"], abs=1e-6)  # the same weights, points and seeds as `test`
    assert "| test | 64 |" in capsys.readouterr().out
    main(["likelihood", "--config", run.cfg, "--ckpt_path", run.last, "--out_dir", str(out), "--split", "val",
          "--max_samples", "16"])
    val = json.loads((out / "val_nll.json").read_text())
    assert val["split"] == "val" and val["n"] == 16
    assert np.load(out / "val_per_sample.npz")["index"].tolist() == list(range(16))
    assert list(run.cwd.iterdir()) == []


@pytest.mark.slow
def test_validate_and_sample_from_a_checkpoint(run, capsys, monkeypatch):
    monkeypatch.chdir(run.cwd)
    validated = main(["validate", "--config", run.cfg, "--ckpt_path", run.last])
    metrics = validated.trainer.callback_metrics
    assert metrics["val/nll"].isfinite() and metrics["val/dsm1"] > 0 and metrics["val/nfe"] > 0
    capsys.readouterr()
    main(["sample", "--config", run.cfg, "--ckpt_path", run.last, "--num_samples", "50", "--batch_size", "20"])
    samples = np.load(run.root / "samples" / "samples.npz")["samples"]
    assert samples.shape == (50, 1) and np.isfinite(samples).all() and samples.std() > 0
    assert (run.root / "samples" / "samples.png").stat().st_size > 0
    shown = printed_paths(capsys.readouterr().out)
    assert str(run.root / "samples" / "samples.npz") in shown
    assert list(run.cwd.iterdir()) == []


@pytest.mark.slow
def test_diagnose_compares_checkpoints_on_one_figure(run, capsys):
    out = run.tmp / "diag"
    main(["diagnose", "--config", run.cfg, "--ckpt_path", str(run.root / "checkpoints" / "step000002.ckpt"),
          "--compare", json.dumps([run.last]), "--labels", json.dumps(["early", "late"]), "--num_times", "2",
          "--num_points", "8", "--identity_points", "8", "--rtol", "1e-2", "--out_dir", str(out)])
    res = json.loads((out / "diagnose.json").read_text())
    assert list(res["reports"]) == ["early", "late"] and set(res["identity"]) == {"early", "late"}
    for rep in res["reports"].values():
        assert len(rep["t"]) == 2 and rep["n"] == 8 and len(rep["bands"]) == 3
        for key in ("first_order", "self_gap", "fisher", "kl_integrand"):
            assert all(math.isfinite(v) for v in rep[key]), key
        assert rep["first_order"][0] > 0  # a briefly trained network is not the exact score
    assert res["reports"]["early"]["first_order"] != res["reports"]["late"]["first_order"]
    assert (out / "diagnose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| early |" in printed and "| late |" in printed and "KL identity" in printed


def test_band_integrals_split_the_kl_integral_by_noise_level():
    rep = {"t": [0.0, 0.5, 1.0], "sigma": [0.01, 0.5, 50.0], "kl_integrand": [2.0, 2.0, 2.0]}
    # ½ ∫ 2 dt over [0, 1] = 1, split at the segment midpoints σ = √(0.01·0.5) ≈ 0.07 and √(0.5·50) = 5
    assert band_integrals(rep) == pytest.approx([0.5, 0.0, 0.5])
    rep = {"t": [0.0, 0.25, 1.0], "sigma": [0.5, 0.6, 0.9], "kl_integrand": [0.0, 4.0, 0.0]}
    assert band_integrals(rep) == pytest.approx([0.0, 0.25 * 4.0 * 0.25 + 0.25 * 4.0 * 0.75, 0.0])


# -- resuming and refusing to overwrite ----------------------------------------------------------------
@pytest.mark.slow
def test_resume_with_ckpt_path_last_takes_the_command_line_over_the_checkpoint(run, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(run.root / "checkpoints", root / "checkpoints")
    code, _, err = cli(capsys, "fit", "--config", run.cfg, f"--trainer.default_root_dir={root}")
    line = one_error_line(err)  # a fresh fit would write last-v1.ckpt beside the old run
    assert code == 2 and "already holds checkpoints" in line and "--ckpt_path last" in line
    assert not list(root.rglob("*-v1.ckpt"))
    resumed = main(["fit", "--config", run.cfg, f"--trainer.default_root_dir={root}", "--ckpt_path", "last",
                    "--trainer.max_steps=8", "--model.stages=[{order: 1, steps: 6}, {order: 2}]"])
    assert resumed.trainer.ckpt_path == str(root / "checkpoints" / "last.ckpt")
    assert resumed.trainer.global_step == 8
    # the checkpoint's own stages (1 → 2 → 3) would train order 3 now
    assert resumed.model.current_stage()[1].order == 2 and resumed.trainer.callback_metrics["train/order"] == 2
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


# -- checkpoints are checked before anything reads them ----------------------------------------------------
@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    """A text file, a missing file, and checkpoints of another data dimension / architecture / SDE."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "notes.txt").write_text("these are my notes\n")
    paths = {"text": tmp / "notes.txt", "missing": tmp / "nowhere.ckpt"}
    for kind, model in (("dim2", HOSMModule(ToyScoreNet(dim=2, **NET))),
                        ("width", HOSMModule(ToyScoreNet(dim=1, **{**NET, "encoder_width": 48}))),
                        ("vpsde", HOSMModule(ToyScoreNet(dim=1, **NET), sde=VPSDE()))):
        paths[kind] = tmp / f"{kind}.ckpt"
        torch.save({"state_dict": model.state_dict(), "hosm_signature": model.model_signature(), "global_step": 5,
                    "optimizer_states": [], "pytorch-lightning_version": L.__version__}, paths[kind])
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("sub,kind,expect", [
    ("fit", "text", "not a readable checkpoint"),
    ("validate", "missing", "does not exist"),
    ("test", "dim2", "shape mismatch"),
    ("sample", "width", "shape mismatch"),
    ("likelihood", "vpsde", "VPSDE"),
    ("diagnose", "text", "not a readable checkpoint"),
])
def test_every_subcommand_checks_its_checkpoint_first(sub, kind, expect, bad_checkpoints, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "tiny.yaml", tmp_path / "run")
    path = bad_checkpoints[kind]
    code, _, err = cli(capsys, sub, "--config", str(cfg), "--ckpt_path", str(path))
    line = one_error_line(err)
    assert code == 2 and str(path) in line and expect in line, line
    assert not list(tmp_path.rglob("events.*"))  # nothing was run before the check


# -- one-line errors that name what to fix --------------------------------------------------------------
def _typo_file(tmp: Path, cfg: Path, group: str, key: str) -> str:
    """The tiny config with ``key`` of ``group`` renamed to a typo (one letter dropped)."""
    data = yaml.safe_load(cfg.read_text())
    section = data
    for part in group.split("."):
        section = section[part]
    section[key.replace("_", "", 1) if "_" in key else key.replace("b", "", 1)] = section.pop(key)
    path = tmp / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


ERRORS = {  # id: (arguments after the subcommand given the tiny config and a tmp folder, the line contains)
    "objective": (lambda c, t: ["fit", "--config", c, "--model.objective.lambda2=-1"],
                  ["model.objective.lambda2 must be"]),
    "ode": (lambda c, t: ["fit", "--config", c, "--model.ode.rtol=0"], ["model.ode.rtol must be"]),
    "time-proposal-pairing": (lambda c, t: ["fit", "--config", c, "--model.objective.time_proposal=importance"],
                              ["model.objective.time_proposal", "weighting: likelihood"]),
    "fit-options": (lambda c, t: ["fit", "--config", c, "--model.fit.check_finite_every=-1"],
                    ["model.fit.check_finite_every must be"]),
    "evaluation": (lambda c, t: ["test", "--config", c, "--model.evaluation.num_repeats=0"],
                   ["model.evaluation.num_repeats must be"]),
    "stages": (lambda c, t: ["fit", "--config", c, "--model.stages=[{order: 4}]"], ["model.stages[0].order"]),
    "data-dimension": (lambda c, t: ["fit", "--config", c, "--model.net.init_args.dim=2"],
                       ["model.net.init_args.dim"]),
    "ema-never-updated": (lambda c, t: ["fit", "--config", str(ROOT / "configs" / "mog1d.yaml"), "--config",
                                        str(ROOT / "configs" / "mog1d_order1.yaml"), "--trainer.max_steps=100",
                                        f"--trainer.default_root_dir={t}/run", *(f"--model.net.init_args.{k}={v}"
                                                                                   for k, v in NET.items())],
                          ["update_starting_at_step", "max_steps=100"]),
    "likelihood-split": (lambda c, t: ["likelihood", "--config", c, "--split", "train"], ["--split"]),
    "missing-data": (lambda c, t: ["fit", "--config", str(ROOT / "configs" / "cifar10_vp_ddpmpp.yaml"),
                                   f"--data.init_args.root={t}/nowhere", f"--trainer.default_root_dir={t}/run",
                                   "--trainer.callbacks=[]", "--model.net.init_args.nf=16",
                                   "--model.net.init_args.ch_mult=[1, 2]", "--model.net.init_args.num_res_blocks=1"],
                     ["nowhere", "download"]),
    "mistyped-option": (lambda c, t: ["fit", "--config", c, "--model.objective.lamda2", "0.5"],
                        ["--model.objective.lamda2", "did you mean --model.objective.lambda2?"]),
    "mistyped-data-key": (lambda c, t: ["fit", "--config", _typo_file(t, Path(c), "data.init_args", "batch_size")],
                          ["batchsize", "did you mean data.init_args.batch_size?"]),
    "mistyped-settings-key": (lambda c, t: ["fit", "--config", _typo_file(t, Path(c), "model.objective", "lambda3")],
                              ["lamda3", "did you mean model.objective.lambda3?"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line_with_exit_status_2(case, tmp_path, capsys):
    make_args, expected = ERRORS[case]
    cfg = tiny_config(tmp_path / "tiny.yaml", tmp_path / "run")
    code, _, err = cli(capsys, *make_args(str(cfg), tmp_path))
    line = one_error_line(err)
    assert code == 2, (code, err[-2000:])
    for text in expected:
        assert text in line, (text, line)


@pytest.mark.slow
def test_diagnose_needs_data_with_an_exact_density(bad_checkpoints, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "tiny.yaml", tmp_path / "run")
    code, _, err = cli(capsys, "diagnose", "--config", str(cfg), "--data.init_args.name=checkerboard",
                       "--model.net.init_args.dim=2", "--ckpt_path", str(bad_checkpoints["dim2"]))
    assert code == 2 and "exact density" in one_error_line(err)


@pytest.mark.parametrize("settings,key", [
    (lambda: HOSMObjective(lambda3=-1), "model.objective.lambda3"),
    (lambda: ODEOptions(atol=0), "model.ode.atol"),
    (lambda: FitOptions(grad_norm_every=-2), "model.fit.grad_norm_every"),
    (lambda: EvalOptions(num_importance=0), "model.evaluation.num_importance"),
])
def test_error_message_names_the_config_key_of_a_bad_setting(settings, key):
    with pytest.raises(SettingsError) as info:
        settings()
    assert error_message(info.value).startswith(f"{key} must be")
    try:  # config parsers wrap the error: the key is still found through the chain of causes
        raise ValueError("Problem with given class_path") from info.value
    except ValueError as wrapped:
        assert error_message(wrapped).startswith(f"{key} must be")
    assert set(CONFIG_KEYS.values()) == {"model.objective", "model.ode", "model.fit", "model.evaluation"}


# -- help ---------------------------------------------------------------------------------------------
def _help(capsys, *args) -> str:
    with pytest.raises(SystemExit):
        main([*args])
    return capsys.readouterr().out


def _undocumented(text: str, prefix: str) -> list[str]:
    """Options ``--<prefix>...`` whose help entry has no description (only a type or default in brackets)."""
    bad = []
    for entry in re.split(r"\n(?=  --)", text):
        lines = entry.splitlines()
        if not lines or not lines[0].startswith("  --"):
            continue
        head = re.split(r"\s{2,}", lines[0].strip(), maxsplit=1)  # "--opt METAVAR" [gap] "description..."
        opt = head[0].split()[0].rstrip(",")
        if not opt.startswith(f"--{prefix}") or opt.endswith(".help"):
            continue
        desc = " ".join(head[1:] + [ln.strip() for ln in lines[1:] if ln.strip()])
        if not desc or desc.startswith("("):
            bad.append(opt)
    return bad


@pytest.mark.slow
def test_help_lists_our_classes_and_describes_every_option(capsys):
    text = _help(capsys, "fit", "--help")
    assert "torch.nn.modules" not in text and "torch.nn.Linear" not in text  # not every nn.Module of torch
    for cls in ("ToyScoreNet", "SmallConvNet", "DDPMpp", "NCSNpp"):
        assert f"hosm_lightning.nets.{cls}" in text
    for cls in ("SyntheticDataModule", "CIFAR10DataModule"):
        assert f"hosm_lightning.data.{cls}" in text
    for key in ("--model.objective.lambda2", "--model.ode.rtol", "--model.fit.init_from", "--model.evaluation.num_repeats"):
        assert key in text, key
    assert _undocumented(text, "model.") == []
    for cls in ("ToyScoreNet", "SmallConvNet", "DDPMpp", "NCSNpp"):
        net = _help(capsys, "fit", "--model.net.help", cls)
        assert re.search(r"^  --model\.net\.\w+", net, re.M) and _undocumented(net, "model.net.") == [], cls
    for cls in ("SyntheticDataModule", "CIFAR10DataModule"):
        data = _help(capsys, "fit", "--data.help", cls)
        assert re.search(r"^  --data\.\w+", data, re.M) and _undocumented(data, "data.") == [], cls
    for sub, option in (("sample", "--num_samples"), ("likelihood", "--dequantization"), ("diagnose", "--compare")):
        sub_help = _help(capsys, sub, "--help")
        assert option in sub_help and _undocumented(sub_help, option[2:]) == [], sub
    top = _help(capsys, "--help")
    for sub in ("fit", "validate", "test", "sample", "likelihood", "diagnose"):
        assert sub in top, sub
    assert "predict" not in top


# -- the shell -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fit_from_the_shell_prints_no_library_warnings(tmp_path):
    """`python cli.py fit` through orders 1 → 2 → 3 and a validation: exit status 0, only our own lines."""
    cfg = tiny_config(tmp_path / "tiny.yaml", tmp_path / "run")
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(cfg), "--trainer.max_steps=3",
                          "--trainer.val_check_interval=3", "--model.stages=[{order: 1, steps: 1}, {order: 2, steps: 1}, "
                          "{order: 3}]"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    noise = [ln for ln in (res.stderr + res.stdout).splitlines() if re.search(r"\.py:\d+:|Warning\b|warn\(|Tip:", ln)]
    assert noise == [], noise
    shown = printed_paths(res.stdout)  # relative to the working directory of the command
    assert "run/checkpoints/last.ckpt" in shown and all((tmp_path / p).exists() for p in shown), res.stdout
    assert "hp_metric" not in tb_tags(tmp_path / "run")["scalars"]
