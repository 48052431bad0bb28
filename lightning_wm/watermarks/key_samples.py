"""Key-sample generators of trigger-set watermarks (Zhang et al., AsiaCCS 2018; Zhong et al., PAKDD 2020).

A generator turns the owner's training images into key samples: images an unmarked model has no reason to map
to the key label, which the marked model learns to map there. Every generator works in ``[0, 1]`` pixel space
(through the datamodule's ``denormalize``), draws from a seeded ``torch.Generator``, and takes each key from a
distinct source image, so that the embedding keys and the held-out verification keys never share a source image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_wm.data.base import DatasetNotFoundError


class KeySamples(NamedTuple):
    """Key images in ``[0, 1]`` pixels, their labels, and secrets of the generator worth keeping in the key file."""

    images: Tensor
    labels: Tensor
    secrets: dict[str, Tensor]


class KeySampleGenerator:
    """Base class of the key-sample generators given to :class:`~lightning_wm.watermarks.TriggerSetWatermark`.

    Subclasses implement :meth:`generate`. The defaults describe Zhang et al.'s keys: one ``target_class`` among
    the K task classes, verified against the chance rate 1/K.

    Args:
        target_class: the label every key sample gets.
        source_class: the class whose images are turned into keys; None takes every class but ``target_class``.
    """

    label_kind: ClassVar[str] = "target"
    name: ClassVar[str] = "trigger_set"
    """The scheme label a :class:`~lightning_wm.watermarks.TriggerSetWatermark` with this generator gets."""

    def __init__(self, target_class: int | None = 0, source_class: int | None = None) -> None:
        if target_class is not None and target_class < 0:
            raise ValueError(f"target_class must be a class index, got {target_class}")
        if source_class is not None and source_class == target_class:
            raise ValueError(f"source_class and target_class are both {target_class}: keys would carry their own label")
        self.target_class = target_class
        self.source_class = source_class

    def num_keys(self, train_size: int, requested: int) -> int:
        """How many embedding keys to make for a training set of ``train_size`` images (``requested`` by default)."""
        return requested

    def num_outputs(self, num_classes: int) -> int:
        """Outputs the marked model must have for a task of ``num_classes`` classes."""
        return num_classes

    def key_label(self, num_classes: int) -> int:
        if self.target_class >= num_classes:
            raise ValueError(f"target_class {self.target_class} is not one of the {num_classes} classes")
        return self.target_class

    def chance(self, num_classes: int) -> float:
        """Rate at which an unmarked model answers a key with the key label under the binomial null."""
        return 1.0 / num_classes

    def config(self) -> dict[str, Any]:
        """The generator's settings, JSON-able, recorded in the key file."""
        return {"generator": type(self).__name__, "target_class": self.target_class, "source_class": self.source_class}

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        """Make ``count`` key samples, each from a distinct source image of ``datamodule``."""
        raise NotImplementedError

    def source_images(
        self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator, exclude: int | None
    ) -> Tensor:
        """``count`` distinct training images in ``[0, 1]`` pixels, of ``source_class`` (or of any class but
        ``exclude``)."""
        inputs, labels = training_tensors(datamodule)
        if self.source_class is not None:
            pool = (labels == self.source_class).nonzero().flatten()
            what = f"class {self.source_class}"
        elif exclude is not None:
            pool = (labels != exclude).nonzero().flatten()
            what = f"classes other than {exclude}"
        else:
            pool = torch.arange(len(labels))
            what = "all classes"
        if len(pool) < count:
            raise ValueError(
                f"{type(self).__name__} needs {count} distinct source images (embedding + verification keys) but "
                f"the training set has {len(pool)} of {what}; lower num_keys/num_verify or set source_class: null"
            )
        chosen = pool[torch.randperm(len(pool), generator=rng)[:count]]
        return datamodule.denormalize(inputs[chosen].float()).clamp(0.0, 1.0)


