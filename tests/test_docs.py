"""The documentation works as written.

* The ``python cli.py`` commands of README.md, docs/quickstart.md and the comments at the top of the
  toy configs run as written, in order, in a fresh working directory whose ``configs/`` holds the
  toy configs shrunk to test size (same keys, smaller numbers); every path a command prints exists
  afterwards, and nothing is written outside ``runs/`` (plus the documented ``my.yaml``). A command
  that two of them name runs once. CIFAR-10 commands need the data set and GPUs: they are skipped
  here, and the CIFAR-10 configs are trained at tiny scale on fake data instead.
* `make demo` (``python -m hosm_lightning.demo``) prints paths that exist.
* Every config parses, the override files compose on the base their comments name, and the printed
  full config parses back to itself.
* The options the README names for each subcommand are options of that subcommand.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hosm_lightning.cli import main, run_cli

from helpers import ROOT

#: override files and the base config each is composed on (LightningCLI's repeated --config)
BASES = {"mog1d_order1": "mog1d", "mog1d_finetune": "mog1d", "swissroll": "checkerboard",
         "cifar10_vp_ddpmpp_deep": "cifar10_vp_ddpmpp", "cifar10_photos32": "cifar10_vp_ddpmpp",
         "images_finetune": "digits", "likelihood_weighting": "digits", "velocity": "digits"}
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
TOY = [name for name in CONFIGS if "cifar10" not in name]
STEPS = 4  # training steps of every shrunk run; its stages end at steps 2, 3 and 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])


# -- configs at test size ---------------------------------------------------------------------------------
def shrink(cfg: dict) -> dict:
    """A config (base or override) with the same keys and smaller numbers: STEPS steps, a checkpoint
    every step, one validation, small plots, a narrow toy net, 64-point batches and splits."""
    base = "class_path" in (cfg.get("data") or {})
    tr = cfg.get("trainer") or {}
    for key in ("max_steps", "val_check_interval"):
        if key in tr:
            tr[key] = STEPS
    if base:
        tr.update(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    for cb in tr.get("callbacks") or []:
        args, name = cb.setdefault("init_args", {}), cb["class_path"].rsplit(".", 1)[-1]
        if name == "HOSMCheckpoint":
            args["every_n_train_steps"] = 1
        elif name == "DensityPlotCallback":
            args.update(grid_size=20, grid_size_2d=6, num_samples=16, ode={"rtol": 1e-3, "atol": 1e-3})
        elif name == "HOSMEMA" and isinstance(args.get("update_starting_at_step"), int):
            args["update_starting_at_step"] = 1
    model = cfg.get("model") or {}
    for i, stage in enumerate(model.get("stages") or []):
        if stage.get("steps") is not None:
            stage["steps"] = 2 if i == 0 else 1
    if "net" in model and model["net"]["class_path"].endswith("ToyScoreNet"):
        model["net"].setdefault("init_args", {}).update(encoder_width=32, embed_dim=16, decoder_width=64)
    if base:
        model["ode"] = {**(model.get("ode") or {}), "rtol": 1e-3, "atol": 1e-3}
    data = (cfg.get("data") or {}).get("init_args") or {}
    for key, value in (("batch_size", 64), ("steps_per_epoch", STEPS), ("val_size", 64), ("test_size", 64)):
        if key in data:
            data[key] = value
    if "source" in data:  # real images: bits/dim of a few test images per `test`
        model["evaluation"] = {**(model.get("evaluation") or {}), "max_samples": 8}
    return cfg


def write_toy_configs(dest: Path) -> None:
    (dest / "configs").mkdir(parents=True, exist_ok=True)
    for name in TOY:
        cfg = shrink(yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()))
        (dest / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


# -- documented commands ----------------------------------------------------------------------------------
def canonical(line: str) -> str:
    """A command without its comment, quoted the one way (the same command written twice compares equal)."""
    return shlex.join(shlex.split(line, comments=True))


def doc_commands(path: Path) -> list[str]:
    """Every ``python cli.py ...`` line of a Markdown file's ```bash blocks (continuations joined)."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        cmds += [canonical(ln) for ln in block.replace("\\\n", " ").splitlines() if ln.strip().startswith("python cli.py")]
    return cmds


