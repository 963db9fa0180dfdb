"""Lightning callbacks: density/sample plots during validation.

The work happens in ``on_validation_batch_end`` of the first validation batch rather than at the
end of the epoch: Lightning's ``EMAWeightAveraging`` swaps the EMA weights in at
``on_validation_epoch_start`` and back in its own ``on_validation_epoch_end`` (which may run
before ours), so only during the batches are we sure to plot the weights that validation scores.
Rank 0 only, no collective ops (other ranks simply go on with their validation batches).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers import TensorBoardLogger
from torch import Tensor

from ..core.ode import ODEOptions
from ..data.sharding import batch_tensor
from ..data.spec import describe
from ..plots import density_figure_1d, density_figure_2d, image_grid, samples_figure, save_figure

__all__ = ["DensityPlotCallback"]


class DensityPlotCallback(L.Callback):
    """Plot model density (exact ODE likelihood on a grid) and ODE samples at validation time.

    1-D data: density on ``grid_size`` points vs the exact mixture density, with a zoomed panel;
    2-D data: heat maps on a ``grid_size_2d``² grid; images: a grid of min(num_samples, 16) samples.
    Figures go to every TensorBoard logger (tags ``val/density``, ``val/samples``) and to PNGs
    ``density_latest.png``, ``density_step{step:06d}.png`` and ``samples_latest.png`` in ``out_dir``.

    Args:
        every_n_epochs: plot when ``current_epoch % every_n_epochs == 0``.
        grid_size: number of 1-D grid points.
        grid_size_2d: points per side of the 2-D grid.
        num_samples: number of ODE samples (16 at most for images).
        ode: overrides of the model's ODE options (``model.ode``) for the plots' solves, e.g.
            ``{rtol: 1.0e-3, atol: 1.0e-3}`` for quick image samples. Default: the model's options.
        out_dir: PNG folder (default ``<trainer.log_dir>/plots``).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        grid_size: int = 400,
        grid_size_2d: int = 48,
        num_samples: int = 500,
        ode: dict | None = None,
        out_dir: str | None = None,
    ):
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("grid_size", grid_size),
                            ("grid_size_2d", grid_size_2d), ("num_samples", num_samples)):
            if int(value) < 1:
                raise ValueError(f"DensityPlotCallback.{name} must be >= 1, got {value!r}")
        self.ode = dict(ode or {})
        ODEOptions().replace(**self.ode)  # unknown keys or bad values fail here
        self.every_n_epochs, self.grid_size, self.grid_size_2d = int(every_n_epochs), int(grid_size), int(grid_size_2d)
        self.num_samples = int(num_samples)
        self.out_dir = out_dir
        #: path of the latest density PNG (None until one is written)
        self.last_density_path: str | None = None
        #: path of the latest samples PNG
        self.last_samples_path: str | None = None
        #: solver statistics of the latest plot (nfe, seconds)
        self.last_info: dict = {}

    # -- hook -----------------------------------------------------------------------------------
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        try:
            with torch.inference_mode(False):
                self._plot(trainer, pl_module, batch_tensor(batch).detach().clone())
        except Exception as err:  # diagnostics must never end a training run
            warnings.warn(f"DensityPlotCallback failed at step {trainer.global_step}: {type(err).__name__}: {err}",
                          RuntimeWarning, stacklevel=2)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # On every rank: trainer.log_dir is a broadcast (a collective) under DDP, so it must not be
        # read inside the rank-0-only plotting hook (the other ranks would never join: deadlock).
        self._out = Path(self.out_dir or os.path.join(trainer.log_dir or trainer.default_root_dir or ".", "plots"))

    # -- work -----------------------------------------------------------------------------------
    def _plot(self, trainer, pl_module, x: Tensor) -> None:
        spec = describe(trainer.datamodule)
        step = trainer.global_step
        out = getattr(self, "_out", None) or Path(self.out_dir or os.path.join(trainer.default_root_dir or ".", "plots"))
        if x.dtype == torch.uint8 or spec.is_image:
            self._images(trainer, pl_module, tuple(spec.shape or x.shape[1:]), spec.centered, out, step)
            return
        x = x.reshape(len(x), -1)
        x = x if x.is_floating_point() else x.float()
        dim = int(spec.dim or x.shape[1])
        samples = self._sample(pl_module, (self.num_samples, dim), x.dtype)
        density = None
        if dim == 1:
            density = self._density_1d(pl_module, x, spec, step)
        elif dim == 2:
            density = self._density_2d(pl_module, x, spec, samples, step)
        sfig = samples_figure(samples, x, title=f"ODE samples, step {step} (nfe {self.last_info.get('sample_nfe')})")
        self._log_figure(trainer, "val/samples", sfig, step)
        self.last_samples_path = str(save_figure(sfig, out / "samples_latest.png"))
        if density is not None:
            self._log_figure(trainer, "val/density", density, step)
            save_figure(density, out / f"density_step{step:06d}.png")
            self.last_density_path = str(save_figure(density, out / "density_latest.png"))

    def _sample(self, pl_module, shape: tuple, dtype) -> Tensor:
        """ODE samples of the (EMA) score model, from a fixed prior draw so plots compare across steps."""
        start = time.perf_counter()
        x_T = pl_module.sde.prior_sample(shape, generator=pl_module.generator("plot"), device=pl_module.device)
        out = pl_module.sample(x_T, pl_module.ode.replace(**self.ode))
        self.last_info.update(sample_nfe=out.nfe, sample_seconds=time.perf_counter() - start)
        return out.x.to(dtype)

    def _logp(self, pl_module, pts: Tensor, chunk: int = 1024) -> Tensor:
        """Model log-likelihood (nats) of ``pts`` [N, D], in chunks (one ODE solve each)."""
        gen, start, nfe, parts = pl_module.generator("plot-ll"), time.perf_counter(), 0, []
        ode = pl_module.ode.replace(**self.ode)
        for piece in pts.split(chunk):
            lik = pl_module.log_likelihood(piece.contiguous(), gen, ode)
            parts.append(lik.logp.detach())
            nfe += lik.nfe
        self.last_info.update(density_nfe=nfe, density_seconds=time.perf_counter() - start)
        return torch.cat(parts)

    def _density_1d(self, pl_module, x: Tensor, spec, step: int):
        data = x[:, 0]
        lo, hi = float(data.min()), float(data.max())
        if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
            lo, hi = lo - 0.3 * (hi - lo), hi + 0.3 * (hi - lo)
        else:
            lo, hi = -1.2, 1.0
        grid = torch.linspace(lo, hi, self.grid_size, dtype=x.dtype, device=pl_module.device)
        logp = self._logp(pl_module, grid[:, None])
        exact = spec.log_prob(grid[:, None]) if spec.log_prob is not None else None
        title = f"step {step} | " + _summary(logp, exact, spec.entropy, lambda p: torch.trapezoid(p, grid))
        return density_figure_1d(grid, logp, exact, data, title=title)

    def _density_2d(self, pl_module, x: Tensor, spec, samples: Tensor, step: int):
        lo, hi = x.min(0).values, x.max(0).values
        pad = (0.1 * (hi - lo)).clamp_min(0.1)
        lo, hi = lo - pad, hi + pad
        n = self.grid_size_2d
        xs = torch.linspace(float(lo[0]), float(hi[0]), n, dtype=x.dtype, device=pl_module.device)
        ys = torch.linspace(float(lo[1]), float(hi[1]), n, dtype=x.dtype, device=pl_module.device)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts = torch.stack([xx, yy], dim=-1).reshape(-1, 2)
        logp = self._logp(pl_module, pts).reshape(n, n)
        exact = spec.log_prob(pts).reshape(n, n) if spec.log_prob is not None else None
        cell = float((xs[1] - xs[0]) * (ys[1] - ys[0])) if n > 1 else 1.0
        title = f"step {step} | " + _summary(logp, exact, None, lambda p: p.sum() * cell)
        return density_figure_2d(xs, ys, logp, exact, samples, title=title)

    def _images(self, trainer, pl_module, image_shape: tuple, centered: bool, out: Path, step: int) -> None:
        n = min(self.num_samples, 16)
        samples = self._sample(pl_module, (n, *image_shape), torch.float32)
        grid = image_grid(samples, centered=centered, nrow=max(1, math.ceil(math.sqrt(n))))
        for logger in _tensorboards(trainer):
            logger.experiment.add_image("val/samples", grid, global_step=step)
        from matplotlib.image import imsave

        path = out / "samples_latest.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        imsave(path, grid.permute(1, 2, 0).numpy())
        self.last_samples_path = str(path)

    @staticmethod
    def _log_figure(trainer, tag: str, fig, step: int) -> None:
        for logger in _tensorboards(trainer):
            logger.experiment.add_figure(tag, fig, global_step=step, close=False)


def _tensorboards(trainer) -> list:
    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, TensorBoardLogger)]


def _summary(logp: Tensor, exact_logp: Tensor | None, entropy, integrate) -> str:
    """'model mass on grid ... | KL(q||p) on grid ... nats | H(q) ...' for figure titles."""
    parts = [f"model mass on grid {float(integrate(logp.exp())):.3f}"]
    if exact_logp is not None:
        logq = exact_logp.to(logp.dtype)
        q = logq.exp()
        kl = integrate(torch.where(q > 0, q * (logq - logp), torch.zeros_like(q)))
        parts.append(f"KL(q||p) on grid {float(kl):.3f} nats")
    if entropy is not None:
        parts.append(f"H(q) {float(entropy):.3f}")
    return " | ".join(parts)
