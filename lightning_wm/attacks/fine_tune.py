"""Fine-tuning removal attacks FTLL, FTAL, RTLL, RTAL (Adi et al., "Turning Your Weakness Into a Strength",
USENIX Security 2018; settings in papers.md §6.1)."""

from __future__ import annotations

import copy
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim, last_linear
from lightning_wm.registry import AttackSpec

FineTuneMode = Literal["FTLL", "FTAL", "RTLL", "RTAL"]
LabelSource = Literal["true", "victim"]

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


class FineTuneAttack(RemovalAttack):
    """Fine-tune a copy of the victim on the attacker's data.

    The four variants of Adi et al.: FTLL trains the last layer only, FTAL all layers; RTLL and RTAL first
    re-initialise the last layer (the backbone's last ``nn.Linear``), then train it alone or with all layers.
    In the ``*LL`` modes the rest of the network is frozen, batch-norm statistics included (it stays in eval
    mode). Labels are the true ones or the victim's top-1 predictions (the SoK toolbox uses true labels for
    FTLL/FTAL and the victim's for RTLL/RTAL); victim labels are counted as queries.

    Adi et al. verify an RT* model with the original last layer swapped back in (the owner's key includes it):
    use ``key.verify(attack.model_with_original_head())``.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        mode: ``FTLL``, ``FTAL``, ``RTLL`` or ``RTAL``.
        labels: ``true`` (the data's labels) or ``victim`` (the victim's predicted labels).
        optimizer: optimizer factory; Adi et al. use SGD, momentum 0.9, weight decay 5e-4, lr 0.001-0.01.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        mode: FineTuneMode = "FTAL",
        labels: LabelSource = "true",
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if mode not in ("FTLL", "FTAL", "RTLL", "RTAL"):
            raise ValueError(f"mode must be FTLL, FTAL, RTLL or RTAL, got {mode!r}")
        if labels not in ("true", "victim"):
            raise ValueError(f"labels must be 'true' or 'victim', got {labels!r}")
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "optimizer", "lr_scheduler"])
        self.mode = mode
        self.labels = labels
        self.model = copy_victim(victim)
        head = last_linear(self.model)
        self._original_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
        if mode.startswith("RT"):
            head.reset_parameters()
        if mode.endswith("LL"):
            self.model.requires_grad_(False)
            head.requires_grad_(True)
        if labels == "victim":
            self.black_box(victim, output="labels")

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Learning rate, optimizer, epochs and which of Adi et al.'s four variants."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        return {
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
            "optimizer": CategoricalDistribution(["adam", "sgd"]),
            "epochs": IntDistribution(1, 10),
            "mode": CategoricalDistribution(["FTLL", "FTAL", "RTLL", "RTAL"]),
        }

    def model_with_original_head(self) -> nn.Module:
        """A copy of the attacked model with the victim's original last layer restored (Adi et al.'s RT* check)."""
        model = copy.deepcopy(self.model)
        last_linear(model).load_state_dict(self._original_head)
        return model

    def on_train_epoch_start(self) -> None:
        if self.mode.endswith("LL"):
            self.model.eval()
            last_linear(self.model).train()

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        if self.labels == "victim":
            y = self.query(x)
        return self.supervised_step(x, y)


ATTACK = AttackSpec(
    name="fine_tune",
    attack=FineTuneAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: FineTuneAttack(victim, mode="FTAL", optimizer=partial(torch.optim.SGD, lr=0.01)),
)
"""The registry entry (entry point ``fine_tune`` of ``lightning_wm.attacks``)."""