def config_commands(path: Path) -> list[str]:
    """The ``python cli.py ...`` commands in a config file's comments (continuations joined)."""
    lines = [ln.lstrip("#").strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [canonical(ln) for ln in joined.splitlines() if ln.startswith("python cli.py")]


def toy_only(cmds: list[str]) -> list[str]:
    return [c for c in cmds if "cifar10" not in c]


def printed_paths(stdout: str) -> list[str]:
    """Paths a command printed: its 'outputs:' block, plus anything under runs/."""
    block = stdout.split("\noutputs:\n")[-1] if "\noutputs:\n" in stdout else ""
    paths = re.findall(r"^  [^:\n]+:\s+(\S+)$", block, re.M)
    paths += re.findall(r"(?<![\w/.])(runs/[\w./-]+)", stdout)
    return [p.rstrip(".,)") for p in paths]


def run_command(line: str, capsys, expect: int = 0) -> tuple[str, str]:
    """One documented command in this process, as ``python cli.py`` runs it; (stdout, stderr)."""
    tokens = shlex.split(line, comments=True)
    out_file = None
    if ">" in tokens:
        i = tokens.index(">")
        tokens, out_file = tokens[:i], tokens[i + 1]
    assert tokens[:2] == ["python", "cli.py"], line
    sys.argv = ["cli.py", *tokens[2:]]
    code = 0
    try:
        run_cli()
    except SystemExit as exc:  # --print_config exits 0 after printing; errors exit 2
        code = exc.code or 0
    finally:
        sys.argv = ["cli.py"]
    captured = capsys.readouterr()
    assert code == expect, (line, code, captured.err[-3000:])
    if out_file:
        Path(out_file).write_text(captured.out)
    return captured.out, captured.err


class Workspace:
    """A working directory with the shrunk toy configs, in which documented commands run once each."""

    def __init__(self, path: Path):
        self.path, self.done = path, []
        write_toy_configs(path)

    def run(self, cmds: list[str], capsys) -> None:
        for line in cmds:
            if line in self.done:
                continue
            out, _ = run_command(line, capsys)
            self.done.append(line)
            paths = printed_paths(out)
            if "--print_config" not in line:
                assert paths, (line, out[-2000:])
            missing = [p for p in paths if not (self.path / p).exists()]
            assert missing == [], (line, missing)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One folder for the commands of the README, the quickstart and the configs' comments."""
    return Workspace(tmp_path_factory.mktemp("docs"))


def _scalars(logdir: Path, tag: str) -> list[float]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.mark.slow
def test_readme_commands_run_as_written(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace.path)
    cmds = toy_only(doc_commands(ROOT / "README.md"))
    assert any(c.startswith("python cli.py fit") for c in cmds) and any(" test " in c for c in cmds), cmds
    workspace.run(cmds, capsys)
    ws = workspace.path
    for rel in ("runs/mog1d/checkpoints/last.ckpt", "runs/mog1d/config.yaml", "runs/mog1d/hparams.yaml",
                "runs/mog1d/plots/density_latest.png", "runs/mog1d/samples/samples.npz",
                "runs/mog1d/likelihood/test_nll.json", "runs/mog1d/likelihood/test_per_sample.npz"):
        assert (ws / rel).is_file(), rel  # the run layout the README shows
    samples = [c for c in cmds if c.startswith("python cli.py sample") and "runs/mog1d/" in c and "--num_samples" in c]
    for line in samples:
        n = int(shlex.split(line)[shlex.split(line).index("--num_samples") + 1])
        assert np.load(ws / "runs/mog1d/samples/samples.npz")["samples"].shape == (n, 1)
    # a finished run has nothing left to train: the README's resume command says so in one line
    for line in re.findall(r"`(python cli.py fit [^`]*--ckpt_path last)`", (ROOT / "README.md").read_text()):
        _, err = run_command(canonical(line), capsys, expect=2)
        assert "nothing is left to train" in err, err[-2000:]
    if (ws / "my.yaml").exists():  # "full config, round-trips"
        with pytest.raises(SystemExit):
            main(["fit", "--config", "my.yaml", "--print_config"])
        assert capsys.readouterr().out == (ws / "my.yaml").read_text()
    # everything went into run folders under runs/ (plus the documented my.yaml); no version_N
    assert not list(ws.rglob("version_*")) and not list(ws.rglob("lightning_logs"))
    assert {p.name for p in ws.iterdir()} <= {"configs", "runs", "my.yaml"}


@pytest.mark.slow
def test_quickstart_commands_run_as_written(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace.path)
    cmds = toy_only(doc_commands(ROOT / "docs" / "quickstart.md"))
    assert any(c.startswith("python cli.py fit") for c in cmds), cmds
    workspace.run(cmds, capsys)
    for rel in ("runs/mog1d/checkpoints/last.ckpt", "runs/mog1d/plots/density_latest.png",
                "runs/mog1d/likelihood/test_nll.json", "runs/mog1d/samples/samples.png"):
        assert (workspace.path / rel).is_file(), rel  # the run folder the quickstart describes
    assert {p.name for p in workspace.path.iterdir()} <= {"configs", "runs", "my.yaml"}


@pytest.mark.slow
def test_config_file_commands_run_as_written(workspace, capsys, monkeypatch):
    """The commands in the comments at the top of every toy config, in file order."""
    monkeypatch.chdir(workspace.path)
    for name in TOY:
        workspace.run(config_commands(ROOT / "configs" / f"{name}.yaml"), capsys)
    # mog1d_finetune.yaml's recipe: order 3 at the recipe's learning rate, from the order-1 run's weights
    run = workspace.path / "runs" / "mog1d_finetune"
    recipe = yaml.safe_load((ROOT / "configs" / "mog1d_finetune.yaml").read_text())["model"]
    assert set(_scalars(run, "train/order")) == {float(st["order"]) for st in recipe["stages"]}
    lrs = _scalars(run, "train/lr")
    assert lrs and lrs == pytest.approx([recipe["stages"][0]["lr"]] * len(lrs))
    assert _scalars(run, "train/grad_norm_dsm3")  # grad_norm_every
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["fit"]["init_from"] == "runs/mog1d_order1/checkpoints/last.ckpt"
    assert config["model"]["objective"]["lambda3"] == recipe["objective"]["lambda3"]


# -- make demo -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_make_demo_prints_paths_that_exist(tmp_path, monkeypatch, capsys):
    """`make demo` is `python -m hosm_lightning.demo` (configs/mog1d.yaml into runs/demo)."""
    from hosm_lightning import demo

    write_toy_configs(tmp_path)
    config = tmp_path / "configs" / "mog1d.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["enable_progress_bar"] = True  # the demo's progress, as `make demo` shows it
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    stale = tmp_path / "runs" / "demo" / "checkpoints" / "step000004.ckpt"
    stale.parent.mkdir(parents=True)
    stale.write_text("an earlier demo's checkpoint")  # a second `make demo` replaces the first
    rows = demo.run("configs/mog1d.yaml", "runs/demo")
    out = capsys.readouterr().out
    assert [(r["order"], r["step"]) for r in rows] == [(1, 2), (2, 3), (3, 4)]
    # training progress in a log (stdout is not a terminal here): plain lines with the time left
    assert "training: step 0 of 4" in out and re.search(r"^step 4/4 \(100%\) \|.*left$", out, re.M), out[:2000]
    for r in rows:
        assert r["n"] == 64 and np.isfinite(r["mean"]) and "kl" in r
        assert f"| {r['stage']} | {r['order']} | {r['step']} | {r['mean']:.4f} |" in out
    tb = re.search(r"TensorBoard run: (\S+)", out).group(1)
    plot = re.search(r"density plot:\s+(\S+)", out).group(1)
    assert tb == "runs/demo" and list(Path(tb).glob("events.out.tfevents.*"))
    assert plot == "runs/demo/plots/density_latest.png" and Path(plot).is_file()
    assert all(Path(p).exists() for p in printed_paths(out))
    assert torch.load(stale, weights_only=True)["global_step"] == 4  # the demo's own checkpoint now
    assert not list((tmp_path / "runs" / "demo" / "checkpoints").glob("*-v1.ckpt"))


# -- configs ------------------------------------------------------------------------------------------------
def _print_config(capsys, *configs: str) -> dict:
    args = [a for name in configs for a in ("--config", str(ROOT / "configs" / f"{name}.yaml"))]
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args, "--print_config"])
    assert exc.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


