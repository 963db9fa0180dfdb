"""The ``sample`` command's work: probability-flow ODE samples with per-sample seeds, written with a figure."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .core.ode import ODEOptions, seeded_prior
from .data.spec import DataSpec
from .progress import Progress

__all__ = ["draw_samples"]


def draw_samples(model, spec: DataSpec, out: Path, *, num_samples: int, batch_size: int, ode: ODEOptions,
                 seed: int, device, verbose: bool = True) -> Path:
    """Draw ``num_samples`` samples in batches (sample i starts from a prior draw seeded by (seed, i), so
    the set does not depend on the batch size); write ``samples.npz`` (samples, NFE per batch) and
    ``samples.png`` (an image grid, a histogram or a scatter plot) into ``out``."""
    from .plots import image_grid, samples_figure, save_figure  # matplotlib only when needed

    if num_samples <= 0 or batch_size <= 0:
        raise ValueError("--num_samples and --batch_size must be positive")
    shape = tuple(spec.shape or (model.net.dim,))
    chunks, nfes, start = [], [], time.perf_counter()
    with Progress(num_samples, "sampling", enabled=verbose) as progress:
        for lo in range(0, num_samples, batch_size):
            ids = range(lo, min(lo + batch_size, num_samples))
            drawn = model.sample(seeded_prior(model.sde, ids, shape, seed, "sample", device=device), ode)
            chunks.append(drawn.x.cpu())
            nfes.append(drawn.nfe)
            progress.update(len(ids))
    samples = torch.cat(chunks)
    np.savez(out / "samples.npz", samples=samples.numpy(), nfe=np.array(nfes))
    if len(shape) == 3:
        from matplotlib.image import imsave

        imsave(out / "samples.png", image_grid(samples[:64], spec.centered).permute(1, 2, 0).numpy())
    else:
        ref = spec.sample(num_samples) if spec.sample is not None else None
        save_figure(samples_figure(samples, ref), out / "samples.png")
    if verbose:
        print(f"{num_samples} samples (mean NFE {np.mean(nfes):.0f}, {time.perf_counter() - start:.1f} s)")
    return out
