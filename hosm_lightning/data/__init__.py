"""LightningDataModules: synthetic toy data (docs/design.md §5), CIFAR-10 (§6) and real images (§6)."""

from .cifar10 import CIFAR10DataModule, read_cifar10, write_fake_cifar10
from .images import ImageDataModule
from .discrete import DiscreteDataModule, DiscreteProduct, QuantizedMarginal
from .spec import DataSpec, describe
from .synthetic import DATASETS, SyntheticDataModule, checkerboard, swissroll

__all__ = [
    "SyntheticDataModule", "checkerboard", "swissroll", "DATASETS",
    "CIFAR10DataModule", "read_cifar10", "write_fake_cifar10",
    "DiscreteDataModule", "DiscreteProduct", "QuantizedMarginal",
    "ImageDataModule",
    "DataSpec", "describe",
]