def _merged(base, over):
    """``--config base --config over`` as jsonargparse composes them: mappings merge, other values replace."""
    if isinstance(base, dict) and isinstance(over, dict):
        if "class_path" in over and over["class_path"] != base.get("class_path"):
            return over  # another class: only its own arguments
        return {**base, **{k: _merged(base.get(k), v) for k, v in over.items()}}
    return over


def _holds(full, part, where="") -> None:
    """Every value of ``part`` is in ``full`` (which may hold more keys: the defaults printed)."""
    if isinstance(part, dict):
        assert isinstance(full, dict), where
        for k, v in part.items():
            assert k in full, f"{where}.{k}"
            _holds(full[k], v, f"{where}.{k}")
    elif isinstance(part, list):
        assert isinstance(full, list) and len(full) == len(part), where
        for i, (f, p) in enumerate(zip(full, part)):
            _holds(f, p, f"{where}[{i}]")
    else:
        assert full == part, (where, full, part)


@pytest.mark.slow
def test_every_config_parses_and_overrides_compose_on_their_base(capsys, tmp_path):
    raw = {name: yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()) for name in CONFIGS}
    overrides = {name for name, cfg in raw.items()  # a file without a data module or a network
                 if "class_path" not in (cfg.get("data") or {}) or "net" not in (cfg.get("model") or {})}
    assert overrides == set(BASES), "an override file without its base in BASES"
    full = {name: _print_config(capsys, name) for name in CONFIGS if name not in BASES}
    for name, cfg in full.items():
        _holds(cfg, raw[name], name)
    for name, cfg in raw.items():  # the CLI adds a TensorBoard logger writing into the run folder
        assert "logger" not in (cfg.get("trainer") or {}), name
    for name, base in BASES.items():
        text = (ROOT / "configs" / f"{name}.yaml").read_text()
        assert f"--config configs/{base}.yaml --config configs/{name}.yaml" in text, name  # its comment says how
        composed, own = _print_config(capsys, base, name), raw[name]
        _holds(composed, _merged(full[base], own), name)  # the base's values with the override's changes
    folders = [cfg["trainer"]["default_root_dir"] for cfg in full.values()]
    folders += [raw[name]["trainer"]["default_root_dir"] for name in BASES]
    assert all(f.startswith("runs/") for f in folders) and len(set(folders)) == len(folders), folders
    # the printed full config is a config: it parses back to itself
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full["mog1d"]))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "full.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == full["mog1d"]


