"""Weight shifting (Lukas et al., "SoK: How Robust is Image Classification Deep Neural Network Watermarking?",
S&P 2022): a removal attack the SoK proposes, which moves every filter away from where the owner left it before
fine-tuning, so that fine-tuning settles in another basin than the marked one."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_wm.attacks.base import Victim
from lightning_wm.attacks.fine_tune import FineTuneAttack, LabelSource
from lightning_wm.registry import AttackSpec

ShiftedLayers = Literal["conv", "all"]

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def shifted_modules(model: nn.Module, layers: ShiftedLayers = "conv") -> list[tuple[str, nn.Module]]:
    """The modules whose weights weight shifting moves: every conv layer, and with ``layers="all"`` every linear
    layer too."""
    kinds: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if layers == "all":
        kinds += (nn.Linear,)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


class WeightShiftingAttack(FineTuneAttack):
    """Shift the conv weights of a copy of the victim, then fine-tune all of it (FTAL) on the attacker's data.

    Each weight tensor ``W`` (output channels first) becomes ``W - shift · mean_0(W) - noise · std(W) · ε`` with
    ``ε ~ N(0, 1)``: the mean filter of the layer is pushed ``shift`` times its own size the other way (the
    default 1.5 leaves it at minus half of itself) and every weight receives Gaussian noise of ``noise`` times the
    layer's standard deviation, the SoK toolbox's ``lmbda`` and ``lmbda2`` (1.5 and 1.0, 10 epochs on CIFAR-10).
    The shift happens when the attack is built, from torch's global generator (seeded by ``seed_everything``);
    ``trainer.fit`` then fine-tunes, so the accuracy lost by the shift is what fine-tuning has to win back.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        shift: multiple of the mean filter subtracted from each filter.
        noise: standard deviation of the added noise, in units of the layer's weight standard deviation.
        layers: ``conv`` (the SoK's choice) or ``all`` (linear layers too).
        labels: ``true`` (the data's labels) or ``victim`` (the victim's top-1 labels, counted as queries).
        optimizer: optimizer factory of the fine-tuning.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        shift: float = 1.5,
        noise: float = 1.0,
        layers: ShiftedLayers = "conv",
        labels: LabelSource = "true",
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if noise < 0:
            raise ValueError(f"noise must be non-negative, got {noise}")
        if layers not in ("conv", "all"):
            raise ValueError(f"layers must be 'conv' or 'all', got {layers!r}")
        super().__init__(victim, mode="FTAL", labels=labels, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "optimizer", "lr_scheduler"])
        self.shift = shift
        self.noise = noise
        self.layers = layers
        self._shift_weights()

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Shift and noise strengths, then 1 to 10 epochs of fine-tuning at a tuned learning rate."""
        from optuna.distributions import FloatDistribution, IntDistribution

        return {
            "shift": FloatDistribution(0.0, 3.0),
            "noise": FloatDistribution(0.0, 2.0),
            "epochs": IntDistribution(1, 10),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    @torch.no_grad()
    def _shift_weights(self) -> None:
        for _, module in shifted_modules(self.model, self.layers):
            weight = module.weight
            weight -= self.shift * weight.mean(0) + self.noise * weight.std() * torch.randn_like(weight)


ATTACK = AttackSpec(
    name="weight_shifting",
    attack=WeightShiftingAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: WeightShiftingAttack(victim, optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9)),
)
"""The registry entry (entry point ``weight_shifting`` of ``lightning_wm.attacks``)."""
