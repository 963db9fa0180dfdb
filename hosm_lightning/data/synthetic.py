"""Synthetic toy data of the paper (docs/design.md §5) as a LightningDataModule.

Samplers are pure functions ``sampler(n, generator) -> float32 [n, d]``. Training draws fresh
samples every step from a generator seeded by (seed, global_rank, epoch); validation and test use
fixed sets seeded by seed + 1 and seed + 2, identical on every rank.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ..core.mixtures import GaussianMixture, paper_mog1d
from .sharding import eval_sampler
from .spec import DataSpec

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


def _seeded(*key: int) -> torch.Generator:
    """CPU generator seeded from a tuple of ints via numpy's SeedSequence (well-mixed, collision-free)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class _FreshBatches:
    """Yields ``steps`` fresh batches [batch_size, d]; batch i of an epoch is drawn from a generator
    seeded with (*key(), i), where key() = (seed, rank, epoch) is read at each ``iter()``.

    Every batch is a pure function of (seed, rank, epoch, i), so a run resumed mid-epoch (see
    :class:`_ResumableLoader`) sees exactly the batches the uninterrupted run would have seen.
    A plain iterable with a length, not a torch ``IterableDataset``: batches are drawn in the main
    process (no workers, so no duplicated data across workers), which is also why Lightning has
    no reason to warn about an ``IterableDataset`` with ``__len__``.
    """

    def __init__(self, sampler: Callable[[int, torch.Generator], Tensor], batch_size: int, steps: int,
                 key: Callable[[], tuple[int, ...]]):
        self.sampler, self.batch_size, self.steps, self.key = sampler, batch_size, steps, key
        self.start = 0  # first batch index of the next iteration (set when resuming)
        self.yielded = 0  # batches of the current epoch handed out so far

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tensor]:
        key, start = self.key(), self.start
        self.start = 0
        for i in range(start, self.steps):
            self.yielded = i + 1
            yield self.sampler(self.batch_size, _seeded(*key, i))


class _ResumableLoader:
    """The training iterable: ``len()`` batches per epoch, and a ``state_dict`` that Lightning saves in
    checkpoints so that a mid-epoch resume continues the same data stream."""

    def __init__(self, dataset: _FreshBatches):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.dataset)

    def state_dict(self) -> dict:
        return {"yielded": self.dataset.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.start = int(state.get("yielded", 0)) % max(self.dataset.steps, 1)


def train_key(trainer, seed: int) -> tuple[int, int, int]:
    """(seed, global_rank, current_epoch) of the training stream, read from the attached trainer
    (rank 0, epoch 0 if none)."""
    rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
    epoch = int(getattr(trainer, "current_epoch", 0) or 0) if trainer is not None else 0
    return seed, rank, epoch


def _stack_first(batch: list[tuple[Tensor]]) -> Tensor:
    """Collate TensorDataset items into one tensor (not a list)."""
    return torch.stack([item[0] for item in batch])


class SyntheticDataModule(L.LightningDataModule):
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
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"unknown synthetic dataset {name!r}; choose one of {list(DATASETS)}")
        for arg, value in (("batch_size", batch_size), ("steps_per_epoch", steps_per_epoch),
                           ("val_size", val_size), ("test_size", test_size)):
            if int(value) <= 0:
                raise ValueError(f"{arg} must be a positive integer, got {value}")
        self.save_hyperparameters()
        self.name, self.batch_size, self.steps_per_epoch = name, int(batch_size), int(steps_per_epoch)
        self.val_size, self.test_size, self.seed = int(val_size), int(test_size), int(seed)
        self._mixture: GaussianMixture | None = None
        if name == "mog1d":
            self._mixture = paper_mog1d()
        elif name == "gmm":
            if means is None or variances is None:
                raise ValueError("name='gmm' needs `means` ([K, D] or [K]) and `variances`; `weights` is optional")
            self._mixture = GaussianMixture(means, variances, weights)
        self._entropy: float | None = None
        self._val: Tensor | None = None
        self._test: Tensor | None = None

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

    # -- Lightning hooks ------------------------------------------------------------------------
    def _train_key(self) -> tuple[int, int, int]:
        return train_key(self.trainer, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self._val is None:
            self._val = self.sample(self.val_size, torch.Generator().manual_seed(self.seed + 1))
        if self._test is None:
            self._test = self.sample(self.test_size, torch.Generator().manual_seed(self.seed + 2))

    def train_dataloader(self) -> DataLoader:
        ds = _FreshBatches(self.sample, self.batch_size, self.steps_per_epoch, self._train_key)
        return _ResumableLoader(ds)

    def _fixed_loader(self, data: Tensor) -> DataLoader:
        ds = TensorDataset(data)  # each point once across DDP ranks (no sampler padding)
        return DataLoader(ds, batch_size=min(self.batch_size, len(data)), shuffle=False, collate_fn=_stack_first,
                          sampler=eval_sampler(ds, self.trainer))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._fixed_loader(self._val)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._fixed_loader(self._test)
