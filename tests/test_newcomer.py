"""Issue 11: the README's and the quickstart's commands, copied as written, work from a clean clone.

The ```bash blocks of README.md and docs/quickstart.md are parsed for ``python cli.py`` commands and
run in order, in a fresh working directory that holds the toy configs shrunk to test size (same
keys, smaller numbers): the commands themselves are not edited. Every path a command prints must
exist afterwards. CIFAR-10 commands are skipped (they need the data set and GPUs); the test fails if
any other command is skipped. Also: a run with --trainer.default_root_dir D leaves nothing outside D,
eval commands create no version_N folders, and a second fresh fit refuses to write beside the first.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from hosm_lightning.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
TOY = ("mog1d", "checkerboard")


def shrink(name: str, dest: Path) -> None:
    """configs/<name>.yaml at test size, written to dest/configs/<name>.yaml."""
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    tr, model, data = cfg["trainer"], cfg["model"], cfg["data"]["init_args"]
    tr.update(max_steps=8, val_check_interval=4, log_every_n_steps=2, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu")
    for cb in tr["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 2
        if cb["class_path"].endswith("DensityPlotCallback"):
            cb["init_args"].update(grid_size=40, grid_size_2d=8, num_samples=64, ode={"rtol": 1e-3, "atol": 1e-3})
    model["stages"] = [{"order": 1, "steps": 4}, {"order": 2, "steps": 2}, {"order": 3}]
    model["ode"] = {**model.get("ode", {}), "rtol": 1e-3, "atol": 1e-3}
    model["net"]["init_args"].update(encoder_width=32, embed_dim=16, decoder_width=64)
    data.update(batch_size=64, steps_per_epoch=8, val_size=64, test_size=64)
    (dest / "configs").mkdir(parents=True, exist_ok=True)
    (dest / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def bash_commands(doc: Path) -> list[str]:
    """Every ``python cli.py ...`` line of the doc's ```bash blocks (continuations joined)."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("python cli.py"):
                cmds.append(line)
    return cmds


def runnable(cmds: list[str]) -> list[str]:
    keep = [c for c in cmds if "cifar10" not in c]
    assert len(keep) >= 4, cmds
    return keep


def run_command(line: str, capsys) -> str:
    """Run one documented command in-process (as `python cli.py` would) and return its stdout."""
    tokens = shlex.split(line, comments=True)
    out_file = None
    if ">" in tokens:
        i = tokens.index(">")
        tokens, out_file = tokens[:i], tokens[i + 1]
    assert tokens[:2] == ["python", "cli.py"], line
    argv, sys.argv = sys.argv, ["cli.py", *tokens[2:]]
    try:
        run_cli()
    except SystemExit as exc:  # --print_config exits 0 after printing
        assert exc.code in (0, None), (line, capsys.readouterr().err)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    if out_file:
        Path(out_file).write_text(captured.out)
    return captured.out


def printed_paths(stdout: str) -> list[str]:
    """Paths a command printed: the 'outputs:' block, plus anything under runs/."""
    paths = re.findall(r"^  [^:\n]+:\s+(\S+)$", stdout.split("\noutputs:\n", 1)[-1], re.M) if "\noutputs:\n" in stdout else []
    paths += re.findall(r"(?<![\w/.])(runs/[\w./-]+)", stdout)
    return [p.rstrip(".,)") for p in paths]


#: override files composed on a toy config (``--config configs/mog1d.yaml --config configs/<name>.yaml``,
#: ``--config configs/checkerboard.yaml --config configs/swissroll.yaml``)
OVERRIDES = ("mog1d_order1", "mog1d_finetune", "swissroll")


