"""The paper's fine-tuning protocol on toy data, as reusable steps (used by ``synthetic.py``).

1. ``train``: one Lightning ``fit`` of :class:`HOSMModule` on a :class:`SyntheticDataModule`
   (toy MLP, VE SDE, Adam, global-norm clip 1, EMA), optionally from a checkpoint's EMA weights
   (``init_from``: weights only, fresh Adam, step 0 — every fine-tune sees the same data stream
   and the same (t, z, v) draws, so methods differ only in their objective);
2. ``model_logp``: exact ODE log-likelihood (dopri5, exact divergence) of a checkpoint's EMA
   weights on fixed points;
3. paired comparisons: ``core.mean_se`` of per-point differences (paired KL estimates).
Objects are built in Python rather than from ``configs/`` so that a benchmark run does not change
when a config's demo settings do; the settings are the configs' (mog1d.yaml / checkerboard.yaml).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from hosm_lightning.checkpoints import load_weights
from hosm_lightning.core import HOSMObjective, make_sde
from hosm_lightning.data import SyntheticDataModule
from hosm_lightning.data.sharding import batch_tensor
from hosm_lightning.data.synthetic import exact_logp_2d
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.nets import ToyScoreNet
from hosm_lightning.options import FitOptions

#: a 2-D Gaussian mixture with an exact density: 6 components on a ring plus one at the centre
GMM2D = {"means": [[2.0 * math.cos(k * math.pi / 3), 2.0 * math.sin(k * math.pi / 3)] for k in range(6)] + [[0.0, 0.0]],
         "variances": [[0.02, 0.02]] * 6 + [[0.3, 0.05]], "weights": [0.12] * 6 + [0.28]}


@dataclass
class Run:
    """One training run: objective, optimizer and EMA settings, and where it starts from."""

    order: int = 1
    steps: int = 1000
    lr: float = 1e-3
    lambda2: float = 0.5
    lambda3: float = 0.1
    divergence: str = "exact"
    probe_product: str = "jvp"
    ema_decay: float = 0.995
    ema_start: int = 0
    save_every: int = 0
    init_from: str | None = None
    grad_norm_every: int = 0
    extra: dict = field(default_factory=dict)


def quiet() -> None:
    """Silence Lightning's info logs and the warnings a toy run triggers by design."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*IterableDataset.*", ".*log_every_n_steps.*", ".*LeafSpec.*", ".*does not have many workers.*",
                    ".*WeightAveraging.*", ".*jit.script.*", ".*litlogger.*", ".*dirpath.*"):
        warnings.filterwarnings("ignore", message=pattern)


def datamodule(dataset: str, batch: int, steps: int, test_size: int, seed: int = 0) -> SyntheticDataModule:
    """The toy data module of ``dataset`` ('gmm2d': the 2-D mixture :data:`GMM2D`)."""
    kw = GMM2D if dataset == "gmm2d" else {}
    return SyntheticDataModule(name="gmm" if dataset == "gmm2d" else dataset, batch_size=batch,
                               steps_per_epoch=steps, val_size=16, test_size=test_size, seed=seed, **kw)


#: objective settings a run may set in ``Run.extra`` (absent: the HOSMObjective default)
OBJECTIVE_EXTRAS = ("weighting", "time_proposal", "higher_order", "order2_form")


def build_model(dim: int, run: Run) -> HOSMModule:
    """The toy MLP with ``run``'s SDE (``extra['sde']``: 've' (default) or 'vp'), parameterisation
    (``extra['parameterization']``, default 'eps'), objective, optimizer and fit options."""
    objective = {k: run.extra[k] for k in OBJECTIVE_EXTRAS if k in run.extra}
    return HOSMModule(
        net=ToyScoreNet(dim=dim), sde=make_sde(run.extra.get("sde", "ve")),
        parameterization=run.extra.get("parameterization", "eps"), stages=[{"order": run.order}],
        objective=HOSMObjective(lambda2=run.lambda2, lambda3=run.lambda3, eps=1e-5, divergence=run.divergence,
                                probe_product=run.probe_product, dsm3_sigma_cap=run.extra.get("dsm3_sigma_cap"),
                                **objective),
        optimizer=lambda p: torch.optim.Adam(p, lr=run.lr),
        fit=FitOptions(warmup_steps=run.extra.get("warmup", 0), val_likelihood=False, check_finite_every=100,
                       init_from=run.init_from, grad_norm_every=run.grad_norm_every),
    )


def train(dataset: str, root: Path, run: Run, batch: int, test_size: int = 16) -> dict:
    """Fit ``run``; return {'ckpts': {step: path}, 'seconds': wall time, 'log': CSV metrics path}."""
    if root.exists():
        shutil.rmtree(root)
    dm = datamodule(dataset, batch, run.steps, test_size)
    torch.manual_seed(0)  # the network's initial weights (a fine-tune then loads init_from over them)
    model = build_model(dm.dim, run)
    every = math.gcd(run.save_every, run.steps) if run.save_every else run.steps  # the last step is saved
    trainer = L.Trainer(
        max_steps=run.steps, accelerator="cpu", devices=1, gradient_clip_val=run.extra.get("clip", 1.0), default_root_dir=str(root),
        logger=CSVLogger(str(root), name="log", version=0), log_every_n_steps=max(1, run.grad_norm_every or 50),
        callbacks=[EMAWeightAveraging(decay=run.ema_decay, update_starting_at_step=run.ema_start),
                   ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=every, save_top_k=-1,
                                   filename="step{step:06d}", auto_insert_metric_name=False)],
        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    ckpts = {int(p.stem[4:]): p for p in sorted((root / "ckpt").glob("step*.ckpt"))}
    if run.steps not in ckpts:
        raise RuntimeError(f"{root}: no checkpoint at step {run.steps} (have {sorted(ckpts)})")
    return {"ckpts": ckpts, "seconds": seconds, "log": root / "log" / "version_0" / "metrics.csv"}


