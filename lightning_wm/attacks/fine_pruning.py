"""Fine-pruning (Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks", RAID
2018), a model-modification attack of the SoK (Lukas et al., S&P 2022): a backdoor, a trigger-set watermark among
them, tends to live in neurons that clean inputs leave dormant, so pruning the last conv layer's least active
channels on clean data, then fine-tuning, removes it at little cost in accuracy."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim
from lightning_wm.registry import AttackSpec

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def last_conv(model: nn.Module) -> str:
    """The name of the last conv layer of ``model`` (in registration order)."""
    names = [name for name, m in model.named_modules() if isinstance(m, _CONV)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no conv layer to fine-prune")
    return names[-1]


class FinePruningAttack(RemovalAttack):
    """Prune the ``rate`` least active channels of a copy of the victim's last conv layer, then fine-tune it.

    A channel's activation is its mean over clean inputs (the attacker's training split, or ``activation_batches``
    of its batches) and positions, after the batch norm that directly follows the layer, if any, and a ReLU: the
    output Liu et al. rank. The pruned channels' weights and biases are zeroed with
    ``torch.nn.utils.prune.custom_from_mask`` in ``setup`` of ``fit`` (or by :meth:`apply`), so they stay zero
    while all layers are fine-tuned on the true labels; when ``fit`` ends, and in every checkpoint, the pruning is
    made permanent. ``fit`` with ``max_epochs=0`` prunes only; ``validate`` or ``test`` of an attack not yet pruned
    prunes on the training split of the datamodule it is given (the benchmark's owner's, without ``fit``). The SoK
    toolbox prunes 96% of CIFAR-10 ResNet's last block and fine-tunes 10 epochs. Logs ``attack/pruned_channels``.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        rate: share of the layer's channels pruned, in [0, 1).
        layer: name of the conv layer to prune (None: the last one).
        activation_batches: training batches the activations are measured on (None: the whole split).
        optimizer: optimizer factory of the fine-tuning.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        rate: float = 0.9,
        layer: str | None = None,
        activation_batches: int | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "optimizer", "lr_scheduler"])
        self.rate = rate
        self.model = copy_victim(victim)
        self.layer = layer or last_conv(self.model)
        if not isinstance(self.conv, _CONV):
            raise ValueError(f"{self.layer!r} is not a conv layer of {type(self.model).__name__}")
        self.activation_batches = activation_batches
        self.pruned: list[int] = []

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Share of channels pruned, then 0 (pruning alone) to 10 epochs of fine-tuning at a tuned learning rate."""
        from optuna.distributions import FloatDistribution, IntDistribution

        return {
            "rate": FloatDistribution(0.1, 0.99),
            "epochs": IntDistribution(0, 10),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    @property
    def conv(self) -> nn.Module:
        """The pruned conv layer."""
        return self.model.get_submodule(self.layer)

    def _measured(self) -> nn.Module:
        modules = list(self.model.named_modules())
        index = next(i for i, (name, _) in enumerate(modules) if name == self.layer)
        following = modules[index + 1][1] if index + 1 < len(modules) else None
        if isinstance(following, _NORM) and following.num_features == self.conv.out_channels:
            return following
        return self.conv

    @torch.no_grad()
    def channel_activations(self, batches: Iterable[Any]) -> Tensor:
        """Each channel's mean activation (after the following batch norm and a ReLU) over ``batches``."""
        totals: list[Tensor] = []

        def record(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            totals.append(F.relu(output).transpose(0, 1).flatten(1).mean(1))

        was_training = self.model.training
        self.model.eval()
        handle = self._measured().register_forward_hook(record)
        try:
            for i, batch in enumerate(batches):
                if self.activation_batches is not None and i >= self.activation_batches:
                    break
                self.model(batch[0].to(self.device))
        finally:
            handle.remove()
            self.model.train(was_training)
        if not totals:
            raise ValueError("fine-pruning needs at least one batch of clean data to rank the channels")
        return torch.stack(totals).mean(0)

    def apply(self, batches: Iterable[Any]) -> FinePruningAttack:
        """Prune the least active channels on ``batches`` now (once; later calls do nothing)."""
        if self.pruned:
            return self
        activations = self.channel_activations(batches)
        count = int(self.rate * len(activations))
        self.pruned = sorted(activations.argsort()[:count].tolist())
        keep = torch.ones(len(activations), device=activations.device)
        keep[self.pruned] = 0.0
        conv = self.conv
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        prune.custom_from_mask(conv, "weight", keep.view(shape).expand_as(conv.weight).to(conv.weight))
        if conv.bias is not None:
            prune.custom_from_mask(conv, "bias", keep.to(conv.bias))
        return self

    def make_permanent(self) -> None:
        """Fold the pruning masks into the weights (``prune.remove``)."""
        for name in ("weight", "bias"):
            if hasattr(self.conv, f"{name}_orig"):
                prune.remove(self.conv, name)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if not self.pruned and datamodule is not None:
            if stage != "fit":
                datamodule.setup("fit")
            self.apply(datamodule.train_dataloader())
        if stage != "fit":
            self.make_permanent()

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self.make_permanent()

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.supervised_step(batch[0], batch[1])

    def _log_cost(self) -> None:
        super()._log_cost()
        self.log("attack/pruned_channels", float(len(self.pruned)), sync_dist=True, reduce_fx="max")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for name in ("weight", "bias"):
            prefix = f"model.{self.layer}.{name}"
            if f"{prefix}_orig" in state:
                state[prefix] = state.pop(f"{prefix}_orig") * state.pop(f"{prefix}_mask")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for name in ("weight", "bias"):
            prefix = f"model.{self.layer}.{name}"
            if hasattr(self.conv, f"{name}_orig") and prefix in state:
                value = state.pop(prefix)
                state[f"{prefix}_orig"] = value
                state[f"{prefix}_mask"] = getattr(self.conv, f"{name}_mask").clone()


ATTACK = AttackSpec(
    name="fine_pruning",
    attack=FinePruningAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: FinePruningAttack(
        victim, rate=0.5, activation_batches=2, optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    ),
)
"""The registry entry (entry point ``fine_pruning`` of ``lightning_wm.attacks``)."""
