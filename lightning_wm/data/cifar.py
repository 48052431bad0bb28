"""CIFAR-10 from torchvision's on-disk layout (``cifar-10-batches-py``), read without torchvision's MD5 check."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_wm.data.base import DatasetNotFoundError, SplitDataModule


class CIFAR10DataModule(SplitDataModule):
    """CIFAR-10 (32×32 colour, 50,000 training and 10,000 test images).

    Args:
        data_dir: the root holding ``cifar-10-batches-py``.
        download: let torchvision download the archive when it is missing.
        **kwargs: the arguments of :class:`~lightning_wm.data.base.SplitDataModule`.
    """

    def __init__(self, data_dir: str = "data", download: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_dir = data_dir
        self.download = download

    @property
    def batch_dir(self) -> Path:
        return Path(self.data_dir) / "cifar-10-batches-py"

    def prepare_data(self) -> None:
        if (self.batch_dir / "test_batch").is_file():
            return
        if self.download:
            import torchvision

            torchvision.datasets.CIFAR10(self.data_dir, train=True, download=True)
            return
        raise DatasetNotFoundError(f"CIFAR-10 not found in {self.batch_dir}; set download: true or copy it there")

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self.prepare_data()

        def read(paths: list[Path]) -> tuple[Tensor, Tensor]:
            data, labels = [], []
            for path in paths:
                try:
                    with open(path, "rb") as f:
                        batch = pickle.load(f, encoding="latin1")
                    data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3 * 32 * 32))
                    labels.extend(batch["labels"])
                    if len(labels) != sum(len(d) for d in data):
                        raise ValueError("as many labels as images")
                except Exception as err:  # noqa: BLE001  (any unreadable batch file ends in the same message)
                    raise DatasetNotFoundError(
                        f"{path} is corrupt ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                        f"delete {self.batch_dir} and download CIFAR-10 again"
                    ) from None
            images = torch.from_numpy(np.concatenate(data)).view(-1, 3, 32, 32).float() / 255.0
            return images, torch.tensor(labels, dtype=torch.long)

        train = sorted(self.batch_dir.glob("data_batch_*"))
        if not train:
            raise DatasetNotFoundError(f"CIFAR-10 not found in {self.batch_dir}: no data_batch_* files")
        return (*read(train), *read([self.batch_dir / "test_batch"]))
