"""DataModules with a reproducible defender/attacker split, all usable offline."""

from lightning_wm.data.base import DatasetNotFoundError, SplitDataModule
from lightning_wm.data.cifar import CIFAR10DataModule
from lightning_wm.data.digits import DigitsDataModule
from lightning_wm.data.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "SplitDataModule",
]
