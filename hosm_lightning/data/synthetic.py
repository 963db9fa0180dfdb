"""Synthetic toy data of the paper (docs/design.md §5) as a LightningDataModule.

Samplers are pure functions ``sampler(n, generator) -> float32 [n, d]``. Training draws fresh
samples every step from a generator seeded by (seed, global_rank, epoch); validation and test use
fixed sets seeded by seed + 1 and seed + 2, identical on every rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.mixtures import GaussianMixture, paper_mog1d
from .spec import DataSpec
from .streams import SampledDataModule

__all__ = ["checkerboard", "swissroll", "SyntheticDataModule", "DATASETS", "exact_logp_2d", "CHECKERBOARD_LOGP"]

DATASETS = ("mog1d", "checkerboard", "swissroll", "gmm")
CHECKERBOARD_ENTROPY = math.log(32.0)  # uniform on 8 squares of side 2
CHECKERBOARD_LOGP = -CHECKERBOARD_ENTROPY


def exact_logp_2d(name: str, points: Tensor) -> Tensor | None:
    """Exact log density (nats, [N]) of a named 2-D toy distribution at ``points`` [N, 2], or None.

    'checkerboard': uniform on the 8 squares of side 2 in [-4, 4)² whose integer cell indices
    (floor(x/2), floor(y/2)) have an even sum -- log(1/32) inside, -inf outside. This matches the
    sampler x1 ~ U[-2, 2), x2 = U[0, 1) - 2 Bernoulli + (floor(x1) mod 2), returned as 2 (x1, x2).
    Unknown names (e.g. 'swissroll', whose density has no closed form) give None.
    """
    if name != "checkerboard":
        return None
    p = points.reshape(-1, 2)
    box = ((p >= -4) & (p < 4)).all(dim=1)
    cells = torch.floor(p / 2)
    even = torch.remainder(cells[:, 0] + cells[:, 1], 2) == 0
    inside = box & even
    dtype = p.dtype if p.is_floating_point() else torch.float32
    full = torch.full(inside.shape, CHECKERBOARD_LOGP, dtype=dtype, device=p.device)
    return torch.where(inside, full, torch.full_like(full, -math.inf))


def checkerboard(n: int, g: torch.Generator | None = None) -> Tensor:
    """Uniform on the 8 'black' squares (side 2) of a checkerboard in [-4, 4)², float32 [n, 2].

    x1 ~ U[-2, 2), x2 = U[0, 1) - 2 Bernoulli(1/2) + (floor(x1) mod 2); return 2 (x1, x2).
    Exact entropy log 32 nats.
    """
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    coin = torch.randint(0, 2, (n,), generator=g).double()
    x2 = torch.rand(n, generator=g, dtype=torch.float64) - 2 * coin + torch.remainder(torch.floor(x1), 2)
    return (2 * torch.stack([x1, x2], dim=1)).float()


SWISSROLL_OFFSETS = ((0.0, 0.0), (4.5, 4.5), (4.5, -4.5), (-4.5, 4.5), (-4.5, -4.5))


def swissroll(n: int, g: torch.Generator | None = None) -> Tensor:
    """Five swiss rolls, float32 [n, 2], shuffled.

    sklearn-style roll with noise 1.0, columns (0, 2): t = 1.5π(1 + 2U), (t cos t, t sin t) + N(0, I),
    divided by 10; one copy at the origin plus four shifted by (±4.5, ±4.5). Copy sizes are n // 5,
    the first copy taking the remainder.
    """
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    roll = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    roll = (roll + torch.randn(n, 2, generator=g, dtype=torch.float64)) / 10
    sizes = [n - 4 * (n // 5)] + [n // 5] * 4
    offsets = torch.cat([torch.tensor(o, dtype=torch.float64).expand(k, 2) for o, k in zip(SWISSROLL_OFFSETS, sizes)])
    perm = torch.randperm(n, generator=g)
    return (roll + offsets)[perm].float()


class SyntheticDataModule(SampledDataModule):
    """Toy data of the paper; batches are float32 tensors [B, dim] (no labels, no tuples).

    Args:
        name: "mog1d" (paper's 1-D mixture), "checkerboard", "swissroll" or "gmm" (a diagonal
            mixture given by ``means`` [K, D] (or [K] for 1-D), ``variances`` and optional ``weights``).
        batch_size: training batch size (the paper uses 5000); also the eval batch size cap.
        steps_per_epoch: training batches per epoch (all freshly sampled).
        val_size: size of the fixed validation set.
        test_size: size of the fixed test set.
        seed: base seed. Train key (seed, global_rank, epoch); val seed + 1; test seed + 2.
        means: name='gmm' only: component means, [K, D] (or [K] for 1-D).
        variances: name='gmm' only: per-component diagonal variances, [K, D] or [K].
        weights: name='gmm' only: mixture weights [K] (default uniform).
    """

    def __init__(
        self,
        name: str = "mog1d",
        batch_size: int = 5000,
        steps_per_epoch: int = 100,
        val_size: int = 2000,
        test_size: int = 5000,
        seed: int = 0,
        means: list | None = None,
        variances: list | None = None,
        weights: list | None = None,
    ):
        if name not in DATASETS:
            raise ValueError(f"unknown synthetic dataset {name!r}; choose one of {list(DATASETS)}")
        super().__init__(batch_size=batch_size, eval_batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                         val_size=val_size, test_size=test_size, seed=seed)
        self.save_hyperparameters()
        self.name = name
        self._mixture: GaussianMixture | None = None
        if name == "mog1d":
            self._mixture = paper_mog1d()
        elif name == "gmm":
            if means is None or variances is None:
                raise ValueError("name='gmm' needs `means` ([K, D] or [K]) and `variances`; `weights` is optional")
            self._mixture = GaussianMixture(means, variances, weights)
        self._entropy: float | None = None

    # -- description ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Data dimension D."""
        return self._mixture.dim if self._mixture is not None else 2

    @property
    def mixture(self) -> GaussianMixture | None:
        """The exact data distribution when it is a Gaussian mixture (exact scores/densities), else None."""
        return self._mixture

    @property
    def entropy(self) -> float | None:
        """Differential entropy of the data in nats (the best achievable test NLL), or None if unknown."""
        if self._entropy is None:
            if self.name == "checkerboard":
                self._entropy = CHECKERBOARD_ENTROPY
            elif self._mixture is not None and self._mixture.dim == 1:
                self._entropy = self._mixture.entropy()
        return self._entropy

    def data_spec(self) -> DataSpec:
        """Float data [B, dim]; exact density for the mixtures and the checkerboard (docs/design.md §5)."""
        mix = self._mixture
        log_prob = mix.log_prob if mix is not None else (
            (lambda x: exact_logp_2d("checkerboard", x)) if self.name == "checkerboard" else None)
        return DataSpec(shape=(self.dim,), discrete=False, name=self.name, entropy=self.entropy, log_prob=log_prob,
                        mixture=mix, sample=self.sample)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples from the data distribution, float32 [n, dim]."""
        if self.name == "checkerboard":
            return checkerboard(n, generator)
        if self.name == "swissroll":
            return swissroll(n, generator)
        return self._mixture.sample(n, generator)

    #: training batches and the validation / test sets are plain samples of the distribution
    draw_train = draw_eval = sample
