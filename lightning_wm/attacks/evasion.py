"""Evasion by query rejection: the stolen model answers queries that look unusual (likely key samples) wrongly
(Hitaj & Mancini, "Have You Stolen My Model? Evasion Attacks Against Deep Neural Network Watermarking
Techniques", 2018; an autoencoder detector as in Namba & Sakuma, AsiaCCS 2019)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import CatMetric, MeanMetric

from lightning_wm.attacks.base import RemovalAttack, Victim, load_victim
from lightning_wm.registry import AttackSpec

EvasiveAnswer = Literal["random", "second"]

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


class ConvAutoencoder(nn.Module):
    """A small convolutional autoencoder for any image size: two stride-2 convs down to a narrow code, upsampled
    back to the input size. Its reconstruction error is the query detector's score.

    Args:
        in_channels: image channels.
        width: channels of the hidden layers.
        code: channels of the code (at a quarter of the resolution).
    """

    def __init__(self, in_channels: int = 1, width: int = 16, code: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, code, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(code, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, in_channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        code = self.encoder(x)
        return self.decoder(F.interpolate(code, size=x.shape[-2:], mode="bilinear", align_corners=False))


class EvasionAttack(RemovalAttack):
    """Serve the stolen (victim) model behind a detector of unusual queries that answers them wrongly.

    ``fit`` trains the detector (an autoencoder, by default :class:`ConvAutoencoder`) to reconstruct the
    attacker's clean data; after every validation epoch the flagging threshold is set to the ``quantile`` of the
    reconstruction errors on the validation split (held-out clean data: ``1 - quantile`` of clean queries get
    flagged, the attacker's accuracy cost). ``attack(x)`` returns the victim's logits, with those of flagged
    queries changed so that the top-1 answer is a random other class (``answer="random"``, Hitaj & Mancini) or the
    second-best class (``"second"``): any black-box key verifies ``attack`` (or ``attack.model``, the same
    evading model). The victim's weights are unchanged and never saved: the checkpoint holds the detector and
    its threshold. White-box schemes do not apply (an API exposes no weights).

    ``test`` logs ``test/acc`` of the evading model and ``test/flag_rate`` on clean test images;
    :meth:`flag_rate` measures the rate on any inputs (e.g. key samples).

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        detector: the autoencoder (input → reconstruction); default a :class:`ConvAutoencoder`.
        quantile: share of clean validation queries answered honestly (0.95-0.99).
        answer: ``random`` or ``second``.
        in_channels: image channels of the default detector; default: those of the victim's first conv, else 1.
        optimizer: optimizer factory of the detector.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        detector: nn.Module | None = None,
        quantile: float = 0.97,
        answer: EvasiveAnswer = "random",
        in_channels: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        if answer not in ("random", "second"):
            raise ValueError(f"answer must be 'random' or 'second', got {answer!r}")
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "detector", "optimizer", "lr_scheduler"])
        stolen = load_victim(victim)
        if detector is None:
            if in_channels is None:
                convs = [m for m in stolen.modules() if isinstance(m, nn.Conv2d)]
                in_channels = convs[0].in_channels if convs else 1
            detector = ConvAutoencoder(in_channels)
        self.detector = detector
        self.quantile = quantile
        self.answer = answer
        self.black_box(stolen)
        self.register_buffer("threshold", torch.tensor(float("inf")))
        self.val_errors = CatMetric()
        self.val_correct = CatMetric()
        self.val_correct_evasive = CatMetric()
        self.test_flags = MeanMetric()

    exposes_weights = False

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The share of clean queries answered honestly: lower flags more key samples and costs more accuracy."""
        from optuna.distributions import FloatDistribution

        return {"quantile": FloatDistribution(0.8, 0.99)}

    @property
    def model(self) -> nn.Module:  # type: ignore[override]
        """The evading model (this module): what the attacker's API serves."""
        return self

    def reconstruction_error(self, x: Tensor) -> Tensor:
        """Mean squared reconstruction error of each input."""
        return (self.detector(x).float() - x.float()).pow(2).flatten(1).mean(dim=1)

    def is_flagged(self, x: Tensor) -> Tensor:
        """Which inputs the detector rejects (error above the threshold)."""
        return self.reconstruction_error(x) > self.threshold

    @torch.no_grad()
    def flag_rate(self, x: Tensor) -> float:
        """Share of the inputs ``x`` (model inputs, e.g. key samples) that get an evasive answer."""
        was_training = self.training
        self.eval()
        try:
            return float(self.is_flagged(x.to(self.threshold.device)).float().mean())
        finally:
            self.train(was_training)

    def _evasive(self, logits: Tensor) -> Tensor:
        """Logits whose top-1 is swapped with a random other class or with the second-best class."""
        top = logits.argmax(dim=-1, keepdim=True)
        if self.answer == "second":
            other = logits.topk(2, dim=-1).indices[:, 1:]
        else:
            shift = torch.randint(1, logits.shape[-1], top.shape, device=logits.device)
            other = (top + shift) % logits.shape[-1]
        swapped = logits.scatter(-1, top, logits.gather(-1, other))
        return swapped.scatter(-1, other, logits.gather(-1, top))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            logits = self._victim(x)
        return torch.where(self.is_flagged(x).unsqueeze(-1), self._evasive(logits), logits)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0]
        loss = F.mse_loss(self.detector(x), x)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        errors = self.reconstruction_error(x)
        logits = self._victim(x)
        self.val_errors.update(errors)
        self.val_correct.update((logits.argmax(-1) == y).float())
        self.val_correct_evasive.update((self._evasive(logits).argmax(-1) == y).float())
        self.log("val/reconstruction_error", errors.mean(), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        errors = self.val_errors.compute()
        correct, correct_evasive = self.val_correct.compute(), self.val_correct_evasive.compute()
        for metric in (self.val_errors, self.val_correct, self.val_correct_evasive):
            metric.reset()
        if self.trainer.sanity_checking:
            return
        self.threshold.fill_(float(torch.quantile(errors.float(), self.quantile)))
        flagged = errors > self.threshold
        # CatMetric.compute gathers every rank's values: each rank logs the same number, sync_dist only averages it
        self.log("val/acc", torch.where(flagged, correct_evasive, correct).mean(), prog_bar=True, sync_dist=True)
        self.log("val/flag_rate", flagged.float().mean(), sync_dist=True)
        super().on_validation_epoch_end()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.test_flags(self.is_flagged(batch[0]).float())
        self.log("test/flag_rate", self.test_flags)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.detector.parameters())


ATTACK = AttackSpec(
    name="evasion",
    attack=EvasionAttack,
    threat_model="api-side",
    category="input preprocessing",
    example=lambda victim: EvasionAttack(victim, optimizer=partial(torch.optim.Adam, lr=1e-3)),
)
"""The registry entry (entry point ``evasion`` of ``lightning_wm.attacks``)."""
