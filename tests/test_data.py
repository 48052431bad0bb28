"""DataModules: splits, normalisation, offline reading and the errors of a missing or corrupt dataset."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_wm.data import (
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)


def test_digits_split_is_reproducible_and_disjoint():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup(), b.setup()
    assert torch.equal(a.dataset("defender").tensors[0], b.dataset("defender").tensors[0])
    sizes = {name: len(a.dataset(name)) for name in ("defender", "attacker", "val", "test")}
    train = sizes["defender"] + sizes["attacker"] + sizes["val"]
    assert sizes["test"] == 1797 // 5
    assert train + sizes["test"] == 1797
    assert sizes["attacker"] == round((sizes["defender"] + sizes["attacker"]) / 3)
    defender = {tuple(x.flatten().tolist()) for x in a.dataset("defender").tensors[0]}
    attacker = {tuple(x.flatten().tolist()) for x in a.dataset("attacker").tensors[0]}
    assert len(defender & attacker) <= 5  # digits has a few exact duplicate images, nothing more is shared
    assert a.input_shape == (1, 8, 8)


def test_attacker_fraction_and_train_split_are_configurable():
    dm = DigitsDataModule(attacker_fraction=0.5, train_split="attacker", batch_size=16)
    dm.setup()
    assert len(dm.dataset("attacker")) == pytest.approx(len(dm.dataset("defender")), abs=1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8)
    assert len(dm.train_dataloader().dataset) == len(dm.dataset("attacker"))
    with pytest.raises(ValueError, match="train_split"):
        DigitsDataModule(train_split="owner")
    with pytest.raises(ValueError, match="attacker_fraction"):
        DigitsDataModule(attacker_fraction=1.5)


def test_normalisation_round_trips_and_centres_the_data():
    dm = DigitsDataModule()
    x = dm.dataset("defender").tensors[0]
    assert abs(float(x.mean())) < 0.2
    pixels = dm.denormalize(x)
    assert float(pixels.min()) >= -1e-6
    assert float(pixels.max()) <= 1 + 1e-6
    assert torch.allclose(dm.normalize(pixels), x, atol=1e-5)


def _write_idx(folder, n_train=30, n_test=10, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def write(name, array, magic):
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        data = header + array.astype(np.uint8).tobytes()
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write(f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        write(f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), 2049)


def test_mnist_reads_idx_files_offline(tmp_path):
    _write_idx(tmp_path / "MNIST" / "raw")
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    dm.setup()
    assert dm.input_shape == (1, 28, 28)
    assert len(dm.dataset("test")) == 10


def test_fashion_mnist_decompresses_an_offline_copy(tmp_path, monkeypatch):
    offline = tmp_path / "debian"
    _write_idx(offline, gz=True)
    monkeypatch.setattr(FashionMNISTDataModule, "offline_dirs", (str(offline),))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), download=False)
    dm.setup()
    assert len(dm.dataset("test")) == 10
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "offline_dirs", (str(tmp_path / "nowhere"),))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "empty"), download=False)
    with pytest.raises(DatasetNotFoundError, match="looked in: .*empty/FashionMNIST/raw; .*nowhere") as err:
        dm.setup()
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)


def test_corrupt_idx_files_are_reported(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw)
    (raw / "train-images-idx3-ubyte").write_bytes(b"garbage")
    with pytest.raises(DatasetNotFoundError, match="corrupt"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).setup()


def test_cifar10_reads_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 20), ("data_batch_2", 20), ("test_batch", 8)):
        batch = {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    dm.setup()
    assert dm.input_shape == (3, 32, 32)
    assert len(dm.dataset("test")) == 8
    empty = CIFAR10DataModule(data_dir=str(tmp_path / "none"), download=False)
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10 not found"):
        empty.setup()


@pytest.mark.skipif(
    not any(Path(d).is_dir() for d in FashionMNISTDataModule.offline_dirs),
    reason=f"Fashion-MNIST is not in {FashionMNISTDataModule.offline_dirs} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_debian(tmp_path):
    """Debian's copy of Fashion-MNIST, read offline, has the dataset's 60,000 training and 10,000 test images."""
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=False)
    dm.setup()
    assert len(dm.dataset("test")) == 10_000
    assert len(dm.dataset("defender")) + len(dm.dataset("attacker")) + len(dm.dataset("val")) == 60_000
