"""Shared fixtures: fast Trainers on the bundled digits data, the registered schemes' examples embedded once per
module (``marked``), and the test-only plugin scheme; nothing touches the network.

``LIGHTNING_WM_SUITE_DATA=fashion_mnist`` runs the suites that take the ``dm`` fixture (the conformance and
false-accusation suites) on a 6,000-image subset of Fashion-MNIST (28×28) instead of digits (8×8); it needs
Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from lightning_wm import ImageClassifier, registry
from lightning_wm.data import DigitsDataModule, FashionMNISTDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.verify import WatermarkKey
from lightning_wm.watermarks import WatermarkScheme

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def fast_trainer(max_epochs: int = 1, callbacks: list | None = None, **kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints or progress bar: what most tests need."""
    options = {
        "max_epochs": max_epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks or [],
    }
    options.update(kwargs)
    return L.Trainer(**options)


SUITE_DATA = os.environ.get("LIGHTNING_WM_SUITE_DATA", "digits")


class FashionMNISTSubset(FashionMNISTDataModule):
    """The first 6,000 training and 2,000 test images of Fashion-MNIST: a digits-sized epoch of real 28×28 images,
    so the suites' examples train in seconds."""

    def load(self):
        train_x, train_y, test_x, test_y = super().load()
        return train_x[:6000], train_y[:6000], test_x[:2000], test_y[:2000]


def suite_datamodule(**kwargs) -> DigitsDataModule | FashionMNISTSubset:
    """The suites' data: digits, or the Fashion-MNIST subset when ``LIGHTNING_WM_SUITE_DATA=fashion_mnist``."""
    if SUITE_DATA == "fashion_mnist":
        return FashionMNISTSubset(download=False, **kwargs)
    if SUITE_DATA != "digits":
        raise ValueError(f"LIGHTNING_WM_SUITE_DATA must be digits or fashion_mnist, got {SUITE_DATA!r}")
    return DigitsDataModule(**kwargs)


def suite_pixels() -> int:
    return 28 * 28 if SUITE_DATA == "fashion_mnist" else 8 * 8


@pytest.fixture(scope="module")
def dm():
    """One DataModule per test module (its split is seeded, so sharing it changes nothing)."""
    return suite_datamodule(batch_size=64)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny digits models run fastest on one thread, and the CPU is shared: ``pytestmark = usefixtures(...)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The registry's examples: what the conformance suite and the reliability tests train on digits.

WIDTH = 8


FROM_GRADIENTS = ("frontier_stitching", "blackmarks")
"""Schemes whose key samples are adversarial examples of the model being marked, made after a warm-up: not
derivable from a seed, and their examples take the longest to embed."""


def slow_if_from_gradients(names: list[str]) -> list:
    """``names`` as parameters, the :data:`FROM_GRADIENTS` ones marked slow (their warm-up makes every embedding
    the longest of the suite; their counts over the larger slow populations run there anyway)."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in FROM_GRADIENTS else n for n in names]


def assert_innocent(tried: int, declared: int, min_p: float, alpha: float, where: object = None) -> None:
    """What a valid test at ``alpha`` gives on ``tried`` innocent suspects: few declared, and no p-value far in the
    tail.

    An exact p-value declares an innocent suspect with probability ``alpha`` by construction, so the count is
    Binomial(tried, alpha): the bound is its 99.9% quantile (0 or 1 for a few suspects, 2 or 3 for dozens), which a
    broken null (the untrained networks declared at p 1e-75 before, a constant predictor at 1e-100) crosses at
    once; and the smallest p among ``tried`` uniform draws is below 1e-5 with probability tried·1e-5. Asserting
    that none is declared would fail by chance on some keys: which key a seed draws depends on the CPU's kernels.
    """
    from scipy import stats

    assert declared <= int(stats.binom.isf(1e-3, tried, alpha)), where
    assert min_p > 1e-5, where


def example_scheme(name: str, seed: int | None, key_path: Path | None = None) -> WatermarkScheme:
    return registry.scheme(name).example(seed=seed, key_path=None if key_path is None else str(key_path))


def example_outputs(name: str) -> int:
    return 10 + registry.scheme(name).example_outputs


def example_model(name: str, width: int = WIDTH) -> ImageClassifier:
    return ImageClassifier(SmallCNN(1, example_outputs(name), width), num_classes=10)


def embed_example(name: str, seed: int, dm: DigitsDataModule, callbacks: list | None = None, **kwargs) -> tuple:
    scheme = example_scheme(name, seed=seed, key_path=kwargs.pop("key_path", None))
    L.seed_everything(seed)
    model = example_model(name)
    trainer = fast_trainer(registry.scheme(name).example_epochs, [scheme, *(callbacks or [])], **kwargs)
    trainer.fit(model, dm)
    return scheme, model.eval(), trainer


class Marked:
    """A scheme, the model it marked, its key file and every checkpoint written while and after training."""

    def __init__(self, name: str, root: Path, dm: DigitsDataModule) -> None:
        self.name = name
        self.root = root
        self.key_path = root / f"{name}.key"
        full = ModelCheckpoint(dirpath=root / "full", save_last=True, every_n_train_steps=10, save_top_k=-1)
        weights = ModelCheckpoint(dirpath=root / "weights", save_weights_only=True, save_last=True)
        self.scheme, self.model, trainer = embed_example(
            name, 1, dm, [full, weights], key_path=self.key_path, enable_checkpointing=True
        )
        trainer.save_checkpoint(root / "saved.ckpt")
        trainer.save_checkpoint(root / "saved_weights.ckpt", weights_only=True)
        self.model.eval()

    @property
    def key(self) -> WatermarkKey:
        return self.scheme.key

    def checkpoints(self) -> list[Path]:
        return sorted(self.root.rglob("*.ckpt"))


@pytest.fixture(scope="module")
def marked(tmp_path_factory, dm: DigitsDataModule) -> Callable[[str], Marked]:
    cache: dict[str, Marked] = {}

    def get(name: str) -> Marked:
        if name not in cache:
            cache[name] = Marked(name, tmp_path_factory.mktemp(name), dm)
        return cache[name]

    return get


class _ExitingLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher, whose workers leave through ``os._exit`` once ``fit`` has returned and rank 0's
    results are on the (synchronous) return queue.

    Why: under torch 2.14 / gloo a spawned rank now and then aborts in C++ static destructors at interpreter exit
    ("terminate called without an active exception", no Python frame), after its work is done; the parent then
    raises ``ProcessExitedException`` for a fit that succeeded. Skipping interpreter teardown in the worker avoids
    it; an exception in the worker still propagates as before.
    """

    def _wrapping_function(self, *args, **kwargs) -> None:
        super()._wrapping_function(*args, **kwargs)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class ExitingDDPSpawn(DDPStrategy):
    """``strategy="ddp_spawn"`` with :class:`_ExitingLauncher`: what the 2-process tests use."""

    def __init__(self, **kwargs) -> None:
        super().__init__(start_method="spawn", **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = _ExitingLauncher(self, start_method=self._start_method)


def pytest_configure(config) -> None:
    """Register the test-only plugin scheme (tests/toy_plugin.py) before collection, as an installed plugin
    package's entry point would: the conformance suite, ``verify`` and the benchmark then pick it up."""
    from toy_plugin import TOY

    from lightning_wm import registry

    registry.register_scheme(TOY)
