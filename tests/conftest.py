"""Shared fixtures: fast Trainers on the bundled digits data; nothing touches the network."""

from __future__ import annotations

import os

import lightning as L
import pytest

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


@pytest.fixture(scope="module")
def dm():
    """One digits DataModule per test module (its split is seeded, so sharing it changes nothing)."""
    from lightning_wm.data import DigitsDataModule

    return DigitsDataModule(batch_size=64)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny digits models run fastest on one thread, and the CPU is shared: ``pytestmark = usefixtures(...)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
