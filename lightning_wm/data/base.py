"""The split every DataModule of the project shares: defender / attacker / validation / test, in memory.

Removal attacks are only meaningful when the attacker trains on data the owner did not use (the SoK toolbox,
Lukas et al. 2022, gives the attacker a third of the training set). ``SplitDataModule`` holds the whole dataset
as normalised tensors, splits its training set once with a seeded permutation, and serves the part named by
``train_split`` as the training set, so one YAML key switches a run from the owner's data to the attacker's.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

SplitName = Literal["defender", "attacker", "all", "val", "test"]
TRAIN_SPLITS = ("defender", "attacker", "all")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable; the message says where it looked and how to get it."""


class SplitDataModule(L.LightningDataModule):
    """A LightningDataModule over in-memory tensors with a reproducible defender/attacker split.

    Subclasses implement :meth:`load`, which returns the raw training and test images in ``[0, 1]`` and their
    labels; normalisation (per-channel mean and standard deviation of the training images) and the split are
    done here.

    Args:
        batch_size: the loaders' batch size.
        attacker_fraction: share of the (non-validation) training set given to the attacker, in ``[0, 1)``.
        val_fraction: share of the training set held out for validation.
        train_split: what ``train_dataloader`` serves: ``defender`` (the owner), ``attacker``, or ``all``.
        split_seed: seed of the split permutation (independent of ``seed_everything``, so every run, owner's
            or attacker's, sees the same split).
        num_workers: DataLoader workers (tensors in memory rarely need any).
    """

    num_classes: int = 10

    def __init__(
        self,
        batch_size: int = 64,
        attacker_fraction: float = 1 / 3,
        val_fraction: float = 0.1,
        train_split: Literal["defender", "attacker", "all"] = "defender",
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if train_split not in TRAIN_SPLITS:
            raise ValueError(f"train_split must be one of {TRAIN_SPLITS}, got {train_split!r}")
        if not 0.0 <= attacker_fraction < 1.0:
            raise ValueError(f"attacker_fraction must be in [0, 1), got {attacker_fraction}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size = batch_size
        self.attacker_fraction = attacker_fraction
        self.val_fraction = val_fraction
        self.train_split = train_split
        self.split_seed = split_seed
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] | None = None
        self._mean: Tensor | None = None
        self._std: Tensor | None = None

    @abstractmethod
    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(train_images, train_labels, test_images, test_labels)``; images float in [0, 1], NCHW."""

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        train_x, train_y, test_x, test_y = self.load()
        self._mean = train_x.mean(dim=(0, 2, 3)).view(-1, 1, 1)
        self._std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-6).view(-1, 1, 1)
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = round(len(order) * self.val_fraction)
        n_attacker = round((len(order) - n_val) * self.attacker_fraction)
        parts = {
            "val": order[:n_val],
            "attacker": order[n_val : n_val + n_attacker],
            "defender": order[n_val + n_attacker :],
        }
        train_x = self.normalize(train_x)
        self._splits = {name: TensorDataset(train_x[idx], train_y[idx]) for name, idx in parts.items()}
        everything = torch.cat([parts["defender"], parts["attacker"]])
        self._splits["all"] = TensorDataset(train_x[everything], train_y[everything])
        self._splits["test"] = TensorDataset(self.normalize(test_x), test_y)

    def dataset(self, name: SplitName) -> TensorDataset:
        """The split ``name`` (``defender``, ``attacker``, ``all`` = both, ``val``, ``test``); loads on first use."""
        self.setup()
        assert self._splits is not None
        if name not in self._splits:
            raise ValueError(f"unknown split {name!r}; the splits are {sorted(self._splits)}")
        return self._splits[name]

    @property
    def train_dataset(self) -> TensorDataset:
        return self.dataset(self.train_split)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset("test").tensors[0].shape[1:])

    def normalize(self, pixels: Tensor) -> Tensor:
        """Map images in [0, 1] to the model's input space."""
        self._require_stats()
        return (pixels - self._mean.to(pixels)) / self._std.to(pixels)

    def denormalize(self, inputs: Tensor) -> Tensor:
        """Map model inputs back to images in [0, 1]."""
        self._require_stats()
        return inputs * self._std.to(inputs) + self._mean.to(inputs)

    def _require_stats(self) -> None:
        if self._mean is None:
            self.setup()

    def _loader(self, dataset: TensorDataset | ConcatDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)
