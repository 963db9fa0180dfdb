"""LightningDataModules: synthetic toy data (DESIGN.md §5) and CIFAR-10 (§6)."""

from .cifar10 import CIFAR10DataModule, read_cifar10, write_fake_cifar10
from .synthetic import DATASETS, SyntheticDataModule, checkerboard, swissroll

__all__ = [
    "SyntheticDataModule", "checkerboard", "swissroll", "DATASETS",
    "CIFAR10DataModule", "read_cifar10", "write_fake_cifar10",
]
