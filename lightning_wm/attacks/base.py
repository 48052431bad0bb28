"""``RemovalAttack``: the LightningModule every removal attack derives from.

Shared pieces: loading the victim (a ``lightning-wm fit`` checkpoint or a module), holding a black-box victim
outside the attack's parameters and checkpoints, the attacked model's accuracy and the attack's cost
(``attack/epochs``, ``attack/queries``, ``attack/wall_time``), logged the Lightning way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_wm.classifier import ClassifierSteps, load_classifier
from lightning_wm.models.hidden import HiddenModule
from lightning_wm.models.reinit import clone_module
from lightning_wm.verify.blackbox import BlackBoxModel

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

Victim = str | nn.Module


def load_victim(victim: Victim | Path) -> nn.Module:
    """The victim's network: from a checkpoint path (via :func:`~lightning_wm.load_classifier`), an
    ``ImageClassifier`` (its ``backbone``), an attack (its attacked ``model``, to chain attacks) or a plain module.

    Raises:
        FileNotFoundError / ValueError: a one-line message when the checkpoint does not load.
    """
    if isinstance(victim, (str, Path)):
        victim = load_classifier(victim)
    if isinstance(victim, RemovalAttack):
        return victim.model
    backbone = getattr(victim, "backbone", None)
    if isinstance(victim, L.LightningModule) and isinstance(backbone, nn.Module):
        return backbone
    if not isinstance(victim, nn.Module):
        raise TypeError(f"victim must be a checkpoint path or an nn.Module, got {type(victim).__name__}")
    return victim


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` (in registration order): the "last layer" of Adi et al.'s attacks."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to treat as its last layer")
    return linears[-1]


class RemovalAttack(ClassifierSteps):
    """A removal attack on a victim model, run by ``trainer.fit(attack, datamodule)``.

    ``attack.model`` is the attacked network and ``attack(x)`` its logits, so any key verifies the attack or
    its model. Validation and test log ``val/acc`` and ``test/acc`` of the attacked model; every evaluation and
    training epoch logs the cost: ``attack/epochs`` (training epochs run), ``attack/queries`` (queries to the
    black-box victim, summed over DDP ranks) and ``attack/wall_time`` (seconds of ``fit``). Checkpoints hold the
    attacked model only.

    Args:
        optimizer: optimizer factory, set from the CLI the LightningCLI way (``--model.init_args.optimizer``).
        lr_scheduler: optional scheduler factory.
    """

    def __init__(self, optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.val_accuracy = MeanMetric()
        self.test_accuracy = MeanMetric()
        self.epochs = 0
        self.wall_time = 0.0
        self._api: BlackBoxModel | None = None
        self._fit_started: float | None = None

    model: nn.Module

    exposes_weights: bool = True
    """Whether the attacked model is handed over as weights; False for an attack that serves it behind an API, so
    a white-box key raises :class:`~lightning_wm.verify.NotApplicable` on it."""

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The attacker's knobs, as Optuna distributions, that ``lightning-wm benchmark --search`` tunes to find the
        strongest setting of this attack (the SoK's adaptive attacker, Lukas et al., S&P 2022). Names are
        constructor arguments, except ``lr`` and ``optimizer`` (the optimizer factory) and ``epochs`` (training
        epochs): see :func:`lightning_wm.benchmark.search.attack_from_params`. Empty: nothing to tune."""
        return {}

    def prepare(self, scheme: Any) -> None:
        """Called by the benchmark with the owner's scheme before ``fit``: an attack that needs to know the scheme
        (overwriting embeds one of its own) sets itself up here; by default nothing."""

    @property
    def queries(self) -> int:
        """Queries sent to the black-box victim by this process so far."""
        return 0 if self._api is None else self._api.queries

    def black_box(self, victim: Victim, output: str = "probs", temperature: float = 1.0) -> BlackBoxModel:
        """Hold (a copy of) ``victim`` as a query-only API, hidden from parameters and checkpoints, that counts
        its queries."""
        self._victim = HiddenModule(copy_victim(victim))
        self._api = BlackBoxModel(self._victim.module, output=output, temperature=temperature)  # type: ignore[arg-type]
        return self._api

    def query(self, x: Tensor) -> Tensor:
        """The black-box victim's answers (probabilities or labels) on ``x``, on ``x``'s device."""
        if self._api is None:
            raise RuntimeError(f"{type(self).__name__} has no black-box victim")
        return self._api(x).to(x.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def supervised_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Cross-entropy of the attacked model on ``(x, y)``, logged as ``train/loss``: the training step of the
        attacks that train on labels (fine-tuning, pruning with fine-tuning, overwriting)."""
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "logits": logits}

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter() - self.wall_time

    def on_fit_end(self) -> None:
        self._update_wall_time()
        self._fit_started = None

    def on_train_epoch_end(self) -> None:
        self.epochs += 1
        self._log_cost()

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_cost()

    def on_test_epoch_end(self) -> None:
        self._log_cost()

    def _update_wall_time(self) -> None:
        if self._fit_started is not None:
            self.wall_time = time.perf_counter() - self._fit_started

    def _log_cost(self) -> None:
        self._update_wall_time()
        self.log("attack/epochs", float(self.epochs), sync_dist=True, reduce_fx="max")
        self.log("attack/queries", float(self.queries), sync_dist=True, reduce_fx="sum")
        self.log("attack/wall_time", self.wall_time, sync_dist=True, reduce_fx="max")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["attack_cost"] = {"epochs": self.epochs, "queries": self.queries, "wall_time": self.wall_time}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cost = checkpoint.get("attack_cost", {})
        self.epochs = int(cost.get("epochs", 0))
        self.wall_time = float(cost.get("wall_time", 0.0))
        if self._api is not None:
            self._api.queries = int(cost.get("queries", 0))


def copy_victim(victim: Victim) -> nn.Module:
    """A private, trainable copy of the victim's network (the caller's module is never modified)."""
    model = clone_module(load_victim(victim))
    return model.train().requires_grad_(True)
