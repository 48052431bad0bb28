"""``ImageClassifier``, ``load_classifier`` and ``WatermarkMixin`` on the digits data with tiny models."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import fast_trainer
from torch import nn

from lightning_wm import ImageClassifier, WatermarkMixin, load_classifier
from lightning_wm.data import DigitsDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.watermarks import UchidaWatermark, WatermarkScheme

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier(width: int = 8, **kwargs) -> ImageClassifier:
    return ImageClassifier(SmallCNN(1, 10, width), **kwargs)


def test_fit_and_test_log_train_val_and_test_accuracy(dm: DigitsDataModule) -> None:
    L.seed_everything(0)
    model = _classifier()
    trainer = fast_trainer(2, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert {"train/acc", "train/loss", "val/acc", "val/loss"} <= set(metrics)
    assert 0.0 <= float(metrics["train/acc"]) <= 1.0
    (result,) = trainer.test(model, dm, verbose=False)
    assert set(result) == {"test/acc", "test/loss"}
    assert result["test/acc"] > 0.5, "two epochs of a small CNN learn the digits well above chance"
    assert model.predict_step([dm.dataset("test").tensors[0][:4]], 0).sum(-1).allclose(torch.ones(4))


def test_optimizer_and_lr_scheduler_are_configurable(dm: DigitsDataModule) -> None:
    model = _classifier(
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = fast_trainer(2, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, dm)
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2), "the scheduler stepped once per epoch"
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)


def test_load_classifier_round_trip_and_one_line_errors(dm: DigitsDataModule, tmp_path: Path) -> None:
    model = _classifier()
    trainer = fast_trainer(1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = load_classifier(path, backbone=SmallCNN(1, 10, 8))
    assert not loaded.training
    x = dm.dataset("test").tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))

    errors = []
    with pytest.raises(ValueError, match="does not record its backbone.*pass backbone=") as err:
        load_classifier(path)
    errors.append(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_classifier(tmp_path / "missing.ckpt")
    errors.append(err.value)
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.ckpt does not load") as err:
        load_classifier(tmp_path / "corrupt.ckpt", backbone=SmallCNN(1, 10, 8))
    errors.append(err.value)
    with pytest.raises(ValueError, match="model.ckpt") as err:
        load_classifier(path, backbone=SmallCNN(1, 10, 16))
    errors.append(err.value)
    for error in errors:
        assert "\n" not in str(error), f"not one line: {error}"


class _ConstantTerm(WatermarkScheme):
    """A scheme whose loss term is a known constant (with a gradient path), recording every call."""

    name = "constant"

    def __init__(self, value: float = 5.0) -> None:
        super().__init__(seed=0)
        self.value = value
        self.calls = 0
        self.task_losses: list[float] = []
        self.total_losses: list[float] = []

    def setup(self, trainer, pl_module, stage) -> None:  # no key needed
        pass

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pass

    def training_loss(self, pl_module, batch, output):
        self.calls += 1
        loss = output["loss"] if isinstance(output, dict) else output
        self.task_losses.append(float(loss.detach()))
        first = next(pl_module.parameters())
        return first.sum() * 0 + self.value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.total_losses.append(float(outputs["loss"]))


class UserModule(WatermarkMixin, L.LightningModule):
    """A user's own LightningModule with its own training_step (a tensor return, no logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(1, 10, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class MixinLast(L.LightningModule, WatermarkMixin):
    """The mixin after LightningModule in the bases: the training_step is still wrapped."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ClassifierWithOwnStep(ImageClassifier):
    """A subclass of ImageClassifier that overrides training_step and calls super()."""

    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        return {**output, "loss": output["loss"] * 1.0}


@pytest.mark.parametrize("module", [UserModule, MixinLast, lambda: ClassifierWithOwnStep(SmallCNN(1, 10, 8))])
def test_mixin_adds_a_scheme_term_once_per_step_in_a_users_module(module, dm: DigitsDataModule) -> None:
    scheme = _ConstantTerm(5.0)
    fast_trainer(1, [scheme], limit_train_batches=3, limit_val_batches=0).fit(module(), dm)
    assert scheme.calls == 3, "one term per training step, even through super().training_step"
    for task, total in zip(scheme.task_losses, scheme.total_losses):
        assert total == pytest.approx(task + 5.0, rel=1e-5)


def test_mixin_embeds_a_real_scheme_in_a_users_module(dm: DigitsDataModule) -> None:
    L.seed_everything(0)
    scheme = UchidaWatermark(layer="net.conv2", bits=32, strength=0.1, seed=1)
    model = UserModule()
    fast_trainer(3, [scheme], limit_val_batches=0).fit(model, dm)
    verdict = scheme.key.verify(model)
    assert verdict.is_watermarked, verdict
    assert verdict.statistic <= 1 / 32, "at most one of the 32 bits still wrong after three epochs"
    assert scheme.key.verify(model.net, layer="conv2").is_watermarked, "the bare network, naming its layer"
