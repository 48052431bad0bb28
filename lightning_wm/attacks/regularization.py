"""The regularization attack (Shafieinejad et al., "On the Robustness of Backdoor-based Watermarking in Deep Neural
Networks", IH&MMSec 2021): strong L2 regularization drives the weights towards zero, wiping out the small details
a backdoor lives in, and plain fine-tuning then wins the task's accuracy back."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim
from lightning_wm.registry import AttackSpec

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


class RegularizationAttack(RemovalAttack):
    """Fine-tune a copy of the victim with weight decay ``weight_decay`` for ``reg_epochs`` epochs, then without
    it (the optimizer's own weight decay) for the rest of ``fit``'s epochs, on the attacker's data and true labels.

    One optimizer serves both phases: at the start of each training epoch every parameter group's
    ``weight_decay`` is set to ``weight_decay`` during the first ``reg_epochs`` epochs and back to its configured
    value afterwards, as the SoK toolbox does (L2 decay 0.1 for 5 epochs, then up to 50 epochs of recovery with
    early stopping, on CIFAR-10). Logs ``attack/weight_decay`` and ``attack/weight_norm`` (the L2 norm of all
    parameters) every epoch.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        weight_decay: the strong L2 coefficient of the regularization phase.
        reg_epochs: epochs of the regularization phase; the recovery phase is ``max_epochs - reg_epochs``.
        optimizer: optimizer factory (its own weight decay is the recovery phase's).
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        weight_decay: float = 0.1,
        reg_epochs: int = 5,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        if reg_epochs < 0:
            raise ValueError(f"reg_epochs must be non-negative, got {reg_epochs}")
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "optimizer", "lr_scheduler"])
        self.weight_decay = weight_decay
        self.reg_epochs = reg_epochs
        self.model = copy_victim(victim)
        self._recovery_decay: list[float] = []

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The L2 coefficient and the length of its phase, the total epochs and the learning rate."""
        from optuna.distributions import FloatDistribution, IntDistribution

        return {
            "weight_decay": FloatDistribution(1e-3, 1.0, log=True),
            "reg_epochs": IntDistribution(1, 5),
            "epochs": IntDistribution(2, 10),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    @property
    def regularizing(self) -> bool:
        """Whether the current epoch belongs to the regularization phase."""
        return self.current_epoch < self.reg_epochs

    @property
    def weight_norm(self) -> float:
        """The L2 norm of all the model's parameters."""
        return float(torch.sqrt(sum((p.detach() ** 2).sum() for p in self.model.parameters())))

    def configure_optimizers(self) -> Any:
        configured = super().configure_optimizers()
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        self._recovery_decay = [group.get("weight_decay", 0.0) for group in optimizer.param_groups]
        return configured

    def on_train_epoch_start(self) -> None:
        optimizers = self.optimizers()
        optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
        for group, recovery in zip(optimizer.param_groups, self._recovery_decay, strict=True):
            group["weight_decay"] = self.weight_decay if self.regularizing else recovery
        self.log("attack/weight_decay", float(optimizer.param_groups[0]["weight_decay"]))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.supervised_step(batch[0], batch[1])

    def _log_cost(self) -> None:
        super()._log_cost()
        self.log("attack/weight_norm", self.weight_norm, sync_dist=True, reduce_fx="max")


ATTACK = AttackSpec(
    name="regularization",
    attack=RegularizationAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: RegularizationAttack(
        victim, weight_decay=0.1, reg_epochs=1, optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    ),
    example_epochs=2,
)
"""The registry entry (entry point ``regularization`` of ``lightning_wm.attacks``)."""
