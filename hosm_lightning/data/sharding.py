"""Evaluation data: every point once across DDP ranks, and batches that carry each point's dataset index.

One sharding rule for the whole project, :func:`shard_indices`: rank r of W takes the indices
r, r + W, r + 2W, ... (no padding). Evaluation loaders use it through :class:`EvalSampler` (a
``DistributedSampler``, so Lightning keeps it instead of adding its padding sampler), and FID uses it
for the indices of the samples it generates. Evaluation datasets (:class:`IndexedRows`) yield
``{'x': point, 'index': i}``, so the test loop can seed every point's noise by its index
(lit/evaluation.py) whatever the batch or rank it lands in.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["shard_indices", "EvalSampler", "IndexedRows", "eval_loader", "batch_tensor", "batch_index"]


def shard_indices(n: int, world_size: int, rank: int) -> range:
    """This rank's indices of n points: rank, rank + W, ... (each index on exactly one rank, no padding)."""
    return range(rank, n, max(world_size, 1))


class EvalSampler(DistributedSampler):
    """The sampler of :func:`shard_indices` (in order, no padding) for a dataset of ``len()`` points."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(shard_indices(len(self.dataset), self.num_replicas, self.rank))

    def __len__(self) -> int:
        return len(shard_indices(len(self.dataset), self.num_replicas, self.rank))


class IndexedRows(Dataset):
    """The rows of a tensor as ``{'x': row, 'index': i}`` (uint8 bytes stay uint8: the model dequantizes them)."""

    def __init__(self, data: Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.data[i], "index": i}


def eval_loader(dataset: Dataset, batch_size: int, trainer, **kwargs) -> DataLoader:
    """An evaluation loader over ``dataset`` in order, each point once across the trainer's DDP ranks."""
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    sampler = EvalSampler(dataset, world, int(trainer.global_rank)) if world > 1 else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, **kwargs)


def batch_tensor(batch) -> Tensor:
    """The data of a batch: a tensor, the ``'x'`` of an indexed batch, or the first item of (data, labels)."""
    if isinstance(batch, dict):
        return batch["x"]
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def batch_index(batch) -> Tensor | None:
    """The dataset indices [B] of an indexed batch, else None."""
    if isinstance(batch, dict) and "index" in batch:
        return torch.as_tensor(batch["index"])
    return None
