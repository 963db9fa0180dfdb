"""Issue 11: a first run that a newcomer can follow.

Short runs evaluate trained weights (EMA), init_from weights are the EMA at step 0, every subcommand
checks its checkpoint first (one-line errors), mistyped keys get a "did you mean", --help lists our
nets and data modules with a description of every option, a fit prints no library warning, and
Ctrl-C before the first periodic checkpoint leaves a resumable last.ckpt.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from hosm_lightning.cli import main, run_cli

ROOT = Path(__file__).resolve().parents[1]
TOY = ["mog1d", "checkerboard", "swissroll"]
#: override configs and the base each is composed on (LightningCLI's repeated --config)
BASES = {"swissroll": "checkerboard"}
TINY_NET = ["--model.net.init_args.encoder_width=32", "--model.net.init_args.embed_dim=16",
            "--model.net.init_args.decoder_width=64"]


def _args(name: str, root: Path, *extra: str) -> list[str]:
    """configs/<name>.yaml as written, shrunk through command-line overrides only."""
    base = ["--config", str(ROOT / "configs" / f"{BASES[name]}.yaml")] if name in BASES else []
    return [*base, "--config", str(ROOT / "configs" / f"{name}.yaml"), f"--trainer.default_root_dir={root}",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--data.init_args.batch_size=256", "--data.init_args.val_size=64", "--data.init_args.test_size=256",
            "--data.init_args.steps_per_epoch=100", "--model.ode.rtol=1e-3", "--model.ode.atol=1e-3",
            *TINY_NET, *extra]


# -- 1. weight averaging never leaves the model worse than its raw weights ------------------------
@pytest.mark.parametrize("name", TOY)
def test_100_step_fit_evaluates_trained_weights(name, tmp_path):
    """configs/mog1d.yaml started the average at step 200: a 100-step checkpoint held the seed-0
    network (max difference 0.0) and test/nll was the untrained one."""
    args = _args(name, tmp_path / name, "--trainer.max_steps=100", "--trainer.limit_val_batches=0")
    untrained = main(["test", *args])
    init_state = {k: v.clone() for k, v in untrained.model.state_dict().items()}
    nll0 = untrained.trainer.callback_metrics["test/nll"].item()
    fitted = main(["fit", *args])
    ckpt = fitted.trainer.checkpoint_callback.last_model_path
    assert fitted.trainer.global_step == 100 and Path(ckpt).is_file()
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    moved = max((saved[k].float() - init_state[k].float()).abs().max().item() for k in init_state)
    assert moved > 1e-3, f"{name}: the checkpoint's evaluated weights are the initial ones"
    tested = main(["test", *args, "--ckpt_path", ckpt])
    nll = tested.trainer.callback_metrics["test/nll"].item()
    assert nll < nll0 - 0.05, (name, nll, nll0)


def test_never_updated_average_keeps_trained_weights(tmp_path):
    from hosm_lightning.lit.ema import HOSMEMA

    args = _args("mog1d", tmp_path / "r", "--trainer.max_steps=5", "--trainer.limit_val_batches=0")
    cli = main(args, run=False)
    ema = next(cb for cb in cli.trainer.callbacks if isinstance(cb, HOSMEMA))
    ema.start_spec = ema.update_starting_at_step = 50  # after the end of the run
    init = [p.detach().clone() for p in cli.model.parameters()]
    with pytest.warns(UserWarning, match="never be updated"):
        cli._default_checkpoint_dirs()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert ema.num_updates == 0
    assert max((p - q).abs().max().item() for p, q in zip(cli.model.parameters(), init)) > 0
    saved = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)
    for k, v in cli.model.state_dict().items():  # the checkpoint holds the trained weights, not the init
        assert torch.equal(saved["state_dict"][k], v.cpu()), k


def test_ema_warmup_forgets_the_first_steps():
    """decay 0.999 from step 0: 82 % of the average after 200 steps came from step 1."""
    from hosm_lightning.lit.ema import warmup_decay

    weight_of_first = 1.0
    for n in range(1, 200):
        weight_of_first *= warmup_decay(0.999, n)
    assert weight_of_first < 1e-3


class _Probe(L.Callback):
    """Records the averaged weights when the first training batch starts."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and not hasattr(self, "state"):
            ema = next(cb for cb in trainer.callbacks if hasattr(cb, "_average_model"))
            self.state = {k[len("module."):]: v.detach().clone() for k, v in ema._average_model.state_dict().items()
                          if k.startswith("module.")}


