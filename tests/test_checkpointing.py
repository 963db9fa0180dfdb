"""Interrupted runs lose nothing and tell the truth.

* Ctrl-C (SIGINT) and SIGTERM, before and after the first periodic checkpoint: exit status 130 / 143,
  with ``last.ckpt`` on disk; ``fit --ckpt_path last`` then ends the run with exactly one
  ``last*.ckpt``, holding the final step and the weights of an uninterrupted run;
* checkpoints are written atomically: a write killed half-way leaves the previous ``last.ckpt``;
* a cut-off ``last.ckpt`` resumes from the newest readable checkpoint, with one line that names it
  and the steps it costs; a run already at ``max_steps`` says so instead of ending silently;
* only interrupts write the interrupt checkpoint (a crash leaves the last periodic one).

The end-to-end cases run ``cli.py fit`` in subprocesses on configs/mog1d.yaml shrunk to 20 steps with
a checkpoint every 10; ``tests/interrupt_helpers.py`` sends the signals from inside the run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from hosm_lightning.checkpoint_io import AtomicCheckpointIO, saved_step, temporary_path
from hosm_lightning.lit.checkpointing import HOSMCheckpoint
from hosm_lightning.checkpoints import find_resume_point

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MAX_STEPS, EVERY = 20, 10


# -- the writer ---------------------------------------------------------------------------------------
def test_atomic_write_replaces_the_file_and_removes_stale_temporaries(tmp_path):
    io_ = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    stale = temporary_path(target, pid=999999)
    stale.write_bytes(b"left by a killed writer")
    io_.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    io_.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert io_.load_checkpoint(target)["global_step"] == 2


def test_a_write_that_fails_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io_.save_checkpoint({"global_step": 10, "w": torch.ones(3)}, target)

    def half_then_interrupt(obj, fh, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt  # e.g. a second Ctrl-C while writing

    real_save = torch.save
    monkeypatch.setattr(torch, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        io_.save_checkpoint({"global_step": 20, "w": torch.zeros(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=True)["global_step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_saved_step_reads_cut_off_files_without_running_their_code(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"global_step": 750, "state_dict": {"w": torch.randn(50_000)}, "loops": {"a": [1, 2]}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert saved_step(path) == 750
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    assert saved_step(tmp_path / "text.ckpt") is None
    # a record that would run a shell command if it were unpickled for real
    evil = tmp_path / "evil.ckpt"
    marker = tmp_path / "ran"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"global_step": 5, "x": _Runs(f"touch {marker}")}, protocol=2))
    assert saved_step(evil) == 5 and not marker.exists()


class _Runs:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


# -- the resume point ---------------------------------------------------------------------------------
def _ckpt(path: Path, step: int, resumable: bool = True) -> Path:
    state = {"global_step": step, "state_dict": {"w": torch.ones(2)}}
    if resumable:
        state["optimizer_states"] = []
    torch.save(state, path)
    return path


def test_resume_point_is_last_ckpt_when_it_is_readable(tmp_path):
    _ckpt(tmp_path / "step000010.ckpt", 10)
    _ckpt(tmp_path / "last.ckpt", 15)
    temporary_path(tmp_path / "last.ckpt", pid=1).write_bytes(b"cut")
    point = find_resume_point([str(tmp_path)])
    assert (Path(point.path).name, point.step, point.note) == ("last.ckpt", 15, None)
    assert find_resume_point([str(tmp_path / "nothing")]) is None


def test_resume_point_falls_back_to_the_newest_readable_checkpoint(tmp_path):
    for step in (10, 20, 30):
        _ckpt(tmp_path / f"step{step:06d}.ckpt", step)
    last = _ckpt(tmp_path / "last.ckpt", 37)
    last.write_bytes(last.read_bytes()[:300])  # cut off
    (tmp_path / "step000030.ckpt").write_bytes(b"garbage")
    point = find_resume_point([str(tmp_path)])
    assert (Path(point.path).name, point.step) == ("step000020.ckpt", 20)
    assert "last.ckpt is not readable" in point.note and "step000020.ckpt (step 20)" in point.note
    assert "17 steps (21-37) are trained again" in point.note


def test_no_resumable_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / "last.ckpt").write_text("text")
    _ckpt(tmp_path / "weights.ckpt", 5, resumable=False)
    with pytest.raises(ValueError, match=r"no checkpoint in .* can resume the run.*last.ckpt.*weights.ckpt: weights only"):
        find_resume_point([str(tmp_path)])


# -- only interrupts write the interrupt checkpoint (in-process) ---------------------------------------
class _Raise(L.Callback):
    def __init__(self, exc):
        self.exc = exc

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            raise self.exc


def _fit(tmp_path, callbacks, every=10):
    from helpers import tiny_data, tiny_module, tiny_trainer

    ckpt = HOSMCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=every, save_top_k=-1)
    trainer = tiny_trainer(tmp_path, max_steps=6, callbacks=[*callbacks, ckpt], enable_checkpointing=True,
                           plugins=[AtomicCheckpointIO()])
    trainer.fit(tiny_module(), datamodule=tiny_data())
    return ckpt


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), FloatingPointError("non-finite gradient")])
def test_other_exceptions_write_no_checkpoint(tmp_path, exc):
    """Lightning's ModelCheckpoint(save_on_exception=True) writes last.ckpt and a step file here."""
    with pytest.raises(type(exc)):
        _fit(tmp_path, [_Raise(exc)])
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_an_interrupt_writes_last_ckpt_alone(tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            _fit(tmp_path, [_Raise(KeyboardInterrupt())])
    finally:
        signal.signal(signal.SIGINT, handler)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["last.ckpt"]  # Lightning's own save_on_exception also writes step=3 beside it
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_second_ctrl_c_stops_at_once_without_a_checkpoint():
    from hosm_lightning.lit.checkpointing import _DeferredCtrlC

    ctrl_c, before = _DeferredCtrlC(), signal.getsignal(signal.SIGINT)
    ctrl_c.install(announce=False)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # first: only asks to stop after the step
        assert ctrl_c.pending and not ctrl_c.forced
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert ctrl_c.forced
    finally:
        ctrl_c.restore()
    assert signal.getsignal(signal.SIGINT) == before


# -- end to end: interrupts, resumes and cut-off files through cli.py ------------------------------------
def _config(dest: Path) -> Path:
    """configs/mog1d.yaml at test size: 20 steps, a checkpoint every 10, no validation."""
    cfg = yaml.safe_load((ROOT / "configs" / "mog1d.yaml").read_text())
    tr = cfg["trainer"]
    tr.update(max_steps=MAX_STEPS, accelerator="cpu", enable_model_summary=False, limit_val_batches=0,
              log_every_n_steps=5)
    tr.pop("val_check_interval", None)
    tr["callbacks"] = [cb for cb in tr["callbacks"] if "DensityPlot" not in cb["class_path"]]
    for cb in tr["callbacks"]:
        if cb["class_path"].endswith("Checkpoint"):
            cb["init_args"]["every_n_train_steps"] = EVERY
    cfg["model"]["net"]["init_args"].update(encoder_width=32, embed_dim=16, decoder_width=64)
    cfg["data"]["init_args"].update(batch_size=64, steps_per_epoch=8, val_size=64, test_size=64)
    path = dest / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _cli(cfg: Path, run: Path, *extra: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``python cli.py fit`` (through run_cli, as the console script); ``prelude`` runs first."""
    code = (f"import sys; {prelude}\nfrom hosm_lightning.cli import run_cli\n"
            f"sys.argv = ['cli.py', 'fit', '--config', {str(cfg)!r}, '--trainer.default_root_dir={run}', "
            f"*{list(extra)!r}]\nrun_cli()")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def _signal_at(signum: int, step: int) -> str:
    spec = {"class_path": "interrupt_helpers.SelfSignal", "init_args": {"signum": int(signum), "at_step": step}}
    return f"--trainer.callbacks+={json.dumps(spec)}"


def _lasts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt"))


def _step(path: Path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the tiny config: its final weights, and a copy of its folder."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _config(tmp)
    res = _cli(cfg, tmp / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    return {"cfg": cfg, "run": tmp / "run", "state": state}


@pytest.mark.slow
@pytest.mark.parametrize("signame,at_step", [("SIGINT", 4), ("SIGINT", 13), ("SIGTERM", 4), ("SIGTERM", 13)],
                         ids=["sigint-before-first-periodic", "sigint-after", "sigterm-before", "sigterm-after"])
def test_interrupt_then_resume_leaves_one_last_ckpt_at_the_final_step(signame, at_step, reference, tmp_path):
    signum, code = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}[signame]
    run = tmp_path / "run"
    res = _cli(reference["cfg"], run, _signal_at(signum, at_step))
    assert res.returncode == code, (res.returncode, res.stderr[-3000:])
    assert f"interrupted by {signame} (exit status {code})" in res.stderr
    assert _lasts(run) == ["last.ckpt"] and _step(run / "checkpoints" / "last.ckpt") == at_step + 1
    resumed = _cli(reference["cfg"], run, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _lasts(run) == ["last.ckpt"], _lasts(run)
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == MAX_STEPS
    for key, value in reference["state"]["state_dict"].items():  # exactly the uninterrupted run's weights
        assert torch.allclose(final["state_dict"][key], value, atol=1e-6), key


@pytest.mark.slow
def test_ctrl_c_from_outside_stops_at_the_end_of_a_step(reference, tmp_path):
    """A real Ctrl-C from another process, during a long run: the step it names is the one on disk."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    bar = {"class_path": "hosm_lightning.lit.progress.HOSMProgressBar", "init_args": {"every_n_steps": 3}}
    proc = subprocess.Popen([sys.executable, "cli.py", "fit", "--config", str(reference["cfg"]),
                             f"--trainer.default_root_dir={run}", "--trainer.max_steps=100000",
                             f"--trainer.callbacks+={json.dumps(bar)}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    wrote = [ln for ln in (out + err).splitlines() if "Ctrl-C at step" in ln]
    assert len(wrote) == 1 and "wrote" in wrote[0], out[-2000:] + err[-2000:]
    step = int(wrote[0].split("Ctrl-C at step ")[1].split(":")[0])
    assert _lasts(run) == ["last.ckpt"] and _step(run / "checkpoints" / "last.ckpt") == step >= 3


@pytest.mark.slow
def test_cut_off_last_ckpt_resumes_from_the_newest_readable_checkpoint(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (run / "checkpoints" / "step000020.ckpt").unlink()  # the newest readable one is step 10
    res = _cli(reference["cfg"], run, "--ckpt_path", "last", "--trainer.max_steps=30")
    assert res.returncode == 0, res.stderr[-3000:]
    notes = [ln for ln in (res.stdout + res.stderr).splitlines() if "is not readable" in ln]
    assert len(notes) == 1, res.stdout[-3000:]
    assert "step000010.ckpt (step 10)" in notes[0] and "10 steps (11-20) are trained again" in notes[0]
    assert _lasts(run) == ["last.ckpt"] and _step(last) == 30


@pytest.mark.slow
def test_a_checkpoint_write_killed_half_way_leaves_the_previous_last_ckpt(reference, tmp_path):
    """The process is SIGKILLed in the middle of writing its second last.ckpt (step 20)."""
    run = tmp_path / "run"
    res = _cli(reference["cfg"], run, prelude="import interrupt_helpers; interrupt_helpers.kill_inside_writer(after=1)")
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-3000:])
    assert _step(run / "checkpoints" / "last.ckpt") == EVERY  # the previous one, whole
    resumed = _cli(reference["cfg"], run, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step000010.ckpt", "step000020.ckpt"]
    assert _step(run / "checkpoints" / "last.ckpt") == MAX_STEPS


@pytest.mark.slow
def test_nothing_left_to_train_is_one_clear_line(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    events = sorted(run.glob("events.*"))
    res = _cli(reference["cfg"], run, "--ckpt_path", "last")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("hosm-lightning: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in res.stderr, res.stderr
    assert "is at step 20 and trainer.max_steps is 20: nothing is left to train" in errors[0]
    assert sorted(run.glob("events.*")) == events  # no empty event file
