"""MNIST and Fashion-MNIST from the original IDX files, offline first.

Fashion-MNIST is looked for in ``data_dir/FashionMNIST/raw``, then in Debian's ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``, whose re-compressed ``.gz`` files fail torchvision's MD5 check, so they are
decompressed into ``raw/`` here), and only then downloaded by torchvision when ``download`` is true.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_wm.data.base import DatasetNotFoundError, SplitDataModule

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_MAGIC = {3: 2051, 1: 2049}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the MNIST format: big-endian magic, dimensions, then uint8 data)."""
    data = path.read_bytes()
    if len(data) < 8:
        raise DatasetNotFoundError(f"{path} is corrupt: {len(data)} bytes, not an IDX file")
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic not in IDX_MAGIC.values() or len(data) < 4 + 4 * ndim:
        raise DatasetNotFoundError(f"{path} is corrupt: magic number {magic} is not an IDX file's")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetNotFoundError(f"{path} is corrupt: {body.size} values for shape {shape}")
    return body.reshape(shape)


class MNISTDataModule(SplitDataModule):
    """MNIST (28×28 grey digits, 60,000 training and 10,000 test images).

    Args:
        data_dir: the root where ``<folder>/raw`` holds the IDX files (torchvision's layout).
        download: let torchvision download the files when no copy is found.
        **kwargs: the arguments of :class:`~lightning_wm.data.base.SplitDataModule`.
    """

    folder = "MNIST"
    title = "MNIST"
    offline_dirs: tuple[str, ...] = ()
    torchvision_name = "MNIST"

    def __init__(self, data_dir: str = "data", download: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_dir = data_dir
        self.download = download

    @property
    def raw_dir(self) -> Path:
        return Path(self.data_dir) / self.folder / "raw"

    def _copy_offline(self) -> bool:
        for folder in map(Path, self.offline_dirs):
            if all((folder / f"{name}.gz").is_file() or (folder / name).is_file() for name in IDX_FILES):
                self.raw_dir.mkdir(parents=True, exist_ok=True)
                for name in IDX_FILES:
                    if (folder / name).is_file():
                        shutil.copyfile(folder / name, self.raw_dir / name)
                    else:
                        try:
                            with gzip.open(folder / f"{name}.gz", "rb") as src, open(self.raw_dir / name, "wb") as dst:
                                shutil.copyfileobj(src, dst)
                        except (OSError, EOFError) as err:
                            (self.raw_dir / name).unlink(missing_ok=True)
                            raise DatasetNotFoundError(f"{folder / name}.gz is corrupt: {err}") from None
                return True
        return False

    def prepare_data(self) -> None:
        if all((self.raw_dir / name).is_file() for name in IDX_FILES) or self._copy_offline():
            return
        if self.download:
            import torchvision

            getattr(torchvision.datasets, self.torchvision_name)(self.data_dir, train=True, download=True)
            getattr(torchvision.datasets, self.torchvision_name)(self.data_dir, train=False, download=True)
            return
        looked = "; ".join([str(self.raw_dir), *self.offline_dirs])
        hint = " (Debian: apt-get install -y dataset-fashion-mnist)" if self.offline_dirs else ""
        raise DatasetNotFoundError(
            f"{self.title} not found; looked in: {looked}. Put the four IDX files in {self.raw_dir}{hint}, "
            "or set download: true"
        )

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self.prepare_data()
        train_x, train_y, test_x, test_y = (read_idx(self.raw_dir / name) for name in IDX_FILES)

        def images(array: np.ndarray) -> Tensor:
            return torch.from_numpy(array.copy()).float().unsqueeze(1) / 255.0

        def labels(array: np.ndarray) -> Tensor:
            return torch.from_numpy(array.astype(np.int64))

        return images(train_x), labels(train_y), images(test_x), labels(test_y)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017), offline from Debian's ``dataset-fashion-mnist`` when installed."""

    folder = "FashionMNIST"
    title = "Fashion-MNIST"
    offline_dirs: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
    torchvision_name = "FashionMNIST"
