"""Side training: the clean models trained beside the marked one, by a Lightning ``Trainer``.

Clean reference models (USP's detector negatives and calibration, CSP's calibration) are re-initialised copies of
the owner's backbone trained with cross-entropy on the owner's training data, and the benchmark's unmarked models
are copies of the owner's LightningModule trained like the marked one: all of them come from :func:`fit_copy`, so
nothing writes an optimizer loop of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_wm.models.reinit import clone_module, reinitialised_copy

_QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "accelerator": "cpu",
    "devices": 1,
}


class CleanModel(L.LightningModule):
    """A backbone trained with cross-entropy and Adam: the clean (unmarked) model of side training."""

    def __init__(self, backbone: nn.Module, lr: float = 2e-3) -> None:
        super().__init__()
        self.backbone = backbone
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A single-device CPU ``Trainer`` without logger, checkpoints, progress bar or summary (``kwargs`` override)."""
    return L.Trainer(**{**_QUIET, **kwargs})


def train_clean_models(
    template: nn.Module,
    datamodule: Any,
    count: int,
    epochs: int,
    seed: int,
    trainer_kwargs: dict[str, Any] | None = None,
    lr: float = 2e-3,
    on_epoch: Callable[[int, int, nn.Module], None] | None = None,
    batch_size: int | None = None,
) -> list[nn.Module]:
    """``count`` re-initialised copies of ``template`` trained ``epochs`` epochs on ``datamodule``'s training data.

    Copy ``i`` draws its weights and its data order from ``seed + i`` (torch's global generator is restored after),
    so the models are reproducible and independent of the caller's random state. ``on_epoch(i, epoch, model)`` is
    called before training (epoch 0, the untrained network) and after every epoch, in eval mode. The DataModule's
    loader is used, not the DataModule itself, so a DataModule attached to a running fit stays attached to it;
    ``batch_size`` replaces its batch size (a key made on rank 0 of a DDP fit trains at the fit's effective batch,
    ``batch_size × world_size``, so that the key does not depend on the number of processes).
    """
    models: list[nn.Module] = []
    hook = [_EpochHook(on_epoch)] if on_epoch is not None else []
    options = {**(trainer_kwargs or {}), "max_epochs": epochs}
    options["callbacks"] = [*options.get("callbacks", []), *hook]
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with torch.random.fork_rng(devices=[]):
            models += [
                _train_one(template, datamodule, seed + i, lr, options, hook, i, batch_size) for i in range(count)
            ]
    finally:
        log.setLevel(level)
    return models


def fit_copy(
    template: L.LightningModule,
    seed: int,
    trainer: L.Trainer,
    reinitialise: bool = True,
    **fit_kwargs: Any,
) -> L.LightningModule:
    """A copy of ``template`` (fresh weights drawn from ``seed``, or its own with ``reinitialise=False``) trained by
    ``trainer.fit(copy, **fit_kwargs)`` with ``seed`` set for the data order."""
    torch.manual_seed(seed)
    model = reinitialised_copy(template) if reinitialise else clone_module(template)
    L.seed_everything(seed % 2**32, verbose=False)
    trainer.fit(model, **fit_kwargs)
    return model


def _train_one(
    template: nn.Module,
    datamodule: Any,
    seed: int,
    lr: float,
    options: dict[str, Any],
    hook: list[_EpochHook],
    index: int,
    batch_size: int | None = None,
) -> nn.Module:
    if hook:
        hook[0].index = index
    loader = (
        datamodule.train_dataloader()
        if batch_size is None
        else DataLoader(datamodule.train_dataset, batch_size=batch_size, shuffle=True)
    )
    module = fit_copy(CleanModel(template, lr=lr), seed, quiet_trainer(**options), train_dataloaders=loader)
    return module.backbone.eval().requires_grad_(False)


class _EpochHook(L.Callback):
    def __init__(self, fn: Callable[[int, int, nn.Module], None]) -> None:
        self.fn = fn
        self.index = 0

    def _call(self, epoch: int, pl_module: L.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.fn(self.index, epoch, pl_module.backbone)
        pl_module.train(was_training)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._call(0, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._call(trainer.current_epoch + 1, pl_module)