def shrink_override(name: str, dest: Path) -> None:
    """An override config at test size: its step counts and intervals shrunk, nothing else changed."""
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    tr = cfg.get("trainer", {})
    for key, value in (("max_steps", 8), ("val_check_interval", 4)):
        if key in tr:
            tr[key] = value
    for cb in tr.get("callbacks", []):
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 2
        if cb["class_path"].endswith("DensityPlotCallback"):
            cb["init_args"].update(grid_size=40, grid_size_2d=8, num_samples=64, ode={"rtol": 1e-3, "atol": 1e-3})
    if "steps_per_epoch" in cfg.get("data", {}).get("init_args", {}):
        cfg["data"]["init_args"]["steps_per_epoch"] = 8
    (dest / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.mark.parametrize("doc", ["README.md", "docs/quickstart.md"])
def test_documented_commands_run_as_written(doc, tmp_path, monkeypatch, capsys):
    for name in TOY:
        shrink(name, tmp_path)
    for name in OVERRIDES:
        shrink_override(name, tmp_path)
    monkeypatch.chdir(tmp_path)
    cmds = runnable(bash_commands(ROOT / doc))
    for line in cmds:
        out = run_command(line, capsys)
        paths = printed_paths(out)
        if "--print_config" not in line:
            assert paths, (line, out[-2000:])
        missing = [p for p in paths if not Path(p).exists()]
        assert missing == [], (line, missing)
    # everything went into run folders under runs/ (plus the documented my.yaml); no version_N
    assert not list(tmp_path.rglob("version_*")) and not list(tmp_path.rglob("lightning_logs"))
    assert {p.name for p in tmp_path.iterdir()} <= {"configs", "runs", "my.yaml"}


def test_make_demo_prints_paths_that_exist(tmp_path, monkeypatch, capsys):
    """`make demo` is `python -m hosm_lightning.demo` (configs/mog1d.yaml, runs/demo)."""
    from hosm_lightning import demo

    shrink("mog1d", tmp_path)
    monkeypatch.chdir(tmp_path)
    rows = demo.run("configs/mog1d.yaml", "runs/demo")
    out = capsys.readouterr().out
    assert [r["step"] for r in rows] == [4, 6, 8]
    tb = re.search(r"TensorBoard run: (\S+)", out).group(1)
    plot = re.search(r"density plot:\s+(\S+)", out).group(1)
    assert tb == "runs/demo" and list(Path(tb).glob("events.out.tfevents.*"))
    assert plot == "runs/demo/plots/density_latest.png" and Path(plot).is_file()
    assert all(Path(p).exists() for p in printed_paths(out))
    demo.run("configs/mog1d.yaml", "runs/demo")  # a second `make demo` replaces the first
    assert not list(Path("runs/demo/checkpoints").glob("*-v1.ckpt"))


def test_default_root_dir_holds_everything_of_a_run(tmp_path, monkeypatch, capsys):
    work, run = tmp_path / "work", tmp_path / "elsewhere" / "run"
    shrink("mog1d", work)
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    base = f"--config configs/mog1d.yaml --trainer.default_root_dir {run}"
    ckpt = f"--ckpt_path {run}/checkpoints/last.ckpt"
    for line in (f"python cli.py fit {base}", f"python cli.py validate {base} {ckpt}",
                 f"python cli.py test {base} {ckpt}", f"python cli.py test {base} {ckpt}",
                 f"python cli.py likelihood {base} {ckpt}", f"python cli.py sample {base} {ckpt} --num_samples 50"):
        out = run_command(line, capsys)
        assert printed_paths(out) and all(Path(p).exists() for p in printed_paths(out)), (line, out[-1500:])
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # nothing outside D
    assert {p.name for p in tmp_path.iterdir()} == {"work", "elsewhere"}
    for rel in ("checkpoints/last.ckpt", "config.yaml", "hparams.yaml", "plots/density_latest.png",
                "samples/samples.npz", "samples/samples.png", "likelihood/test_nll.json"):
        assert (run / rel).is_file(), rel
    assert list(run.glob("events.out.tfevents.*")) and not list(tmp_path.rglob("version_*"))
    # a second fresh fit does not write last-v1.ckpt beside the first run: one clear line instead
    argv, sys.argv = sys.argv, ["cli.py", "fit", *shlex.split(base)]
    try:
        with pytest.raises(SystemExit) as exc:
            run_cli()
    finally:
        sys.argv = argv
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "already holds checkpoints" in err[0], err
    assert "--ckpt_path last" in err[0] and not list(run.rglob("*-v1.ckpt"))