def test_init_from_weights_are_the_average_at_step_0(tmp_path):
    """Lightning's EMA copies the model in its setup, before HOSMModule.setup loads init_from."""
    src = main(["fit", *_args("mog1d", tmp_path / "src", "--trainer.max_steps=3", "--trainer.limit_val_batches=0")])
    ckpt = src.trainer.checkpoint_callback.last_model_path
    loaded = torch.load(ckpt, weights_only=True)["state_dict"]
    cli = main([*_args("mog1d", tmp_path / "ft", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                              f"--model.fit.init_from={ckpt}", "--seed_everything=1")], run=False)
    probe = _Probe()
    cli.trainer.callbacks.append(probe)
    cli._default_checkpoint_dirs()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    for k, v in loaded.items():
        assert torch.equal(probe.state[k].cpu(), v), k


# -- 6. Ctrl-C before the first periodic checkpoint ------------------------------------------------
class _CtrlC(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            raise KeyboardInterrupt


def test_interrupt_leaves_a_resumable_last_ckpt(tmp_path):
    args = _args("mog1d", tmp_path / "run", "--trainer.max_steps=6", "--trainer.limit_val_batches=0")
    cli = main(args, run=False)
    cli.trainer.callbacks.append(_CtrlC())
    cli._default_checkpoint_dirs()
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        signal.signal(signal.SIGINT, handler)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file() and torch.load(last, weights_only=True)["global_step"] == 3
    resumed = main(["fit", *args, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 6


# -- 2. one loader, one-line errors -----------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    """A text file, a missing file, and checkpoints of another dimension / architecture / SDE."""
    from hosm_lightning.core.sde import VPSDE
    from hosm_lightning.lit.module import HOSMModule
    from hosm_lightning.nets import ToyScoreNet

    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "notes.txt").write_text("these are my notes\n")
    paths = {"text": tmp / "notes.txt", "missing": tmp / "nowhere.ckpt"}
    for kind, model in (("dim2", HOSMModule(ToyScoreNet(dim=2, encoder_width=32, embed_dim=16, decoder_width=64))),
                        ("width", HOSMModule(ToyScoreNet(dim=1, encoder_width=48, embed_dim=16, decoder_width=64))),
                        ("vpsde", HOSMModule(ToyScoreNet(dim=1, encoder_width=32, embed_dim=16, decoder_width=64),
                                             sde=VPSDE()))):
        paths[kind] = tmp / f"{kind}.ckpt"
        torch.save({"state_dict": model.state_dict(), "hosm_signature": model.model_signature(), "global_step": 5,
                    "optimizer_states": [], "pytorch-lightning_version": L.__version__}, paths[kind])
    return paths


EXPECT = {"text": "not a readable checkpoint", "missing": "does not exist", "dim2": "shape mismatch",
          "width": "shape mismatch", "vpsde": "VPSDE"}


@pytest.mark.parametrize("sub", ["fit", "validate", "test", "sample", "likelihood"])
def test_every_subcommand_rejects_wrong_checkpoints_in_one_line(sub, bad_checkpoints, tmp_path, monkeypatch, capsys):
    for kind, path in bad_checkpoints.items():
        argv = ["cli.py", sub, *_args("mog1d", tmp_path / kind, "--trainer.max_steps=2"), "--ckpt_path", str(path)]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exc:
            run_cli()
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2, (sub, kind)
        assert len(err) == 1 and err[0].startswith("hosm-lightning: error:"), (sub, kind, err)
        assert str(path) in err[0] and EXPECT[kind] in err[0], (sub, kind, err[0])
        assert not (tmp_path / kind).exists() or not any((tmp_path / kind).rglob("events.*")), (sub, kind)


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_wrong_checkpoint_and_mistyped_key_from_the_shell(bad_checkpoints):
    res = _cli("test", "--config", "configs/mog1d.yaml", "--ckpt_path", str(bad_checkpoints["text"]))
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert res.returncode == 2 and len(errors) == 1, res.stderr
    assert errors[0].startswith("hosm-lightning: error:") and str(bad_checkpoints["text"]) in errors[0]
    res = _cli("fit", "--config", "configs/mog1d.yaml", "--model.objective.lamda2", "0.5")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "hosm-lightning: error: unknown option --model.objective.lamda2; did you mean --model.objective.lambda2? "
        "(`cli.py fit --help` lists the options)"], res.stderr


def test_mistyped_config_file_key_did_you_mean(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setattr(sys, "argv", ["cli.py"])  # LightningCLI warns when sys.argv and args are both given

    cfg = yaml.safe_load((ROOT / "configs" / "mog1d.yaml").read_text())
    cfg["data"]["init_args"]["batchsize"] = cfg["data"]["init_args"].pop("batch_size")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(tmp_path / "typo.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert "batchsize" in err[0] and "did you mean data.init_args.batch_size?" in err[0]
    cfg = yaml.safe_load((ROOT / "configs" / "mog1d.yaml").read_text())
    cfg["model"]["objective"]["lamda3"] = cfg["model"]["objective"].pop("lambda3")
    (tmp_path / "typo2.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "typo2.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean model.objective.lambda3?" in err[0], err


# -- 5. help that helps -------------------------------------------------------------------------
def _help(capsys, *args) -> str:
    with pytest.raises(SystemExit):
        main([*args])
    return capsys.readouterr().out


def _undocumented(text: str, prefix: str) -> list[str]:
    """Options ``--<prefix>...`` whose help entry has no description before '(type: ...)'."""
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


def test_help_lists_our_nets_and_data_modules_with_descriptions(capsys):
    text = _help(capsys, "fit", "--help")
    assert len(text.splitlines()) < 800, len(text.splitlines())  # was 1288, ~700 of them torch.nn classes
    assert "torch.nn.Linear" not in text and "torch.nn.modules" not in text
    for cls in ("ToyScoreNet", "SmallConvNet", "DDPMpp", "NCSNpp"):
        assert f"hosm_lightning.nets.{cls}" in text
    for cls in ("SyntheticDataModule", "CIFAR10DataModule"):
        assert f"hosm_lightning.data.{cls}" in text
    assert _undocumented(text, "model.") == []
    for cls in ("ToyScoreNet", "SmallConvNet", "DDPMpp", "NCSNpp"):
        assert _undocumented(_help(capsys, "fit", "--model.net.help", cls), "model.net.") == [], cls
    for cls in ("SyntheticDataModule", "CIFAR10DataModule"):
        assert _undocumented(_help(capsys, "fit", "--data.help", cls), "data.") == [], cls
    sample = _help(capsys, "sample", "--help")
    assert _undocumented(sample, "") == [] or set(_undocumented(sample, "")) <= {"--config", "--print_config"}
    top = _help(capsys, "--help")
    assert "predict" not in top and "likelihood" in top


# -- 4. a clean console ---------------------------------------------------------------------------
def test_fit_prints_no_library_warning(tmp_path):
    """Counted before the fix: LeafSpec deprecation, IterableDataset __len__, torch.jit.script when the
    order-3 stage starts; hp_metric logged as -1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = _cli("fit", "--config", "configs/mog1d.yaml", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.max_steps=6", "--trainer.val_check_interval=6", "--data.init_args.val_size=64",
               "--data.init_args.batch_size=128", "--model.stages=[{order: 1, steps: 2}, {order: 2, steps: 2}, {order: 3}]",
               "--model.ode.rtol=1e-3", "--model.ode.atol=1e-3", *TINY_NET)
    assert res.returncode == 0, res.stderr[-3000:]
    noise = [ln for ln in (res.stderr + res.stdout).splitlines()
             if re.search(r"\.py:\d+:|Warning\b|warn\(|Tip:", ln)]
    assert noise == [], noise
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "hp_metric" not in acc.Tags()["scalars"] and "val/nll" in acc.Tags()["scalars"]
