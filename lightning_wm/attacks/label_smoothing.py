"""Fine-tuning on softened or corrupted labels, two model-modification attacks of the SoK (Lukas et al., "SoK:
How Robust is Image Classification Deep Neural Network Watermarking?", S&P 2022): label smoothing (Szegedy et al.,
CVPR 2016) and label noise pull the model's confident answers, the trigger set's among them, towards other
classes while the task's accuracy barely moves."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_wm.attacks.base import Victim
from lightning_wm.attacks.fine_tune import FineTuneAttack, LabelSource
from lightning_wm.registry import AttackSpec

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def noisy_labels(y: Tensor, rate: float, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """``y`` with ``round(rate · len(y))`` of its entries, chosen at random, replaced by labels drawn uniformly
    from ``num_classes`` (a drawn label may equal the one it replaces)."""
    replaced = torch.randperm(len(y), generator=generator)[: round(rate * len(y))].to(y.device)
    noisy = y.clone()
    noisy[replaced] = torch.randint(num_classes, (len(replaced),), generator=generator).to(y.device)
    return noisy


class LabelSmoothingAttack(FineTuneAttack):
    """Fine-tune all layers (FTAL) of a copy of the victim with smoothed and/or noisy labels.

    Each batch's labels (the data's or the victim's) first have the share ``label_noise`` replaced by random ones
    (:func:`noisy_labels`), then the loss is ``F.cross_entropy(logits, y, label_smoothing=label_smoothing)``:
    the target is ``(1 - ε)`` on the label and ``ε / C`` on each of the ``C`` outputs. The SoK toolbox's label
    smoothing uses ε = 0.3 for 5 epochs on CIFAR-10.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        label_smoothing: ε of ``F.cross_entropy``, in [0, 1].
        label_noise: share of each batch's labels replaced by random ones, in [0, 1].
        num_classes: classes random labels are drawn from (None: every output of the model).
        labels: ``true`` (the data's labels) or ``victim`` (the victim's top-1 labels, counted as queries).
        optimizer: optimizer factory of the fine-tuning.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        label_smoothing: float = 0.3,
        label_noise: float = 0.0,
        num_classes: int | None = None,
        labels: LabelSource = "true",
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        for name, value in (("label_smoothing", label_smoothing), ("label_noise", label_noise)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        super().__init__(victim, mode="FTAL", labels=labels, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "optimizer", "lr_scheduler"])
        self.label_smoothing = label_smoothing
        self.label_noise = label_noise
        self.num_classes = num_classes

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Smoothing ε, then 1 to 10 epochs at a tuned learning rate."""
        from optuna.distributions import FloatDistribution, IntDistribution

        return {
            "label_smoothing": FloatDistribution(0.0, 0.9),
            "epochs": IntDistribution(1, 10),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    def targets(self, y: Tensor, outputs: int) -> Tensor:
        """The labels trained on for a batch labelled ``y`` (``outputs``: the model's output count)."""
        if not self.label_noise:
            return y
        return noisy_labels(y, self.label_noise, self.num_classes or outputs)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        if self.labels == "victim":
            y = self.query(x)
        logits = self(x)
        loss = F.cross_entropy(logits, self.targets(y, logits.shape[-1]), label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "logits": logits}


class LabelNoiseAttack(LabelSmoothingAttack):
    """:class:`LabelSmoothingAttack` with label noise and no smoothing by default: fine-tuning where the share
    ``label_noise`` of each batch's labels is random (the SoK's label noising, as hard labels).

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        label_noise: share of each batch's labels replaced by random ones, in [0, 1].
        label_smoothing: ε of ``F.cross_entropy``, in [0, 1].
        num_classes: classes random labels are drawn from (None: every output of the model).
        labels: ``true`` or ``victim``.
        optimizer: optimizer factory of the fine-tuning.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        label_noise: float = 0.3,
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
        labels: LabelSource = "true",
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(victim, label_smoothing, label_noise, num_classes, labels, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "optimizer", "lr_scheduler"])

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Share of random labels, then 1 to 10 epochs at a tuned learning rate."""
        from optuna.distributions import FloatDistribution, IntDistribution

        return {
            "label_noise": FloatDistribution(0.0, 0.9),
            "epochs": IntDistribution(1, 10),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }


_SGD = partial(torch.optim.SGD, lr=0.01, momentum=0.9)

LABEL_SMOOTHING = AttackSpec(
    name="label_smoothing",
    attack=LabelSmoothingAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: LabelSmoothingAttack(victim, label_smoothing=0.3, optimizer=_SGD),
)
"""The registry entry (entry point ``label_smoothing`` of ``lightning_wm.attacks``)."""

LABEL_NOISE = AttackSpec(
    name="label_noise",
    attack=LabelNoiseAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: LabelNoiseAttack(victim, label_noise=0.3, optimizer=_SGD),
)
"""The registry entry (entry point ``label_noise`` of ``lightning_wm.attacks``)."""
