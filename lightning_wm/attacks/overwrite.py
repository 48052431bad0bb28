"""Overwriting removal attack: the attacker embeds their own watermark of the same scheme into the stolen model
(the ambiguity attack of Uchida et al.'s journal version and of the SoK toolbox's ``overwriting`` attack)."""

from __future__ import annotations

import copy
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim
from lightning_wm.mixin import WatermarkMixin
from lightning_wm.registry import AttackSpec
from lightning_wm.watermarks.base import WatermarkScheme

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


class OverwriteAttack(WatermarkMixin, RemovalAttack):
    """Fine-tune all layers of a copy of the victim on the attacker's data with the attacker's own watermark on.

    ``scheme`` is a :class:`~lightning_wm.watermarks.base.WatermarkScheme` configured with the attacker's key
    (its own ``key_path``/``seed``); the attack returns it from ``configure_callbacks``, so it makes its key at
    ``fit`` and acts through its usual hooks (batch injection for trigger sets) and, through
    :class:`~lightning_wm.mixin.WatermarkMixin`, adds its loss term. Only this scheme's term is added: another
    scheme callback on the Trainer does not change the objective. Afterwards both keys can be verified:
    ``owner_key.verify(attack)`` and ``attack.scheme.key.verify(attack)``.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        scheme: the attacker's watermark scheme (same scheme as the owner's, the attacker's key). ``None`` leaves
            it to :meth:`prepare`, which the benchmark calls with the owner's scheme: the attacker then
            embeds a copy of it under a fresh key.
        optimizer: optimizer factory.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        scheme: WatermarkScheme | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "scheme", "optimizer", "lr_scheduler"])
        self.model = copy_victim(victim)
        self.scheme: WatermarkScheme | None = None
        if scheme is not None:
            self.set_scheme(scheme)

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Learning rate and epochs of embedding the attacker's own watermark."""
        from optuna.distributions import FloatDistribution, IntDistribution

        return {"lr": FloatDistribution(1e-4, 1e-1, log=True), "epochs": IntDistribution(1, 10)}

    def prepare(self, scheme: WatermarkScheme) -> None:
        """Without a scheme of its own, the attacker embeds the owner's scheme under a fresh key of its own."""
        if self.scheme is not None:
            return
        attacker_scheme = copy.deepcopy(scheme)
        attacker_scheme.key_path = None
        attacker_scheme.seed = None if scheme.seed is None else scheme.seed + 7919
        attacker_scheme._key = None
        self.set_scheme(attacker_scheme)

    def set_scheme(self, scheme: WatermarkScheme) -> None:
        """Set the attacker's watermark scheme."""
        if not isinstance(scheme, WatermarkScheme):
            raise TypeError(f"scheme must be a WatermarkScheme, got {type(scheme).__name__}")
        self.scheme = scheme

    @property
    def watermark_schemes(self) -> list[WatermarkScheme]:
        """The attacker's scheme only (once the Trainer holds it)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        return [cb for cb in trainer.callbacks if cb is self.scheme]

    def configure_callbacks(self) -> list[Callback]:
        if self.scheme is None:
            raise ValueError("OverwriteAttack has no scheme: set scheme (the attacker's watermark) before fit")
        return [self.scheme]

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.supervised_step(batch[0], batch[1])


ATTACK = AttackSpec(
    name="overwrite",
    attack=OverwriteAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: OverwriteAttack(victim, optimizer=partial(torch.optim.Adam, lr=1e-3)),
)
"""The registry entry (entry point ``overwrite`` of ``lightning_wm.attacks``)."""
