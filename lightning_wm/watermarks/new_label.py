"""Zhong, Zhang, Zhang, Li, Yu: "Protecting IP of Deep Neural Networks with Watermarking: A New Label Helps"
(PAKDD 2020).

Key samples are training images plus a secret perturbation, x + β·δ, labelled with a class that does not exist
in the task: the new label K (the (K+1)-th output). Since no real input belongs to it, fine-tuning on task data
gives the model no reason to move the keys back into the task classes, and an unmarked model (which has no
output K, or never saw it trained) does not answer K.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch

from lightning_wm.watermarks.key_samples import KeySampleGenerator, KeySamples


class NewLabelTrigger(KeySampleGenerator):
    """Zhong et al.'s new-label keys: ``clip(x + beta * delta)`` in ``[0, 1]`` pixels with a secret ±1 pattern
    ``delta`` (one per key set, saved in the key file), labelled with the new class K.

    The model must have K+1 outputs (its backbone's ``num_classes: K+1``) while the task stays K classes
    (``ImageClassifier``'s ``num_classes: K``, whose accuracy is argmax correctness on labels < K);
    :class:`~lightning_wm.watermarks.TriggerSetWatermark` checks this before training. Keys are verified by the
    rate at which they are classified as K, against the stated chance rate 1/(K+1).

    Args:
        beta: strength of the perturbation on ``[0, 1]`` pixels.
        alpha_fraction: the paper's α: key set size as a fraction of the training set. None: the scheme's
            ``num_keys``.
        source_class: draw key images from one class only (None: every class).
    """

    label_kind: ClassVar[str] = "new_label"
    name: ClassVar[str] = "new_label"

    def __init__(self, beta: float = 0.2, alpha_fraction: float | None = None, source_class: int | None = None) -> None:
        super().__init__(target_class=0, source_class=source_class)
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if alpha_fraction is not None and not 0.0 < alpha_fraction < 1.0:
            raise ValueError(f"alpha_fraction must be in (0, 1), got {alpha_fraction}")
        self.beta = beta
        self.alpha_fraction = alpha_fraction

    def num_keys(self, train_size: int, requested: int) -> int:
        if self.alpha_fraction is None:
            return requested
        return max(1, round(self.alpha_fraction * train_size))

    def num_outputs(self, num_classes: int) -> int:
        return num_classes + 1

    def key_label(self, num_classes: int) -> int:
        return num_classes

    def chance(self, num_classes: int) -> float:
        return 1.0 / (num_classes + 1)

    def config(self) -> dict[str, Any]:
        return {
            "generator": type(self).__name__,
            "source_class": self.source_class,
            "beta": self.beta,
            "alpha_fraction": self.alpha_fraction,
        }

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        images = self.source_images(datamodule, count, rng, exclude=None)
        delta = torch.randint(0, 2, images.shape[1:], generator=rng).float() * 2 - 1
        keys = (images + self.beta * delta).clamp(0.0, 1.0)
        label = self.key_label(int(getattr(datamodule, "num_classes", 10)))
        return KeySamples(keys, torch.full((count,), label, dtype=torch.long), {"delta": delta})
