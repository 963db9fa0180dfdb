"""Data drawn from a sampler: fresh training batches, reproducible and resumable mid-epoch, and fixed
validation / test sets.

Batch i of an epoch is a pure function of (seed, rank, epoch, i), so ranks differ, runs are
reproducible, and a run resumed mid-epoch sees exactly the batches the uninterrupted run would have.
:class:`SampledDataModule` is the base of the synthetic and the discrete data modules.
"""

from __future__ import annotations

import abc
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .sharding import IndexedRows, eval_loader

__all__ = ["FreshBatches", "ResumableLoader", "train_key", "SampledDataModule"]


def _seeded(*key: int) -> torch.Generator:
    """CPU generator seeded from a tuple of ints via numpy's SeedSequence (well-mixed, collision-free)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class FreshBatches:
    """Yields ``steps`` fresh batches [batch_size, d]; batch i of an epoch is drawn from a generator
    seeded with (*key(), i), where key() = (seed, rank, epoch) is read at each ``iter()``.

    Every batch is a pure function of (seed, rank, epoch, i), so a run resumed mid-epoch (see
    :class:`ResumableLoader`) sees exactly the batches the uninterrupted run would have seen.
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


class ResumableLoader:
    """The training iterable: ``len()`` batches per epoch, and a ``state_dict`` that Lightning saves in
    checkpoints so that a mid-epoch resume continues the same data stream."""

    def __init__(self, dataset: FreshBatches):
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


class SampledDataModule(L.LightningDataModule, abc.ABC):
    """A data module whose points come from a sampler: ``draw_train(n, generator)`` gives fresh training
    batches (:class:`FreshBatches`, ``steps_per_epoch`` per epoch), ``draw_eval(n, generator)`` the
    fixed validation and test sets (seeds ``seed + 1`` and ``seed + 2``), served in order with each
    point's index, each point once across DDP ranks (``sharding.eval_loader``)."""

    def __init__(self, *, batch_size: int, eval_batch_size: int, steps_per_epoch: int, val_size: int,
                 test_size: int, seed: int):
        super().__init__()
        for arg, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                           ("steps_per_epoch", steps_per_epoch), ("val_size", val_size), ("test_size", test_size)):
            if int(value) <= 0:
                raise ValueError(f"{arg} must be a positive integer, got {value}")
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.steps_per_epoch, self.val_size, self.test_size = int(steps_per_epoch), int(val_size), int(test_size)
        self.seed = int(seed)
        self._val: Tensor | None = None
        self._test: Tensor | None = None

    @abc.abstractmethod
    def draw_train(self, n: int, generator: torch.Generator) -> Tensor:
        """n training points (model range)."""

    @abc.abstractmethod
    def draw_eval(self, n: int, generator: torch.Generator) -> Tensor:
        """n evaluation points (model range, or uint8 for 8-bit data)."""

    def setup(self, stage: str | None = None) -> None:
        if self._val is None:
            self._val = self.draw_eval(self.val_size, torch.Generator().manual_seed(self.seed + 1))
        if self._test is None:
            self._test = self.draw_eval(self.test_size, torch.Generator().manual_seed(self.seed + 2))

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(FreshBatches(self.draw_train, self.batch_size, self.steps_per_epoch,
                                            lambda: train_key(self.trainer, self.seed)))

    def _eval_loader(self, data: Tensor) -> DataLoader:
        return eval_loader(IndexedRows(data), min(self.eval_batch_size, len(data)), self.trainer)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self._val)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self._test)