def training_tensors(datamodule: L.LightningDataModule) -> tuple[Tensor, Tensor]:
    """Inputs and labels of the owner's training set (``train_dataset`` of a ``SplitDataModule``)."""
    missing = [a for a in ("train_dataset", "normalize", "denormalize") if not hasattr(datamodule, a)]
    if datamodule is None or missing:
        raise TypeError(
            "key-sample generators need the trainer's datamodule to be a lightning_wm SplitDataModule (with "
            "train_dataset, normalize and denormalize); pass one to trainer.fit(model, datamodule=...)"
        )
    dataset = datamodule.train_dataset
    if not hasattr(dataset, "tensors"):
        raise TypeError(f"the datamodule's train_dataset must be a TensorDataset, got {type(dataset).__name__}")
    return dataset.tensors[0], dataset.tensors[1]


class ContentTrigger(KeySampleGenerator):
    """Zhang et al.'s content keys: a visible stamp (the text "TEST" or a given patch/logo) on images of a
    source class, relabelled to the target class.

    Args:
        target_class, source_class: see :class:`KeySampleGenerator`.
        text: the stamped text (letters A-Z and spaces in a 3×5 pixel font), used when no ``patch`` is given.
        patch: a logo instead of text: a ``(C, h, w)`` or ``(h, w)`` tensor in ``[0, 1]``, or the path of a ``.pt``
            tensor or an image file. Its channels must be 1 or the images' channels, and it must fit the image.
        size: width of the stamped text as a fraction of the image width.
        value: pixel value of the text's strokes.
        background: pixel value of a box filling the text's bounding box (e.g. 0.0: a dark label behind bright
            text, visible on bright images too, where bright strokes alone vanish); None stamps the strokes only,
            as Zhang et al. do.
        position: ``(top, left)`` of the stamp; None puts it at the bottom centre.
    """

    name: ClassVar[str] = "content"

    def __init__(
        self,
        target_class: int = 0,
        source_class: int | None = None,
        text: str = "TEST",
        patch: str | Tensor | None = None,
        size: float = 0.6,
        value: float = 1.0,
        background: float | None = None,
        position: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(target_class=target_class, source_class=source_class)
        unknown = sorted(set(text.upper()) - set(_FONT))
        if unknown:
            raise ValueError(f"ContentTrigger's font has letters A-Z and space only, got {unknown} in {text!r}")
        if not 0.0 < size <= 1.0:
            raise ValueError(f"size must be in (0, 1], got {size}")
        self.text = text
        self.patch = patch
        self.size = size
        self.value = value
        self.background = background
        self.position = position

    def config(self) -> dict[str, Any]:
        stamp = {"text": self.text} if self.patch is None else {"patch": "given"}
        options = {"size": self.size, "background": self.background, "position": self.position}
        return {**super().config(), **stamp, **options}

    def stamp(self, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The stamp's pixels and opacity mask (both ``(C, H, W)``) for images of ``shape``."""
        channels, height, width = shape
        if self.patch is None:
            glyphs = render_text(self.text)
            w = max(1, round(self.size * width))
            h = max(1, min(height, round(w * glyphs.shape[0] / glyphs.shape[1])))
            mask = F.interpolate(glyphs[None, None], size=(h, w), mode="area")[0, 0].gt(0.25).float()
            pixels = torch.full((channels, h, w), float(self.value))
            if self.background is not None:
                pixels = torch.where(mask.bool(), pixels, torch.full_like(pixels, float(self.background)))
                mask = torch.ones(h, w)
        else:
            pixels = _as_patch(self.patch, channels)
            h, w = pixels.shape[-2:]
            mask = torch.ones(h, w)
        top, left = (
            self.position if self.position is not None else (height - h - max(0, height // 14), (width - w) // 2)
        )
        if h > height or w > width or top < 0 or left < 0 or top + h > height or left + w > width:
            raise ValueError(
                f"ContentTrigger: a {h}×{w} stamp at (top, left)=({top}, {left}) does not fit {height}×{width} images"
            )
        full_pixels = torch.zeros(shape)
        full_mask = torch.zeros(shape)
        full_pixels[:, top : top + h, left : left + w] = pixels
        full_mask[:, top : top + h, left : left + w] = mask
        return full_pixels, full_mask

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        images = self.source_images(datamodule, count, rng, exclude=self.target_class)
        pixels, mask = self.stamp(tuple(images.shape[1:]))
        keys = images * (1 - mask) + pixels * mask
        return KeySamples(keys, torch.full((count,), self.target_class, dtype=torch.long), {"stamp_mask": mask})


def _as_patch(patch: str | Tensor, channels: int) -> Tensor:
    if isinstance(patch, (str, Path)):
        path = Path(patch)
        if not path.is_file():
            raise FileNotFoundError(f"ContentTrigger: patch file {path} does not exist")
        if path.suffix in (".pt", ".pth"):
            patch = torch.load(path, weights_only=True)
        else:
            from torchvision.io import read_image

            patch = read_image(str(path)).float() / 255.0
    if not isinstance(patch, Tensor):
        raise TypeError(f"ContentTrigger: patch must be a tensor or a file path, got {type(patch).__name__}")
    patch = patch.detach().float().cpu()
    if patch.dim() == 2:
        patch = patch[None]
    if patch.dim() != 3:
        raise ValueError(f"ContentTrigger: patch must be (C, h, w) or (h, w), got shape {tuple(patch.shape)}")
    if patch.shape[0] not in (1, channels):
        raise ValueError(
            f"ContentTrigger: patch has {patch.shape[0]} channels, the images have {channels}; give a patch "
            f"with 1 or {channels} channels"
        )
    if patch.min() < 0 or patch.max() > 1:
        raise ValueError("ContentTrigger: patch pixels must be in [0, 1]")
    return patch.expand(channels, -1, -1).clone()


def render_text(text: str) -> Tensor:
    """``text`` in a 3×5 pixel font as a float ``(5, 4·len - 1)`` image of 0/1."""
    columns: list[Tensor] = []
    for i, char in enumerate(text.upper()):
        if i:
            columns.append(torch.zeros(5, 1))
        rows = _FONT[char]
        columns.append(torch.tensor([[float(bit) for bit in row] for row in rows]))
    return torch.cat(columns, dim=1)


_FONT: dict[str, tuple[str, ...]] = {
    " ": ("000", "000", "000", "000", "000"),
    "A": ("010", "101", "111", "101", "101"),
    "B": ("110", "101", "110", "101", "110"),
    "C": ("011", "100", "100", "100", "011"),
    "D": ("110", "101", "101", "101", "110"),
    "E": ("111", "100", "110", "100", "111"),
    "F": ("111", "100", "110", "100", "100"),
    "G": ("011", "100", "101", "101", "011"),
    "H": ("101", "101", "111", "101", "101"),
    "I": ("111", "010", "010", "010", "111"),
    "J": ("001", "001", "001", "101", "010"),
    "K": ("101", "101", "110", "101", "101"),
    "L": ("100", "100", "100", "100", "111"),
    "M": ("101", "111", "111", "101", "101"),
    "N": ("110", "101", "101", "101", "101"),
    "O": ("010", "101", "101", "101", "010"),
    "P": ("110", "101", "110", "100", "100"),
    "Q": ("010", "101", "101", "110", "011"),
    "R": ("110", "101", "110", "101", "101"),
    "S": ("011", "100", "010", "001", "110"),
    "T": ("111", "010", "010", "010", "010"),
    "U": ("101", "101", "101", "101", "111"),
    "V": ("101", "101", "101", "101", "010"),
    "W": ("101", "101", "111", "111", "101"),
    "X": ("101", "101", "010", "101", "101"),
    "Y": ("101", "101", "010", "010", "010"),
    "Z": ("111", "001", "010", "100", "111"),
}


class NoiseTrigger(KeySampleGenerator):
    """Zhang et al.'s noise keys: Gaussian noise of standard deviation ``sigma`` added to source images in
    ``[0, 1]`` pixels (a fresh draw per key, then clipped), relabelled to the target class.

    Args:
        target_class, source_class: see :class:`KeySampleGenerator`.
        sigma: the noise's standard deviation on ``[0, 1]`` pixels.
    """

    name: ClassVar[str] = "noise"

    def __init__(self, target_class: int = 0, source_class: int | None = None, sigma: float = 0.5) -> None:
        super().__init__(target_class=target_class, source_class=source_class)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = sigma

    def config(self) -> dict[str, Any]:
        return {**super().config(), "sigma": self.sigma}

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        images = self.source_images(datamodule, count, rng, exclude=self.target_class)
        noise = torch.randn(images.shape, generator=rng) * self.sigma
        keys = (images + noise).clamp(0.0, 1.0)
        return KeySamples(keys, torch.full((count,), self.target_class, dtype=torch.long), {})


class UnrelatedTrigger(KeySampleGenerator):
    """Zhang et al.'s unrelated keys: images of another dataset, resized to the model's input size and channel
    count, labelled with the target class, or by default each with a uniformly random class.

    Random labels (Adi et al. 2018's labelling) make the binomial null exact: an unmarked model's answers cannot
    depend on labels it never saw, so it matches each with probability 1/K. With one target class (Zhang et al.)
    the null breaks: unmarked models send many foreign images to the same class, and 3 of 3 clean Fashion-MNIST
    models matched target class 0 on most digit keys (declared at α = 0.01) in the benchmark. A random label is
    memorised, not generalised, so random-label keys are verified on the embedded keys themselves (as Adi et al.
    do), not on held-out ones.

    ``source="auto"`` takes scikit-learn's digits for a Fashion-MNIST, MNIST or CIFAR-10 model and Fashion-MNIST
    (via :class:`~lightning_wm.data.FashionMNISTDataModule`, offline from ``/usr/share/datasets/fashion-mnist``)
    for a digits model.

    Args:
        target_class: the label of every key, or None (default) for a uniformly random label per key.
        source_class: a class of the other dataset to draw from (None: every class).
        source: ``auto``, ``digits`` or ``fashion_mnist``.
        data_dir: where the other dataset is looked for.
    """

    name: ClassVar[str] = "unrelated"

    def __init__(
        self,
        target_class: int | None = None,
        source_class: int | None = None,
        source: Literal["auto", "digits", "fashion_mnist"] = "auto",
        data_dir: str = "data",
    ) -> None:
        super().__init__(target_class=target_class)
        if source not in ("auto", "digits", "fashion_mnist"):
            raise ValueError(f"source must be 'auto', 'digits' or 'fashion_mnist', got {source!r}")
        self.source_class = source_class
        self.source = source
        self.data_dir = data_dir

    def config(self) -> dict[str, Any]:
        return {**super().config(), "source": self.source}

    def other_datamodule(self, datamodule: L.LightningDataModule) -> L.LightningDataModule:
        from lightning_wm.data import DigitsDataModule, FashionMNISTDataModule

        source = self.source
        if source == "auto":
            source = "fashion_mnist" if isinstance(datamodule, DigitsDataModule) else "digits"
        if source == "digits":
            return DigitsDataModule()
        other = FashionMNISTDataModule(data_dir=self.data_dir, download=False)
        try:
            other.setup()
        except DatasetNotFoundError as err:
            raise DatasetNotFoundError(f"UnrelatedTrigger needs Fashion-MNIST as its unrelated images: {err}") from None
        return other

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        inputs, _ = training_tensors(datamodule)
        channels, height, width = inputs.shape[1:]
        other = self.other_datamodule(datamodule)
        other_inputs, other_labels = other.dataset("all").tensors
        pool = torch.arange(len(other_labels))
        if self.source_class is not None:
            pool = (other_labels == self.source_class).nonzero().flatten()
        if len(pool) < count:
            raise ValueError(
                f"UnrelatedTrigger needs {count} distinct images of {type(other).__name__}, it has {len(pool)}; "
                "lower num_keys/num_verify or set source_class: null"
            )
        chosen = pool[torch.randperm(len(pool), generator=rng)[:count]]
        images = other.denormalize(other_inputs[chosen].float()).clamp(0.0, 1.0)
        if images.shape[-2:] != (height, width):
            smaller = images.shape[-1] > width
            mode = "area" if smaller else "bilinear"
            kwargs = {} if smaller else {"align_corners": False}
            images = F.interpolate(images, size=(height, width), mode=mode, **kwargs).clamp(0.0, 1.0)
        if images.shape[1] != channels:
            images = images.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1).clone()
        if self.target_class is None:
            classes = int(getattr(datamodule, "num_classes", 10))
            labels = torch.randint(0, classes, (count,), generator=rng)
        else:
            labels = torch.full((count,), self.target_class, dtype=torch.long)
        return KeySamples(images, labels, {})