@pytest.mark.slow
def test_configs_accept_yaml_interpolation(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "configs" / "mog1d.yaml").read_text())
    cfg["data"]["init_args"]["val_size"] = "${data.init_args.test_size}"
    (tmp_path / "interp.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "interp.yaml"), "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["val_size"] == data["test_size"] == cfg["data"]["init_args"]["test_size"]


# -- the README's subcommand table ------------------------------------------------------------------------
def readme_options() -> dict[str, set[str]]:
    """{subcommand: the --options its row of the README's command table names}."""
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", (ROOT / "README.md").read_text(), re.M)
    return {sub: set(re.findall(r"(--[a-z_][\w.]*)", text)) for sub, text in rows
            if sub in ("fit", "validate", "test", "sample", "likelihood", "diagnose")}


@pytest.mark.slow
def test_the_options_the_readme_names_exist(capsys):
    documented = readme_options()
    assert {"sample", "likelihood", "diagnose"} <= set(documented) and documented["likelihood"], documented
    for sub, options in documented.items():
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        text = capsys.readouterr().out
        listed = set(re.findall(r"^\s+(--[\w.]+)", text, re.M))
        assert options <= listed, (sub, options - listed)


# -- CIFAR-10 configs at tiny scale --------------------------------------------------------------------------
def _tiny_cifar(name: str, dest: Path) -> Path:
    """configs/<name>.yaml with a tiny network on fake CIFAR-10 (the data module's own format)."""
    from hosm_lightning.data import write_fake_cifar10

    write_fake_cifar10(dest / "cifar", n_train=12, n_test=4)
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    tr, model, data = cfg["trainer"], cfg["model"], cfg["data"]["init_args"]
    tr.update(max_steps=1, accelerator="cpu", devices=1, strategy="auto", enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=str(dest / "run"))
    tr["callbacks"] = [cb for cb in tr["callbacks"] if "DensityPlot" not in cb["class_path"]]
    model["net"]["init_args"].update(nf=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    model["fit"]["warmup_steps"] = 0
    data.update(root=str(dest / "cifar"), batch_size=4, eval_batch_size=4, num_workers=0, val_size=4)
    path = dest / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_cifar10_vp_fine_tunes_an_imported_checkpoint_and_reports_bits_per_dim(tmp_path):
    """The README's recipe at tiny scale: `fit --model.fit.init_from <score_sde checkpoint> --model.stages
    '[{order: 2}]'`, then `test` (both dequantization protocols, as the config lists them)."""
    from hosm_lightning.nets import DDPMpp, save_score_sde_checkpoint

    cfg = _tiny_cifar("cifar10_vp_ddpmpp", tmp_path)
    torch.manual_seed(1)
    source = DDPMpp(**yaml.safe_load(cfg.read_text())["model"]["net"]["init_args"])
    save_score_sde_checkpoint(source, tmp_path / "checkpoint_26.pth", step=1300000)
    fitted = main(["fit", "--config", str(cfg), "--model.fit.init_from", str(tmp_path / "checkpoint_26.pth"),
                   "--model.stages", "[{order: 2}]"])
    assert fitted.trainer.global_step == 1 and fitted.trainer.callback_metrics["train/dsm2"].isfinite()
    moved = [(p - q).abs().max().item() for p, q in zip(fitted.model.net.parameters(), source.parameters())]
    assert 0 < max(moved) < 1e-2  # one Adam step away from the imported weights
    # a fixed-step solver keeps the bits/dim solve cheap; the protocols are the config's
    tested = main(["test", "--config", str(cfg), "--ckpt_path", fitted.trainer.checkpoint_callback.last_model_path,
                   "--model.evaluation.num_repeats=1", "--model.evaluation.ode={method: euler, step_size: 0.5}"])
    res = json.loads((tmp_path / "run" / "likelihood" / "test_bpd.json").read_text())
    assert res["n"] == 4 and set(res["protocols"]) == {"uniform", "truncated_normal"}
    for proto, tag in (("uniform", "uniform"), ("truncated_normal", "tn")):
        value = tested.trainer.callback_metrics[f"test/bpd_{tag}"].item()
        assert value == pytest.approx(res["protocols"][proto]["mean"], rel=1e-6) and 0 < value < 40
    per = np.load(tmp_path / "run" / "likelihood" / "test_per_sample.npz")
    assert per["value_uniform"].shape == per["value_tn"].shape == (4, 1)


@pytest.mark.slow
def test_cifar10_ve_trains_at_third_order(tmp_path):
    cfg = _tiny_cifar("cifar10_ve_ncsnpp", tmp_path)
    fitted = main(["fit", "--config", str(cfg), "--model.stages", "[{order: 3}]"])
    assert fitted.trainer.global_step == 1 and fitted.trainer.callback_metrics["train/dsm3"].isfinite()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
