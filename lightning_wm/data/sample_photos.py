"""Unrelated images that ship with scikit-learn: patches of its two bundled sample photographs.

Zhang et al. (AsiaCCS 2018) take unrelated key images from another dataset. When none is on disk (a digits model
whose natural unrelated source, Fashion-MNIST, is a separate download), the photographs ``china.jpg`` and
``flower.jpg`` of :func:`sklearn.datasets.load_sample_images` give real, non-synthetic images offline: grey-scaled,
cut into square patches at positions and sizes drawn from the key's generator, and resized to the model's inputs.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

PHOTOS = ("china.jpg", "flower.jpg")


@lru_cache(maxsize=1)
def sample_photos() -> Tensor:
    """The bundled photographs as one grey-scale ``(2, 1, 427, 640)`` tensor in ``[0, 1]`` (no network)."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    images = torch.as_tensor(np.stack(load_sample_images().images), dtype=torch.float32) / 255.0
    grey = images @ torch.tensor([0.299, 0.587, 0.114])
    return grey[:, None].contiguous()


def sample_photo_patches(
    count: int,
    size: tuple[int, int],
    rng: torch.Generator,
    channels: int = 1,
    min_side: int = 24,
    max_side: int = 160,
) -> Tensor:
    """``count`` square patches of the sample photographs, resized to ``size`` with ``channels`` channels.

    Each patch's photograph, side (uniform in ``[min_side, max_side]`` pixels) and position are drawn from ``rng``,
    so the patches are a secret of whoever holds the generator's seed.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    photos = sample_photos()
    _, _, height, width = photos.shape
    max_side = min(max_side, height, width)
    if not 1 <= min_side <= max_side:
        raise ValueError(f"min_side must be in [1, {max_side}], got {min_side}")
    which = torch.randint(0, len(photos), (count,), generator=rng)
    sides = torch.randint(min_side, max_side + 1, (count,), generator=rng)
    corners = torch.rand(count, 2, generator=rng)
    patches = []
    for photo, side, (u, v) in zip(which.tolist(), sides.tolist(), corners.tolist()):
        top, left = int(u * (height - side + 1)), int(v * (width - side + 1))
        patch = photos[photo : photo + 1, :, top : top + side, left : left + side]
        patches.append(F.interpolate(patch, size=size, mode="area"))
    return torch.cat(patches).clamp(0.0, 1.0).expand(-1, channels, -1, -1).clone()
