"""Helpers of ``benchmarks/synthetic.py``: CLI training runs, exact-NLL evaluation and figures.

Every training run goes through the real entry point, ``hosm_lightning.cli.main([...])``, with the
dataset's YAML in ``configs/`` plus command-line overrides for the benchmark scale (steps, batch,
EMA, checkpoint cadence, no validation). Evaluation loads the EMA weights of the checkpoint written
at the last step (``load_weights``) and calls ``HOSMModule.log_likelihood`` (exact divergence) on
the datamodule's fixed test set, keeping per-point values so that methods can be compared *paired*.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import sys
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hosm_lightning.cli import load_weights, main  # noqa: E402
from hosm_lightning.lit.plots import exact_logp_2d, save_figure  # noqa: E402

DATASETS = ("mog1d", "checkerboard", "swissroll")
#: plotting boxes (the reference toy code uses [-4, 4] for checkerboard and [-7, 7] for swissroll)
BOX_2D = {"checkerboard": 4.5, "swissroll": 7.0}


@dataclass
class Scale:
    """Benchmark scale. n1: order-1 pre-training steps; n2: fine-tuning steps (total n1 + n2)."""

    n1: int
    n2: int
    batch: int
    test_size: int
    rtol: float
    ema_decay: float
    ema_start: int
    grid_1d: int
    grid_2d: int

    @property
    def total(self) -> int:
        return self.n1 + self.n2


def quiet_lightning() -> None:
    """Keep Lightning's info lines and known harmless warnings off the benchmark's output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*IterableDataset.*", ".*log_every_n_steps.*", ".*LeafSpec.*", ".*args parameter is intended.*",
                    ".*litlogger.*", ".*does not have many workers.*", ".*dirpath.*", ".*WeightAveraging.*"):
        warnings.filterwarnings("ignore", message=pattern)


def fit(dataset: str, root: Path, scale: Scale, stages: list[dict], max_steps: int,
        resume_from: Path | None = None) -> tuple[object, Path, float]:
    """One ``fit`` through the CLI. Returns (cli, checkpoint at max_steps, wall seconds).

    The checkpoint is written by ModelCheckpoint at the end of the last optimizer step (not in
    ``on_train_end``, where the EMA callback has already copied the average into the raw weights),
    so it is a faithful resume point: raw weights, EMA state, optimizer, step and data-stream state.
    """
    if root.exists():
        shutil.rmtree(root)
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging",
         "init_args": {"decay": scale.ema_decay, "update_starting_at_step": scale.ema_start}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": max_steps, "save_top_k": -1, "save_last": False,
                       "filename": "step{step:06d}", "auto_insert_metric_name": False}},
    ]
    args = [
        "--config", str(ROOT / "configs" / f"{dataset}.yaml"),
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.logger.init_args.name=tb", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.max_steps={max_steps}",
        "--trainer.limit_val_batches=0", "--trainer.val_check_interval=null",
        f"--trainer.log_every_n_steps={max(1, min(50, max_steps // 4))}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--model.stages={json.dumps(stages)}", "--model.val_likelihood=false",
        f"--model.likelihood_rtol={scale.rtol}", f"--model.likelihood_atol={scale.rtol}",
        f"--data.init_args.batch_size={scale.batch}", f"--data.init_args.test_size={scale.test_size}",
        # one epoch per run: the data stream of step i is the same in every run of this dataset
        f"--data.init_args.steps_per_epoch={scale.total}", "--data.init_args.val_size=16",
    ]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both sys.argv and args are given
    start = time.perf_counter()
    try:
        with redirect_stdout(io.StringIO()):
            if resume_from is None:
                cli = main(["fit", *args])
            else:
                # `fit --ckpt_path X` would be the natural call, but LightningCLI (>= 2.3,
                # `_parse_ckpt_path`) then re-parses the model section from the checkpoint's saved
                # hyper-parameters, silently replacing `--model.stages` by the pre-training's
                # [{order: 1}]. So: parse and instantiate through the CLI (run=False), then do what the
                # `fit` subcommand does (HOSMCLI.before_fit + trainer.fit) with the checkpoint.
                cli = main(args, run=False)
                cli._default_checkpoint_dirs()
                cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(resume_from))
    finally:
        sys.argv = argv
    seconds = time.perf_counter() - start
    used = [(st.order, st.steps) for st in cli.model.stages]
    if used != [(st["order"], st.get("steps")) for st in stages]:
        raise RuntimeError(f"{root}: trained with stages {used}, requested {stages}")
    if cli.trainer.global_step != max_steps:
        raise RuntimeError(f"{dataset} run in {root} stopped at step {cli.trainer.global_step}, expected {max_steps}")
    ckpt = Path(cli.trainer.checkpoint_callback.dirpath) / f"step{max_steps:06d}.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"expected checkpoint {ckpt} after training")
    return cli, ckpt, seconds


def load_test_set(cli) -> torch.Tensor:
    """The datamodule's fixed test set [N, D] (seed + 2, identical for every run of a dataset)."""
    dm = cli.datamodule
    dm.setup("test")
    return torch.cat([b[0] if isinstance(b, (list, tuple)) else b for b in dm.test_dataloader()])


def model_logp(cli, ckpt: Path, x: torch.Tensor, chunk: int = 5000) -> tuple[torch.Tensor, float, float]:
    """EMA weights of ``ckpt`` → exact ODE log-likelihood per point (float64 [N]), mean NFE, seconds."""
    model = cli.model
    with redirect_stdout(io.StringIO()):
        load_weights(model, ckpt)
    model = model.to("cpu").eval()
    start, parts, nfes = time.perf_counter(), [], []
    for i, piece in enumerate(x.split(chunk)):
        logp, info = model.log_likelihood(piece.contiguous(), model.generator("bench-ll", i))
        parts.append(logp.detach().double())
        nfes.append(info["nfe"])
    return torch.cat(parts), float(np.mean(nfes)), time.perf_counter() - start


