"""Plain helpers shared by the tests (fixtures that wrap them are in conftest.py).

* tiny networks, modules, data modules and trainers at test size;
* :class:`LinearSigmaSDE`: an SDE without closed-form cumulatives for the non-uniform time proposals;
* :class:`ExactScoreNet` / :func:`exact_module`: a real HOSMModule whose score is a closed form;
* :func:`free_port` / :func:`clean_env`: loopback rendezvous for the multi-process (gloo) tests, and
  :func:`wait_all` to collect their processes (each started with ``start_new_session=True``) by a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import lightning as L
import torch

from hosm_lightning.core import SDE, GaussianMixture, HOSMObjective, ODEOptions
from hosm_lightning.data import DataSpec, SyntheticDataModule
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.nets import ToyScoreNet
from hosm_lightning.nets.base import ScoreNet
from hosm_lightning.options import FitOptions

ROOT = Path(__file__).resolve().parents[1]


def tiny_net(dim: int = 1, seed: int = 0) -> ToyScoreNet:
    """The toy MLP at test width (a few thousand parameters), seeded."""
    torch.manual_seed(seed)
    return ToyScoreNet(dim=dim, encoder_width=16, embed_dim=8, decoder_width=32)


def tiny_module(dim: int = 1, *, objective: dict | None = None, ode: dict | None = None, fit: dict | None = None,
                **kw) -> HOSMModule:
    """A HOSMModule with :func:`tiny_net`, λ₂ = 0.5, λ₃ = 0.1 and loose ODE tolerances (1e-3) unless given."""
    args = dict(net=tiny_net(dim), stages=[{"order": 1}],
                objective=HOSMObjective(**{"lambda2": 0.5, "lambda3": 0.1, **(objective or {})}),
                ode=ODEOptions(**{"rtol": 1e-3, "atol": 1e-3, **(ode or {})}), fit=FitOptions(**(fit or {})))
    args.update(kw)
    return HOSMModule(**args)


def tiny_data(name: str = "mog1d", **kw) -> SyntheticDataModule:
    """A synthetic data module at test size (batches of 32, 5 steps per epoch, 32 val / 32 test points)."""
    return SyntheticDataModule(name=name, **{"batch_size": 32, "steps_per_epoch": 5, "val_size": 32,
                                             "test_size": 32, **kw})


def tiny_trainer(root, max_steps: int = 4, callbacks=(), **kw) -> L.Trainer:
    """A quiet CPU trainer: no logger, no progress bar, no validation unless asked."""
    args = dict(max_steps=max_steps, default_root_dir=str(root), accelerator="cpu", devices=1, logger=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                num_sanity_val_steps=0, enable_checkpointing=False)
    args.update(kw)
    return L.Trainer(callbacks=list(callbacks), **args)


class LinearSigmaSDE(SDE):
    """σ(t) = t, a = 1, g² = 2t: a valid SDE for which core/time_sampling.py has no closed-form cumulative
    (only the uniform time proposal)."""

    def marginal(self, t):
        return torch.ones_like(t), t

    def g2(self, t):
        return 2 * t


class ExactScoreNet(ScoreNet):
    """net(x, t, sigma) = score_fn(x, t): an analytic score as a network (parameterization 'score')."""

    def __init__(self, score_fn, dim: int):
        super().__init__()
        self.score_fn, self.dim = score_fn, dim

    def forward(self, x, t, sigma=None):
        return self.score_fn(x, t)


def exact_module(score_fn, sde, dim: int, centered: bool = True, rtol: float = 1e-5, atol: float = 1e-5,
                 **kw) -> HOSMModule:
    """A HOSMModule driven by an exact score, as if set up on data in [-1, 1] (``centered``) or [0, 1]."""
    module = HOSMModule(ExactScoreNet(score_fn, dim), sde=sde, parameterization="score",
                        ode=ODEOptions(eps=1e-5, rtol=rtol, atol=atol), **kw)
    module.data_spec = DataSpec(centered=centered)  # what setup() reads from the data module
    return module.to(torch.device("cpu"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """This environment without any launcher/cluster variables, plus loopback rendezvous settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_")) and k not in
           ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def wait_all(procs: list[subprocess.Popen], timeout: float = 240.0) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) per process. Past the deadline every process group is killed (the
    returncode is then negative and stderr says so)."""
    deadline, results = time.monotonic() + timeout, []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out, err = p.communicate()
            err += f"\n[killed: {p.args[1:3]} still running after {timeout} s]"
        results.append((p.returncode, out, err))
    return results


def pixel_mixtures() -> tuple[GaussianMixture, GaussianMixture]:
    """A 4-D Gaussian mixture of 2×2 one-channel images in [0, 1] (float64), and the same density pushed to
    [-1, 1] by y ↦ 2y − 1: the two data conventions of bits/dim."""
    means = torch.tensor([[0.3, 0.4, 0.5, 0.6], [0.7, 0.6, 0.5, 0.4], [0.5, 0.5, 0.2, 0.8]], dtype=torch.float64)
    var = torch.tensor([[0.010, 0.020, 0.015, 0.010], [0.020, 0.010, 0.010, 0.020], [0.015, 0.015, 0.010, 0.010]],
                       dtype=torch.float64)
    w = [0.3, 0.3, 0.4]
    return GaussianMixture(means, var, w), GaussianMixture(2 * means - 1, 4 * var, w)
