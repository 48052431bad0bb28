"""Smooth retraining (model-extraction) removal attack: retraining on the labels of the victim under randomized
smoothing (the SoK's "smooth retraining", Lukas et al., S&P 2022; the smoothed classifier of Cohen et al.,
"Certified Adversarial Robustness via Randomized Smoothing", ICML 2019).

Each attacker image is labelled by the majority vote of the victim on ``samples`` copies under Gaussian noise of
``sigma`` (pixels in ``[0, 1]``). The smoothed victim keeps the task's decision regions but not the brittle ones a
trigger or an adversarial key sample lives in, so its labels carry less of the watermark than plain retraining's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_wm.attacks.base import Victim
from lightning_wm.attacks.distillation import _output_size
from lightning_wm.attacks.input_transform import statistics
from lightning_wm.attacks.retraining import RetrainingAttack
from lightning_wm.registry import AttackSpec

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def smoothed_labels(votes: Tensor, num_classes: int) -> Tensor:
    """The majority label of each row of ``votes`` (``(n, samples)`` labels); ties go to the smaller class."""
    counts = torch.zeros(len(votes), num_classes, dtype=torch.long, device=votes.device)
    counts.scatter_add_(1, votes.long(), torch.ones_like(votes, dtype=torch.long))
    return counts.argmax(dim=-1)


class SmoothRetrainingAttack(RetrainingAttack):
    """Retrain a student on the labels of the victim smoothed by Gaussian input noise.

    A new image costs ``samples`` queries (one per noisy copy; ``attack.queries`` counts them) and is labelled once
    (cached, see :class:`~lightning_wm.attacks.retraining.LabelCache`). The noise is drawn in pixel space: the
    model inputs are mapped to pixels with the data's ``std`` (given, or read from the Trainer's
    :class:`~lightning_wm.data.base.SplitDataModule` at ``setup``; without either, ``sigma`` is in input units).

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        sigma: standard deviation of the noise, in pixels of ``[0, 1]``.
        samples: noisy copies per image (the votes of the smoothed label).
        student: the network to train; None: the victim's architecture, re-initialised.
        soft_weight: weight of the smoothed-label term against the true labels.
        query_budget: the most queries (``samples`` per image); None: no limit.
        std: per-channel standard deviation of the training images in ``[0, 1]``.
        optimizer: optimizer factory.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        sigma: float = 0.25,
        samples: int = 8,
        student: nn.Module | None = None,
        soft_weight: float = 1.0,
        query_budget: int | None = None,
        std: Sequence[float] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if sigma < 0:
            raise ValueError(f"sigma must be non-negative, got {sigma}")
        if samples < 1:
            raise ValueError(f"samples must be positive, got {samples}")
        super().__init__(victim, student, soft_weight, query_budget, optimizer, lr_scheduler)
        self.sigma = sigma
        self.samples = samples
        self.cost_per_input = samples
        self.num_classes = _output_size(self._victim.module)
        self.pixel_std = None if std is None else torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The noise level and the number of votes, with retraining's epochs and learning rate."""
        from optuna.distributions import FloatDistribution, IntDistribution

        return {
            **RetrainingAttack.search_space(),
            "sigma": FloatDistribution(0.05, 1.0),
            "samples": IntDistribution(1, 32),
        }

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None)
        if self.pixel_std is None and hasattr(datamodule, "denormalize"):
            self.pixel_std = torch.as_tensor(statistics(datamodule)["std"], dtype=torch.float32).view(-1, 1, 1)

    def answer_new(self, x: Tensor) -> Tensor:
        std = 1.0 if self.pixel_std is None else self.pixel_std.to(x)
        noisy = x.unsqueeze(1) + torch.randn(len(x), self.samples, *x.shape[1:], device=x.device) * self.sigma / std
        votes = self.query(noisy.flatten(0, 1)).view(len(x), self.samples)
        return smoothed_labels(votes, max(self.num_classes or 0, int(votes.max()) + 1))


ATTACK = AttackSpec(
    name="smooth_retraining",
    attack=SmoothRetrainingAttack,
    threat_model="black-box",
    category="model extraction",
    example=lambda victim: SmoothRetrainingAttack(
        victim, sigma=0.25, samples=4, query_budget=600, optimizer=partial(torch.optim.Adam, lr=3e-3)
    ),
)
"""The registry entry (entry point ``smooth_retraining`` of ``lightning_wm.attacks``)."""
