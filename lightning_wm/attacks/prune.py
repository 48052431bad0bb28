"""Magnitude-pruning removal attack, optionally followed by fine-tuning (Han et al. 2015 as used by Uchida et al.
2017; layer-wise as in the SoK toolbox, global as ``torch.nn.utils.prune.global_unstructured``; papers.md §6.2)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim
from lightning_wm.registry import AttackSpec
from lightning_wm.verify.keys import WatermarkKey

PruneScope = Literal["layer", "global"]
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


class PruneAttack(RemovalAttack):
    """Zero the smallest-magnitude weights of a copy of the victim, then (optionally) fine-tune it.

    Every conv and linear weight is pruned (biases and batch norm are not, as in the SoK toolbox), either the
    fraction ``rate`` of each layer (``scope="layer"``) or the fraction ``rate`` of all those weights together
    (``scope="global"``), with ``torch.nn.utils.prune``'s L1 criterion. Pruning happens in ``setup``, so
    ``trainer.fit`` with ``max_epochs=0``, ``trainer.validate`` or ``trainer.test`` evaluates the pruned model;
    with epochs, the pruned weights stay zero while the rest is fine-tuned on the true labels. When ``fit`` ends
    (and in every checkpoint) the pruning is made permanent: plain weights with zeros, no masks. Logs
    ``attack/sparsity``.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        rate: share of weights set to zero, in [0, 1].
        scope: ``layer`` (per tensor) or ``global`` (one threshold over all prunable weights).
        optimizer: optimizer factory of the fine-tuning.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        rate: float = 0.5,
        scope: PruneScope = "layer",
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "optimizer", "lr_scheduler"])
        self.rate = rate
        self.scope = scope
        self.model = copy_victim(victim)
        self._applied = False

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Pruning rate and scope, then 0 (pruning alone) to 5 epochs of fine-tuning at a tuned learning rate."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        return {
            "rate": FloatDistribution(0.1, 0.95),
            "scope": CategoricalDistribution(["layer", "global"]),
            "epochs": IntDistribution(0, 5),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    def _prunable(self) -> list[tuple[str, nn.Module]]:
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, _PRUNABLE)]

    def apply(self) -> PruneAttack:
        """Prune the model now (once; later calls do nothing). ``setup`` calls it."""
        if self._applied:
            return self
        targets = [(m, "weight") for _, m in self._prunable()]
        if self.scope == "global":
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=self.rate)
        else:
            for module, name in targets:
                prune.l1_unstructured(module, name, amount=self.rate)
        self._applied = True
        return self

    def make_permanent(self) -> None:
        """Fold the pruning masks into the weights (``prune.remove``)."""
        for _, module in self._prunable():
            if prune.is_pruned(module) and hasattr(module, "weight_orig"):
                prune.remove(module, "weight")

    @property
    def sparsity(self) -> float:
        """Share of zero weights among the prunable weights."""
        weights = [m.weight for _, m in self._prunable()]
        zeros = sum(int((w == 0).sum()) for w in weights)
        return zeros / max(1, sum(w.numel() for w in weights))

    def setup(self, stage: str) -> None:
        self.apply()
        if stage != "fit":
            self.make_permanent()

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self.make_permanent()

    def _log_cost(self) -> None:
        super()._log_cost()
        self.log("attack/sparsity", self.sparsity, sync_dist=True)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.supervised_step(batch[0], batch[1])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for name, _ in self._prunable():
            prefix = f"model.{name}." if name else "model."
            if f"{prefix}weight_orig" in state:
                mask = state.pop(f"{prefix}weight_mask")
                state[f"{prefix}weight"] = state.pop(f"{prefix}weight_orig") * mask

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for name, module in self._prunable():
            prefix = f"model.{name}." if name else "model."
            if hasattr(module, "weight_orig") and f"{prefix}weight" in state:
                weight = state.pop(f"{prefix}weight")
                state[f"{prefix}weight_orig"] = weight
                state[f"{prefix}weight_mask"] = (weight != 0).to(weight.dtype)


def prune_sweep(
    victim: Victim,
    rates: Iterable[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    key: WatermarkKey | None = None,
    *,
    datamodule: L.LightningDataModule,
    scope: PruneScope = "global",
    alpha: float = 0.01,
    trainer_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Prune the victim at each rate (no fine-tuning) and report test accuracy and, given a key, the verdict.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        rates: the pruning rates.
        key: the owner's key; its verdict is computed on each pruned model.
        datamodule: its test split gives the accuracy.
        scope: ``global`` or ``layer``.
        alpha: significance level of the verdicts.
        trainer_kwargs: options of the test ``Trainer`` (accelerator, devices...).

    Returns:
        One dict per rate: ``rate``, ``sparsity``, ``test_acc`` and, with a ``key``, ``statistic``, ``p_value``
        and ``is_watermarked``.
    """
    options: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    options.update(trainer_kwargs or {})
    rows = []
    for rate in rates:
        attack = PruneAttack(victim, rate=rate, scope=scope)
        (metrics,) = L.Trainer(**options).test(attack, datamodule=datamodule, verbose=False)
        row: dict[str, Any] = {"rate": rate, "sparsity": attack.sparsity, "test_acc": metrics["test/acc"]}
        if key is not None:
            verdict = key.verify(attack.eval(), alpha=alpha)
            row.update(statistic=verdict.statistic, p_value=verdict.p_value, is_watermarked=verdict.is_watermarked)
        rows.append(row)
    return rows


ATTACK = AttackSpec(
    name="prune",
    attack=PruneAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: PruneAttack(victim, rate=0.5, scope="global", optimizer=partial(torch.optim.SGD, lr=0.01)),
)
"""The registry entry (entry point ``prune`` of ``lightning_wm.attacks``)."""
