"""Transfer-learning removal attack: a new head, trained alone, then the whole network fine-tuned (the SoK's
"transfer learning" of model modification, Lukas et al., S&P 2022; the two-stage recipe of Yosinski et al.,
NeurIPS 2014, as Adi et al. 2018 and Uchida et al. 2017 use it to test robustness)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim, last_linear
from lightning_wm.registry import AttackSpec

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def replace_last_linear(model: nn.Module, outputs: int | None = None) -> nn.Linear:
    """Put a freshly initialised ``nn.Linear`` (``outputs`` classes, the old number when None) in place of the last
    linear layer of ``model`` (:func:`~lightning_wm.attacks.base.last_linear`) and return it."""
    old = last_linear(model)
    new = nn.Linear(old.in_features, outputs or old.out_features, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    for module in model.modules():
        for name, child in module.named_children():
            if child is old:
                setattr(module, name, new)
    return new


class TransferLearningAttack(RemovalAttack):
    """Replace the victim's last layer by a new one, train it alone for ``head_epochs``, then fine-tune every layer.

    The new head is a new module (no weight of the victim's head survives), so a mark carried by the head is
    gone, and a mark in the body has to survive the second stage's fine-tuning. During the head stage the body is
    frozen, batch-norm statistics included; every later epoch trains all layers on the attacker's true labels. One
    optimizer over all parameters serves both stages (the frozen ones get no gradient in the first). The task's
    classes are the victim's here (``outputs`` None); another number models transfer to a new task, which the
    owner can then only verify in white-box. On digits (SmallCNN width 32, 1 + 4 epochs) it costs under a point and
    leaves both Uchida's bits (BER 0) and a content trigger set (key accuracy 0.97): the body carries them.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        head_epochs: epochs that train the new head alone before all layers are fine-tuned.
        outputs: classes of the new head; the victim's when None.
        optimizer: optimizer factory (the configs use SGD, lr 0.01, momentum 0.9, as Adi et al.'s fine-tuning).
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        head_epochs: int = 1,
        outputs: int | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if head_epochs < 0:
            raise ValueError(f"head_epochs must be non-negative, got {head_epochs}")
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "optimizer", "lr_scheduler"])
        self.head_epochs = head_epochs
        self.model = copy_victim(victim)
        replace_last_linear(self.model, outputs)

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Learning rate, optimizer, head-only epochs and total epochs."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        return {
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
            "optimizer": CategoricalDistribution(["adam", "sgd"]),
            "head_epochs": IntDistribution(0, 5),
            "epochs": IntDistribution(1, 10),
        }

    @property
    def training_head_only(self) -> bool:
        """Whether the current epoch is one of the head stage."""
        return self.current_epoch < self.head_epochs

    def on_train_epoch_start(self) -> None:
        head_only = self.training_head_only
        self.model.requires_grad_(not head_only)
        last_linear(self.model).requires_grad_(True)
        if head_only:
            self.model.eval()
            last_linear(self.model).train()
        else:
            self.model.train()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.supervised_step(batch[0], batch[1])


ATTACK = AttackSpec(
    name="transfer",
    attack=TransferLearningAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: TransferLearningAttack(
        victim, head_epochs=1, optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    ),
    example_epochs=2,
)
"""The registry entry (entry point ``transfer`` of ``lightning_wm.attacks``)."""
