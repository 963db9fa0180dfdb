"""docker/slurm_train.sh against stand-ins for srun and scontrol: composed configs, the resume point,
and the requeue after an interrupted run (exit status 143)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPT = ROOT / "docker" / "slurm_train.sh"


def _stand_ins(bin_dir: Path, log: Path, srun_status: int) -> None:
    """``srun`` records its arguments and exits with ``srun_status``; ``scontrol`` records its arguments."""
    bin_dir.mkdir()
    for name, status in (("srun", srun_status), ("scontrol", 0)):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/bash\necho "{name} $*" >> "{log}"\nexit {status}\n')
        tool.chmod(0o755)


def _run(tmp_path: Path, srun_status: int, configs: list[Path], **env) -> tuple[int, list[str]]:
    log = tmp_path / "calls.log"
    _stand_ins(tmp_path / "bin", log, srun_status)
    full_env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "PYTHON": sys.executable,
                "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1",
                "SLURM_NTASKS_PER_NODE": "2", "CONFIG": " ".join(str(c) for c in configs), **env}
    proc = subprocess.run(["bash", str(SCRIPT)], env=full_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    return proc.returncode, log.read_text().splitlines() if log.exists() else []


def _configs(tmp_path: Path) -> list[Path]:
    base, override = tmp_path / "base.yaml", tmp_path / "deep.yaml"
    base.write_text("trainer:\n  default_root_dir: runs/base\n")
    override.write_text("trainer:\n  default_root_dir: runs/deep\nmodel: {}\n")
    return [base, override]


def test_several_configs_are_composed_in_order_and_the_last_root_wins(tmp_path):
    status, calls = _run(tmp_path, 0, _configs(tmp_path))
    assert status == 0
    (srun,) = [c for c in calls if c.startswith("srun")]
    base, deep = _configs(tmp_path)
    assert f"--config {base} --config {deep}" in srun
    assert "--trainer.default_root_dir runs/deep" in srun
    assert not any(c.startswith("scontrol") for c in calls)


def test_sigterm_exit_status_requeues_the_job_and_is_passed_on(tmp_path):
    status, calls = _run(tmp_path, 143, _configs(tmp_path)[:1])
    assert status == 143
    assert "scontrol requeue 4242" in calls


@pytest.mark.parametrize("srun_status", [1, 2, 130])
def test_other_failures_are_not_requeued(tmp_path, srun_status):
    status, calls = _run(tmp_path, srun_status, _configs(tmp_path)[:1])
    assert status == srun_status
    assert not any(c.startswith("scontrol") for c in calls)


def test_resumes_through_last_so_a_cut_off_last_ckpt_falls_back(tmp_path):
    ckpts = tmp_path / "runs" / "base" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"cut off")
    status, calls = _run(tmp_path, 0, _configs(tmp_path)[:1])
    assert status == 0
    (srun,) = [c for c in calls if c.startswith("srun")]
    assert "--ckpt_path last" in srun


def test_a_newer_preemption_checkpoint_is_resumed_by_name(tmp_path):
    run = tmp_path / "runs" / "base"
    (run / "checkpoints").mkdir(parents=True)
    last, hpc = run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"x")
    hpc.write_bytes(b"x")
    os.utime(last, (1_000_000, 1_000_000))
    status, calls = _run(tmp_path, 0, _configs(tmp_path)[:1])
    (srun,) = [c for c in calls if c.startswith("srun")]
    assert status == 0 and "--ckpt_path runs/base/hpc_ckpt_1.ckpt" in srun
