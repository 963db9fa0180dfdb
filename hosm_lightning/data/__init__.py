"""LightningDataModules: synthetic toy data (docs/design.md §5) and CIFAR-10 (§6)."""

from .cifar10 import CIFAR10DataModule, read_cifar10, write_fake_cifar10
from .synthetic import DATASETS, SyntheticDataModule, checkerboard, swissroll
from .spec import DataSpec, describe
from .discrete import DiscreteDataModule, DiscreteProduct, QuantizedMarginal

__all__ = [
    "SyntheticDataModule", "checkerboard", "swissroll", "DATASETS",
    "CIFAR10DataModule", "read_cifar10", "write_fake_cifar10",
    "DiscreteDataModule", "DiscreteProduct", "QuantizedMarginal",
    "DataSpec", "describe",
]