def summarize(nll: torch.Tensor, base: torch.Tensor | None) -> dict:
    """Mean, s.e., and the paired difference against ``base`` (same points) with its s.e."""
    n = len(nll)
    out = {"mean": nll.mean().item(), "se": (nll.std() / math.sqrt(n)).item(), "n": n}
    if base is not None:
        d = nll - base
        out["diff"], out["diff_se"] = d.mean().item(), (d.std() / math.sqrt(n)).item()
    return out


# -- figures ----------------------------------------------------------------------------------------
_STYLE = {"exact": ("black", "--", 1.3), "order 1": ("tab:blue", "-", 1.6),
          "order 1→3": ("tab:red", "-", 1.6), "order 3 scratch": ("tab:green", ":", 1.6)}


def _plot_lines(ax, grid, curves: dict, xlim) -> None:
    for name, logp in curves.items():
        color, ls, lw = _STYLE.get(name, ("gray", "-", 1.0))
        ax.plot(grid, np.nan_to_num(np.exp(logp), nan=0.0), color=color, ls=ls, lw=lw, label=name)
    ax.set_xlim(*xlim)
    ax.set_xlabel("x")
    ax.set_ylabel("density")


def figure_1d(grid, zoom_grid, curves: dict, zoom_curves: dict, title: str) -> Figure:
    """The paper's Fig. 1: exact vs first- vs third-order ScoreODE density, full range + zoom."""
    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    ax_full, ax_zoom = fig.subplots(1, 2)
    _plot_lines(ax_full, grid, curves, (float(grid[0]), float(grid[-1])))
    ax_full.legend(loc="upper right", fontsize=8)
    _plot_lines(ax_zoom, zoom_grid, zoom_curves, (float(zoom_grid[0]), float(zoom_grid[-1])))
    ax_zoom.set_title(f"zoom x ∈ [{zoom_grid[0]:g}, {zoom_grid[-1]:g}] (narrow component at −2/7)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def figure_2d(xs, panels: dict, title: str) -> Figure:
    """Heat maps on one shared colour scale; ``panels`` maps a title to a [G, G] density array."""
    n = len(panels)
    fig = Figure(figsize=(3.8 * n, 3.9), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    h = (xs[-1] - xs[0]) / (2 * (len(xs) - 1))
    extent = (xs[0] - h, xs[-1] + h, xs[0] - h, xs[-1] + h)
    # shared scale up to the largest 99.5th percentile: one spiky panel does not wash out the others
    vmax = max(float(np.nanpercentile(p, 99.5)) for p in panels.values()) or 1.0
    for ax, (name, p) in zip(axes, panels.items()):
        ax.imshow(np.nan_to_num(p), origin="lower", extent=extent, cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig


def density_plots(dataset: str, cli, ckpts: dict, x_test: torch.Tensor, scale: Scale, out: Path,
                  nll: dict) -> Path:
    """Evaluate the ODE density of the plotted models on a grid and write the dataset's figure."""
    names = {"order 1": "o1", "order 1→3": "s3", "order 3 scratch": "r3"}  # figure label → method key
    if dataset == "mog1d":
        mix = cli.datamodule.mixture
        grid = torch.linspace(-1.3, 1.3, scale.grid_1d, dtype=torch.float32)[:, None]
        zoom = torch.linspace(-0.5, 0.0, max(scale.grid_1d // 2, 11), dtype=torch.float32)[:, None]
        full, part = {"exact": mix.log_prob(grid.double()).numpy()}, {"exact": mix.log_prob(zoom.double()).numpy()}
        for label, key in names.items():
            full[label] = model_logp(cli, ckpts[key], grid)[0].numpy()
            part[label] = model_logp(cli, ckpts[key], zoom)[0].numpy()
        title = ("1-D mixture, VE ScoreODE density (EMA weights; test NLL: "
                 + ", ".join(f"{k} {nll[v]:.3f}" for k, v in names.items()) + f"; entropy {mix.entropy():.3f})")
        fig = figure_1d(grid[:, 0].numpy(), zoom[:, 0].numpy(), full, part, title)
        return save_figure(fig, out / "fig1_mog1d.png")
    box, g = BOX_2D[dataset], scale.grid_2d
    xs = torch.linspace(-box, box, g, dtype=torch.float32)
    yy, xx = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([xx, yy], dim=-1).reshape(-1, 2)
    panels = {}
    exact = exact_logp_2d(dataset, pts)
    if exact is not None:
        panels["exact (uniform on 8 squares)"] = exact.exp().reshape(g, g).numpy()
    else:  # no closed form: a normalised 2-D histogram of the test set on the same grid
        edges = np.linspace(-box - (xs[1] - xs[0]).item() / 2, box + (xs[1] - xs[0]).item() / 2, g + 1)
        hist, _, _ = np.histogram2d(x_test[:, 1].numpy(), x_test[:, 0].numpy(), bins=[edges, edges], density=True)
        panels[f"test data histogram (n={len(x_test)})"] = hist
    for label, key in names.items():
        p = model_logp(cli, ckpts[key], pts)[0].exp().reshape(g, g).numpy()
        panels[f"{label}: NLL {nll[key]:.3f}"] = p
    fig = figure_2d(xs.numpy(), panels, f"{dataset}: VE ScoreODE density (EMA weights), shared colour scale")
    return save_figure(fig, out / f"density_{dataset}.png")