def split_points(dm: L.LightningDataModule) -> torch.Tensor:
    """Every point of a data module's test split, in order, as one tensor."""
    dm.setup("test")
    return torch.cat([batch_tensor(b) for b in dm.test_dataloader()])


def test_points(dataset: str, n: int) -> torch.Tensor:
    """The n fixed test points of a toy dataset."""
    return split_points(datamodule(dataset, 16, 1, n))


def exact_logq(dataset: str, x: torch.Tensor) -> torch.Tensor | None:
    """log q_0(x) in nats (float64 [N]) where the data density is known exactly, else None."""
    dm = datamodule(dataset, 16, 1, 16)
    if dm.mixture is not None:
        return dm.mixture.log_prob(x.double())
    logq = exact_logp_2d(dataset, x)
    return None if logq is None else logq.double()


def model_logp(dataset: str, ckpt: Path, x: torch.Tensor, rtol: float = 1e-5, chunk: int = 5000,
               run: Run | None = None) -> tuple:
    """EMA weights of ``ckpt`` (trained by ``run``: its SDE and parameterisation) → exact ODE
    log p_eps(x) (float64 [N]), mean NFE, seconds."""
    model = build_model(x.shape[1], run or Run())
    load_weights(model, ckpt)
    ode = model.ode.replace(rtol=rtol, atol=rtol)
    model.eval()
    start, parts, nfes = time.perf_counter(), [], []
    for i, piece in enumerate(x.split(chunk)):
        lik = model.log_likelihood(piece.contiguous(), model.generator("bench-ll", i), ode)
        parts.append(lik.logp.detach().double())
        nfes.append(lik.nfe)
    return torch.cat(parts), float(np.mean(nfes)), time.perf_counter() - start


def grad_norm_summary(log: Path) -> dict:
    """Mean / 90th percentile of the logged per-term gradient norms and the fraction of steps whose
    total gradient norm exceeded the clip norm 1.0."""
    rows = list(csv.DictReader(open(log))) if Path(log).is_file() else []
    out = {}
    for key in ("train/grad_norm", "train/grad_norm_dsm1", "train/grad_norm_dsm2", "train/grad_norm_dsm3"):
        vals = np.array([float(r[key]) for r in rows if r.get(key) not in (None, "")])
        if len(vals):
            out[key.split("/")[1]] = {"mean": float(vals.mean()), "p90": float(np.percentile(vals, 90)),
                                      "clipped": float((vals > 1.0).mean())}
    return out


def run_dir(runs: Path, dataset: str, run: Run, batch: int) -> tuple[Path, str]:
    """The folder of a run: runs/<dataset>/run-<hash of its exact spec> (identical specs share one
    folder, so the sweep's fine-tunes are reused by the main run), and the spec text."""
    spec = json.dumps({"dataset": dataset, "batch": batch, "run": asdict(run)}, sort_keys=True)
    return Path(runs) / dataset / f"run-{hashlib.sha1(spec.encode()).hexdigest()[:10]}", spec


def train_cached(dataset: str, runs: Path, run: Run, batch: int) -> dict:
    """:func:`train` unless its folder already holds a finished run of exactly this spec (reused: an
    interrupted benchmark continues where it stopped)."""
    root, spec = run_dir(runs, dataset, run, batch)
    final = root / "ckpt" / f"step{run.steps:06d}.ckpt"
    if (root / "spec.json").is_file() and (root / "spec.json").read_text() == spec and final.is_file():
        ckpts = {int(p.stem[4:]): p for p in sorted((root / "ckpt").glob("step*.ckpt"))}
        seconds = float((root / "seconds.txt").read_text()) if (root / "seconds.txt").is_file() else float("nan")
        return {"ckpts": ckpts, "seconds": seconds, "log": root / "log" / "version_0" / "metrics.csv", "cached": True}
    out = train(dataset, root, run, batch)
    (root / "spec.json").write_text(spec)
    (root / "seconds.txt").write_text(f"{out['seconds']:.1f}")
    return {**out, "cached": False}


def train_job(dataset: str, runs: str, run: dict, batch: int) -> dict:
    """:func:`train_cached` in a worker process (one torch thread), with plain picklable results."""
    torch.set_num_threads(1)
    quiet()
    out = train_cached(dataset, Path(runs), Run(**run), batch)
    return {"ckpts": {k: str(v) for k, v in out["ckpts"].items()}, "seconds": out["seconds"], "log": str(out["log"]),
            "cached": out["cached"]}
