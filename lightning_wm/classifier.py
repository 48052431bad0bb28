"""``ImageClassifier``: a LightningModule around any backbone."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_wm.mixin import WatermarkMixin
from lightning_wm.models.hidden import HiddenModule


class ClassifierSteps(L.LightningModule):
    """The evaluation side of a classifier, shared by :class:`ImageClassifier` and the removal attacks.

    Validation and test log ``<stage>/loss`` and ``<stage>/acc`` (torchmetrics means, synchronised under DDP),
    ``predict`` returns probabilities, and the optimizer (a LightningCLI factory in ``self.optimizer``, with an
    optional ``self.lr_scheduler``) gets :meth:`trainable_parameters`. Subclasses create ``val_accuracy`` and
    ``test_accuracy`` (``MeanMetric``) and implement ``forward`` and ``training_step``.
    """

    optimizer: OptimizerCallable
    lr_scheduler: LRSchedulerCallable | None
    val_accuracy: MeanMetric
    test_accuracy: MeanMetric

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (those that require gradients)."""
        return [p for p in self.parameters() if p.requires_grad]

    def _evaluate(self, batch: Any, stage: str, metric: MeanMetric) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        metric(logits.argmax(-1) == y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return torch.softmax(self(batch[0]), dim=-1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.trainable_parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}


class ImageClassifier(WatermarkMixin, ClassifierSteps):
    """Cross-entropy classification with any backbone, accuracy logged for train/val/test.

    Built by ``lightning-wm`` (LightningCLI), its checkpoints record the backbone's config, so
    :func:`load_classifier` rebuilds them; built in Python, pass the backbone to :func:`load_classifier`.

    Watermark schemes attach through :class:`~lightning_wm.mixin.WatermarkMixin` (their loss terms) and the
    Trainer's callbacks; the module itself holds no key. Accuracy is the share of argmax predictions equal to
    the label (a torchmetrics ``MeanMetric`` of correctness, so it stays the K-class task accuracy when a scheme
    adds a (K+1)-th output).

    Args:
        backbone: the network, mapping images to logits.
        num_classes: task classes K (a scheme may add outputs beyond them).
        optimizer: optimizer factory, set from the CLI the LightningCLI way (``--optimizer.lr``...).
        lr_scheduler: optional scheduler factory.
        pretrained: a checkpoint of ``lightning-wm fit`` whose weights initialise the model (to embed while
            fine-tuning, Uchida et al.'s second situation); a checkpoint written from Python is read into the
            ``backbone``'s architecture.
        teacher: a checkpoint of a trained classifier: the model then learns the teacher's soft labels (KL at
            ``temperature``) instead of the ground truth (to embed while distilling, Uchida et al.'s third
            situation). The teacher is frozen; a checkpoint written from Python is read into a copy of the
            ``backbone``'s architecture.
        temperature: softmax temperature of the distillation.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        pretrained: str | None = None,
        teacher: str | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        from_cli = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=[] if from_cli else ["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone
        if pretrained is not None:
            self.backbone.load_state_dict(_load_backbone(pretrained, backbone).state_dict())
        self._teacher = HiddenModule(_load_backbone(teacher, backbone)) if teacher is not None else None
        self.temperature = temperature
        self.num_classes = num_classes
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_accuracy = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.test_accuracy = MeanMetric()

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (``teacher=``), kept out of ``parameters()``, ``state_dict()`` and checkpoints: it is
        reloaded from its checkpoint path, recorded in the hyperparameters."""
        return self._teacher.module if self._teacher is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        if self._teacher is None:
            loss = F.cross_entropy(logits, y)
        else:
            with torch.no_grad():
                soft_labels = torch.softmax(self._teacher(x).float() / self.temperature, dim=-1)
            log_probs = F.log_softmax(logits / self.temperature, dim=-1)
            loss = F.kl_div(log_probs, soft_labels, reduction="batchmean") * self.temperature**2
        self.train_accuracy(logits.argmax(-1) == y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return {"loss": loss, "logits": logits}


def _load_backbone(checkpoint: str | Path, like: nn.Module) -> nn.Module:
    """The backbone of a classifier checkpoint; one written from Python (no recorded backbone) is read into a
    copy of ``like``, the architecture of the model being built."""
    try:
        return load_classifier(checkpoint).backbone
    except ValueError as err:
        if "does not record its backbone" not in str(err):
            raise
        return load_classifier(checkpoint, backbone=copy.deepcopy(like)).backbone


def load_classifier(checkpoint: str | Path, backbone: nn.Module | None = None) -> L.LightningModule:
    """Load a classifier checkpoint written by ``lightning-wm fit`` (or by Python, given its ``backbone``).

    Raises:
        FileNotFoundError / ValueError: a one-line message naming the file when it does not load.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    try:
        kwargs = {"backbone": backbone} if backbone is not None else {}
        model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True, **kwargs)
    except TypeError as err:
        if "backbone" in str(err):
            raise ValueError(
                f"checkpoint {checkpoint} does not record its backbone (it was not written by the CLI); "
                "pass backbone= to load_classifier"
            ) from None
        raise ValueError(f"checkpoint {checkpoint} does not load as an ImageClassifier: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001  (any unreadable file ends in the same one-line message)
        raise ValueError(f"checkpoint {checkpoint} does not load: {type(err).__name__}: {_first_line(err)}") from None
    return model.eval()


def _first_line(err: BaseException) -> str:
    """The first informative line of an error (torch's unpickling and state-dict errors run over many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Weights only load failed"):
        return "not a PyTorch checkpoint (it does not unpickle)"
    if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]
