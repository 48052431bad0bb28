"""scikit-learn's bundled 8×8 handwritten digits: the offline default of the quick start and the tests."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_wm.data.base import SplitDataModule


class DigitsDataModule(SplitDataModule):
    """The 1,797 8×8 digits of ``sklearn.datasets.load_digits`` (no download); a fifth is the test set.

    Accepts every argument of :class:`~lightning_wm.data.base.SplitDataModule`.
    """

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed + 1))
        n_test = len(labels) // 5
        test, train = order[:n_test], order[n_test:]
        return images[train], labels[train], images[test], labels[test]
