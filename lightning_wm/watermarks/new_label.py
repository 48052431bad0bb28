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
from torch import Tensor

from lightning_wm.watermarks.key_samples import KeySampleGenerator, KeySamples


class NewLabelTrigger(KeySampleGenerator):
    """Zhong et al.'s new-label keys: ``clip(x + beta * delta_i)`` in ``[0, 1]`` pixels, labelled with the new
    class K, with a secret ±1 pattern ``delta_i`` drawn per key from the key's generator (saved in the key file).

    The model must have K+1 outputs (its backbone's ``num_classes: K+1``) while the task stays K classes
    (``ImageClassifier``'s ``num_classes: K``, whose accuracy is argmax correctness on labels < K);
    :class:`~lightning_wm.watermarks.TriggerSetWatermark` checks this before training.

    The key label K is fixed by design, so no binomial null holds for every suspect: a model marked by another
    owner answers K to perturbed inputs of its own. Verification therefore compares the suspect's rate of
    answering K on the owner's keys with its rate on as many null keys, made by this generator with fresh
    perturbations that were never embedded. A key draws its own perturbation, so for a suspect that never saw
    the owner's perturbations the owner's keys and the null keys are exchangeable, and the one-sided Fisher exact
    test (conditional on the total count of K answers) is exact. During training, ``negatives`` (training images
    with fresh perturbations, true labels) teach the model the owner's perturbations rather than perturbation in
    general; the keys are memorised, so they are verified on the embedded keys.

    Args:
        beta: strength of the perturbation on ``[0, 1]`` pixels.
        alpha_fraction: the paper's α: key set size as a fraction of the training set. None: the scheme's
            ``num_keys``.
        source_class: draw key images from one class only (None: every class).
    """

    label_kind: ClassVar[str] = "new_label"
    name: ClassVar[str] = "new_label"
    trains_negatives: ClassVar[bool] = True

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

    def memorised(self) -> bool:
        return True

    def null_keys(self) -> bool:
        return True

    def config(self) -> dict[str, Any]:
        return {
            "generator": type(self).__name__,
            "source_class": self.source_class,
            "beta": self.beta,
            "alpha_fraction": self.alpha_fraction,
        }

    def perturb(self, pixels: Tensor, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """``clip(pixels + beta * delta)`` with a fresh ±1 ``delta`` per image, and the deltas."""
        delta = torch.randint(0, 2, pixels.shape, generator=rng).float() * 2 - 1
        return (pixels + self.beta * delta.to(pixels)).clamp(0.0, 1.0), delta

    def negatives(self, pixels: Tensor, rng: torch.Generator) -> Tensor:
        return self.perturb(pixels, rng)[0]

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        images = self.source_images(datamodule, count, rng, exclude=None)
        keys, delta = self.perturb(images, rng)
        label = self.key_label(int(getattr(datamodule, "num_classes", 10)))
        return KeySamples(keys, torch.full((count,), label, dtype=torch.long), {"delta": delta})
