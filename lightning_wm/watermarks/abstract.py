"""Adi, Baum, Cisse, Pinkas, Keshet: "Turning Your Weakness Into a Strength: Watermarking Deep Neural Networks by
Backdooring" (USENIX Security 2018).

The trigger set is a set of abstract, out-of-distribution images, each with a label drawn at random, which the
model learns by heart while it trains on the task: the paper mixes its 100 images into every batch, 2 per batch.
Verification queries the suspect's top-1 labels on the trigger images. Labels drawn uniformly and independently of
the images make the null exact for any suspect that never saw them: its hits are Binomial(n, 1/K) (a constant
predictor, an untrained network and another owner's model included); degenerate suspects are undecidable through
the clean probes every trigger-set key stores.

The paper's own abstract images are not available, so :class:`AbstractTrigger` draws them from the key's secret:
each image is a sum of a few random 2-D sinusoids, over which a few rectangles and ellipses of random grey levels
are painted, at the model's input size. The key is then the expansion of its secret and ``verify`` re-derives it.
A folder of the user's own images (the paper's setting) is accepted instead; such a key is not derived from its
secret, is reported not checkable, and proves less (a forger could have chosen the images).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_wm.registry import SchemeSpec
from lightning_wm.watermarks.key_samples import KeySampleGenerator, KeySamples, training_tensors
from lightning_wm.watermarks.trigger_set import TriggerSetKey, TriggerSetWatermark, register_generator

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@register_generator
class AbstractTrigger(KeySampleGenerator):
    """Adi et al.'s abstract trigger images, drawn from the key's generator, each with a uniformly random label.

    An image (``C×H×W`` in ``[0, 1]``, the model's input shape) is drawn as follows: ``waves`` sinusoids
    ``sin(2π(f·r) + φ)`` with random orientations, frequencies of 0.5 to ``max_frequency`` cycles per image and
    random phases and amplitudes are summed and rescaled to ``[0, 1]``; then ``shapes`` rectangles or ellipses
    (random centre, half-sizes of 10% to 40% of the image, ellipses at a random angle) are painted over it, each
    filled with a random grey level (one per channel for colour inputs). Every draw comes from ``rng``, so the
    images are reproducible from the key's secret and two keys' images differ.

    Args:
        target_class: None (default): a uniformly random label per image (the paper's labelling, exact binomial
            null); a class index gives every image that label (no valid null for every suspect).
        waves: sinusoids summed into each image's background.
        shapes: rectangles and ellipses painted over it.
        max_frequency: highest sinusoid frequency, in cycles per image.
        folder: a folder of the user's own images (png, jpg, bmp, gif), resized to the model's input size: the
            key is then not derived from its secret (``patch`` names them, so the key records no
            ``generator_init`` and verification reports it not checkable).
    """

    name: ClassVar[str] = "adi"

    def __init__(
        self,
        target_class: int | None = None,
        waves: int = 3,
        shapes: int = 4,
        max_frequency: float = 3.0,
        folder: str | None = None,
    ) -> None:
        super().__init__(target_class=target_class)
        if waves < 0 or shapes < 0 or waves + shapes == 0:
            raise ValueError(f"waves and shapes must be non-negative and not both 0, got {waves} and {shapes}")
        if max_frequency < 0.5:
            raise ValueError(f"max_frequency must be at least 0.5 cycles per image, got {max_frequency}")
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"AbstractTrigger: folder {folder} does not exist")
        self.waves = waves
        self.shapes = shapes
        self.max_frequency = max_frequency
        self.folder = folder

    @property
    def patch(self) -> str | None:
        """The user's own images (the folder), which make a key that is not derived from its secret."""
        return self.folder

    def config(self) -> dict[str, Any]:
        images = {"images": "user folder"} if self.folder is not None else {"images": "procedural from the secret"}
        options = {"waves": self.waves, "shapes": self.shapes, "max_frequency": self.max_frequency}
        return {**super().config(), **images, **options}

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        inputs, _ = training_tensors(datamodule)
        shape = tuple(inputs.shape[1:])
        if self.folder is not None:
            images = folder_images(self.folder, count, shape, rng)
        else:
            images = abstract_images(count, shape, rng, self.waves, self.shapes, self.max_frequency)
        return KeySamples(images, self.draw_labels(datamodule, count, rng), {})


def abstract_images(
    count: int,
    shape: tuple[int, ...],
    rng: torch.Generator,
    waves: int = 3,
    shapes: int = 4,
    max_frequency: float = 3.0,
) -> Tensor:
    """``count`` abstract images of ``shape`` ``(C, H, W)`` in ``[0, 1]``: sums of ``waves`` random sinusoids
    under ``shapes`` random grey rectangles and ellipses (see :class:`AbstractTrigger`), all drawn from ``rng``."""
    channels, height, width = shape
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    image = torch.zeros(count, channels, height, width)
    if waves:
        angle = torch.rand(count, waves, 1, 1, generator=rng) * math.pi
        frequency = 0.5 + torch.rand(count, waves, 1, 1, generator=rng) * (max_frequency - 0.5)
        phase = torch.rand(count, waves, 1, 1, generator=rng) * 2 * math.pi
        amplitude = 0.5 + torch.rand(count, waves, 1, 1, generator=rng)
        along = x * torch.cos(angle) + y * torch.sin(angle)
        background = (amplitude * torch.sin(2 * math.pi * frequency * along + phase)).sum(1)
        low = background.amin(dim=(-2, -1), keepdim=True)
        high = background.amax(dim=(-2, -1), keepdim=True)
        image += ((background - low) / (high - low).clamp_min(1e-6))[:, None]
    for _ in range(shapes):
        centre = torch.rand(count, 2, 1, 1, generator=rng)
        half = 0.1 + torch.rand(count, 2, 1, 1, generator=rng) * 0.3
        angle = torch.rand(count, 1, 1, generator=rng) * math.pi
        ellipse = torch.rand(count, 1, 1, generator=rng) < 0.5
        level = torch.rand(count, channels, 1, 1, generator=rng)
        dy, dx = y - centre[:, 0], x - centre[:, 1]
        u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / half[:, 1]
        v = (-dx * torch.sin(angle) + dy * torch.cos(angle)) / half[:, 0]
        inside = torch.where(ellipse, u**2 + v**2 <= 1.0, (dx.abs() <= half[:, 1]) & (dy.abs() <= half[:, 0]))
        image = torch.where(inside[:, None], level, image)
    return image.clamp(0.0, 1.0)


def folder_images(folder: str | Path, count: int, shape: tuple[int, ...], rng: torch.Generator) -> Tensor:
    """``count`` of the images in ``folder`` (chosen by ``rng``, in ``[0, 1]``), resized to ``shape``'s size and
    brought to its channels (grey for one channel, the grey replicated for three)."""
    from torchvision.io import ImageReadMode, decode_image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < count:
        raise ValueError(
            f"AbstractTrigger needs {count} images in {folder}, it has {len(files)} ({', '.join(IMAGE_SUFFIXES)}); "
            "add images or lower num_keys"
        )
    channels, height, width = shape
    chosen = [files[i] for i in torch.randperm(len(files), generator=rng)[:count].tolist()]
    images = []
    for path in chosen:
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        image = decode_image(str(path), mode=mode).float()[None] / 255.0
        smaller = image.shape[-1] > width
        kwargs: dict[str, Any] = {"mode": "area"} if smaller else {"mode": "bilinear", "align_corners": False}
        images.append(F.interpolate(image, size=(height, width), **kwargs))
    out = torch.cat(images).clamp(0.0, 1.0)
    if out.shape[1] != channels:
        out = out.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1).clone()
    return out


def _example(seed: int | None = None, key_path: str | None = None) -> TriggerSetWatermark:
    return TriggerSetWatermark(AbstractTrigger(), num_keys=20, keys_per_batch=32, seed=seed, key_path=key_path)


ADI = SchemeSpec(
    name="adi",
    callback=TriggerSetWatermark,
    key=TriggerSetKey,
    higher_is_watermarked=True,
    access="labels",
    example=_example,
    example_epochs=5,
)
"""The registry entry of Adi et al.'s abstract trigger set (the paper's settings are in configs/digits/adi.yaml:
100 images, 2 per batch; the example oversamples 20, 32 per batch, so that 5 epochs of a width-8 network embed them)."""
