"""Evaluation sharding without padding: each point is evaluated exactly once across DDP ranks.

Lightning's default DistributedSampler pads every rank's shard to the same length by repeating the
first points, which counts them twice in validation means. Eval dataloaders use this sampler instead
(Lightning keeps a sampler that is already distributed); the module logs its validation means as
metrics that sum (value × batch size) and counts across ranks, so uneven shards give the exact mean.
"""

from __future__ import annotations

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["eval_sampler", "RawRows", "eval_loader"]


class RawRows(Dataset):
    """The rows of a tensor as they are (uint8 bytes stay uint8: the model dequantizes them)."""

    def __init__(self, data: Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Tensor:
        return self.data[i]


def eval_sampler(dataset: Dataset, trainer) -> UnrepeatedDistributedSampler | None:
    """Rank-strided shard of ``dataset`` with no repeats when ``trainer`` runs several processes, else None."""
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world <= 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=int(trainer.global_rank), shuffle=False)


def eval_loader(dataset: Dataset, batch_size: int, trainer, **kwargs) -> DataLoader:
    """An evaluation loader over ``dataset`` in order, each point once across DDP ranks."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=eval_sampler(dataset, trainer), **kwargs)
