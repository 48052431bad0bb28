"""Key-sample generators of trigger-set watermarks (Zhang et al., AsiaCCS 2018; Zhong et al., PAKDD 2020).

A generator turns the owner's training images into key samples: images an unmarked model has no reason to map
to the key label, which the marked model learns to map there. Every generator works in ``[0, 1]`` pixel space
(through the datamodule's ``denormalize``), draws from a seeded ``torch.Generator`` (the key's ``rng``), and takes
each key from a distinct source image, so that the embedding keys and the held-out verification keys never share a
source image.

Every key is owner-specific by default: its perturbation (stamp, noise pattern, choice of unrelated images) is a
secret drawn from ``rng``, and each key sample gets a uniformly random label (Adi et al., USENIX Security 2018),
drawn independently of its image. Any suspect that never saw the labels then answers each key with its label with
probability exactly 1/K, whatever it does, so the number of hits is Binomial(n, 1/K): a constant predictor, an
untrained network and a model marked with another owner's key are all covered. Random labels are memorised, not
generalised, so such keys are verified on the embedded keys themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_wm.data.base import DatasetNotFoundError
from lightning_wm.data.sample_photos import sample_photo_patches


class KeySamples(NamedTuple):
    """Key images in ``[0, 1]`` pixels, their labels, and secrets of the generator worth keeping in the key file."""

    images: Tensor
    labels: Tensor
    secrets: dict[str, Tensor]


class KeySampleGenerator:
    """Base class of the key-sample generators given to :class:`~lightning_wm.watermarks.TriggerSetWatermark`.

    Subclasses implement :meth:`generate` and label keys with :meth:`draw_labels`: a uniformly random class per
    key by default (exact binomial null for any suspect), or Zhang et al.'s one ``target_class``. A fixed class is
    not owner-specific: a suspect that answers that class to odd inputs (a constant predictor, another owner's
    model marked toward the same class) hits every key, so its binomial null is not valid for every suspect.

    Args:
        target_class: the label every key sample gets; None (default) draws a uniformly random label per key.
        source_class: the class whose images are turned into keys; None takes every class (but ``target_class``).
    """

    label_kind: ClassVar[str] = "target"
    name: ClassVar[str] = "trigger_set"
    """The scheme label a :class:`~lightning_wm.watermarks.TriggerSetWatermark` with this generator gets."""
    trains_negatives: ClassVar[bool] = False
    """Whether :meth:`negatives` gives perturbed training images to learn with their true labels."""

    def __init__(self, target_class: int | None = None, source_class: int | None = None) -> None:
        if target_class is not None and target_class < 0:
            raise ValueError(f"target_class must be a class index, got {target_class}")
        if source_class is not None and source_class == target_class:
            raise ValueError(f"source_class and target_class are both {target_class}: keys would carry their own label")
        self.target_class = target_class
        self.source_class = source_class

    @property
    def random_labels(self) -> bool:
        """Whether each key gets a uniformly random label (no ``target_class``)."""
        return self.target_class is None

    def memorised(self) -> bool:
        """Whether the marked model learns each key by heart (verified on the embedded keys) rather than a rule
        that carries over to fresh keys made the same way (verified on held-out keys)."""
        return self.random_labels

    def null_keys(self) -> bool:
        """Whether verification compares the owner's keys with never-embedded null keys of this generator (for a
        key label fixed by design, whose binomial null no suspect-independent argument supports)."""
        return False

    def draw_labels(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> Tensor:
        """``count`` key labels: uniform over the task's classes and independent of the images, or ``target_class``."""
        if self.target_class is not None:
            return torch.full((count,), self.target_class, dtype=torch.long)
        classes = int(getattr(datamodule, "num_classes", 10))
        return torch.randint(0, classes, (count,), generator=rng)

    def negatives(self, pixels: Tensor, rng: torch.Generator) -> Tensor:
        """Perturbed copies of training images (``[0, 1]`` pixels) the model must still classify by their true
        labels, so that it learns the owner's secret rather than any perturbation of its kind."""
        raise NotImplementedError(f"{type(self).__name__} trains no negatives")

    def num_keys(self, train_size: int, requested: int) -> int:
        """How many embedding keys to make for a training set of ``train_size`` images (``requested`` by default)."""
        return requested

    def num_outputs(self, num_classes: int) -> int:
        """Outputs the marked model must have for a task of ``num_classes`` classes."""
        return num_classes

    def key_label(self, num_classes: int) -> int:
        """The fixed key label, checked against the task's classes."""
        if self.target_class is None:
            raise ValueError(f"{type(self).__name__} draws a random label per key: there is no single key label")
        if self.target_class >= num_classes:
            raise ValueError(f"target_class {self.target_class} is not one of the {num_classes} classes")
        return self.target_class

    def chance(self, num_classes: int) -> float:
        """Rate at which an unmarked model answers a key with its label under the binomial null (exact for random
        labels, an assumption about the suspect for a fixed class)."""
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
    """Zhang et al.'s content keys: a visible stamp on source images, made owner-specific.

    By default (``secret=True``) the stamp is a secret of the key: a box of random black-and-white pixels at a
    random position, both drawn from the key's generator, and each key gets a uniformly random label (Adi et al.
    2018). Two owners' stamps and labels then agree no more than chance, and the binomial null Binomial(n, 1/K)
    is exact for any suspect that never saw the labels (labels independent of the images). A ``text`` or
    ``patch`` replaces the random pixels (its position stays secret unless ``position`` is given).

    Zhang et al.'s plain key, ``ContentTrigger(text="TEST", target_class=0, secret=False)``, stamps the same
    public text at the same place for every owner, toward one class: it is not owner-specific (another owner's
    "TEST" model, or any model that sends stamped inputs to that class, matches it) and its binomial null is not
    valid for every suspect.

    Args:
        target_class, source_class: see :class:`KeySampleGenerator`.
        text: stamped text (letters A-Z and spaces in a 3×5 pixel font). None: random secret pixels, or "TEST"
            when ``secret`` is False.
        patch: a logo instead of text: a ``(C, h, w)`` or ``(h, w)`` tensor in ``[0, 1]``, or the path of a ``.pt``
            tensor or an image file. Its channels must be 1 or the images' channels, and it must fit the image.
        size: width of the stamp (text or random box) as a fraction of the image width.
        value: pixel value of the text's strokes.
        background: pixel value of a box filling the text's bounding box (e.g. 0.0: a dark label behind bright
            text, visible on bright images too, where bright strokes alone vanish); None stamps the strokes only,
            as Zhang et al. do.
        position: ``(top, left)`` of the stamp; None: secret random (``secret``) or the bottom centre.
        secret: draw the stamp's pixels (without ``text``/``patch``) and position from the key's generator.
    """

    name: ClassVar[str] = "content"

    def __init__(
        self,
        target_class: int | None = None,
        source_class: int | None = None,
        text: str | None = None,
        patch: str | Tensor | None = None,
        size: float = 0.6,
        value: float = 1.0,
        background: float | None = None,
        position: tuple[int, int] | None = None,
        secret: bool = True,
    ) -> None:
        super().__init__(target_class=target_class, source_class=source_class)
        if text is None and patch is None and not secret:
            text = "TEST"
        if text is not None:
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
        self.secret = secret

    def config(self) -> dict[str, Any]:
        if self.patch is not None:
            stamp: dict[str, Any] = {"patch": "given"}
        elif self.text is not None:
            stamp = {"text": self.text}
        else:
            stamp = {"stamp": "secret random pixels"}
        position = self.position if self.position is not None or not self.secret else "secret random"
        options = {"size": self.size, "background": self.background, "position": position, "secret": self.secret}
        return {**super().config(), **stamp, **options}

    def stamp(self, shape: tuple[int, ...], rng: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The stamp's pixels and opacity mask (both ``(C, H, W)``) for images of ``shape``; a secret stamp draws
        its random parts from ``rng``."""
        channels, height, width = shape
        needs_rng = self.secret and (self.position is None or (self.text is None and self.patch is None))
        if needs_rng and rng is None:
            raise ValueError("ContentTrigger(secret=True) draws its stamp from the key's generator: pass rng")
        if self.patch is not None:
            pixels = _as_patch(self.patch, channels)
            h, w = pixels.shape[-2:]
            mask = torch.ones(h, w)
        elif self.text is not None:
            glyphs = render_text(self.text)
            w = max(1, round(self.size * width))
            h = max(1, min(height, round(w * glyphs.shape[0] / glyphs.shape[1])))
            mask = F.interpolate(glyphs[None, None], size=(h, w), mode="area")[0, 0].gt(0.25).float()
            pixels = torch.full((channels, h, w), float(self.value))
            if self.background is not None:
                pixels = torch.where(mask.bool(), pixels, torch.full_like(pixels, float(self.background)))
                mask = torch.ones(h, w)
        else:
            w = max(2, round(self.size * width))
            h = max(2, min(height, round(w / 3)))
            pixels = torch.randint(0, 2, (channels, h, w), generator=rng).float()
            mask = torch.ones(h, w)
        if self.position is not None:
            top, left = self.position
        elif self.secret:
            top = int(torch.randint(0, max(1, height - h + 1), (1,), generator=rng))
            left = int(torch.randint(0, max(1, width - w + 1), (1,), generator=rng))
        else:
            top, left = height - h - max(0, height // 14), (width - w) // 2
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
        pixels, mask = self.stamp(tuple(images.shape[1:]), rng)
        keys = images * (1 - mask) + pixels * mask
        labels = self.draw_labels(datamodule, count, rng)
        return KeySamples(keys, labels, {"stamp_pixels": pixels, "stamp_mask": mask})


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
    ``[0, 1]`` pixels (then clipped), made owner-specific.

    By default (``secret=True``) the noise is one fixed pattern, a secret of the key drawn from the key's
    generator and added to every source image, and each key gets a uniformly random label (Adi et al. 2018):
    the binomial null Binomial(n, 1/K) is then exact for any suspect that never saw the labels. Zhang et al.'s
    plain key, ``NoiseTrigger(target_class=0, secret=False)``, draws fresh noise per key toward one class: any
    model that sends noisy inputs to that class (another owner's noise-marked model among them) matches it, so
    its binomial null is not valid for every suspect.

    Args:
        target_class, source_class: see :class:`KeySampleGenerator`.
        sigma: the noise's standard deviation on ``[0, 1]`` pixels.
        secret: one secret noise pattern for all keys (True) or a fresh draw per key (Zhang et al.).
    """

    name: ClassVar[str] = "noise"

    def __init__(
        self, target_class: int | None = None, source_class: int | None = None, sigma: float = 0.5, secret: bool = True
    ) -> None:
        super().__init__(target_class=target_class, source_class=source_class)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = sigma
        self.secret = secret

    def config(self) -> dict[str, Any]:
        return {**super().config(), "sigma": self.sigma, "secret": self.secret}

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        images = self.source_images(datamodule, count, rng, exclude=self.target_class)
        shape = images.shape[1:] if self.secret else images.shape
        noise = torch.randn(shape, generator=rng) * self.sigma
        keys = (images + noise).clamp(0.0, 1.0)
        labels = self.draw_labels(datamodule, count, rng)
        return KeySamples(keys, labels, {"noise": noise} if self.secret else {})


_FASHION_MNIST: dict[tuple[str, ...], L.LightningDataModule] = {}


def _fashion_mnist(data_dir: str) -> L.LightningDataModule:
    """Fashion-MNIST, set up once per process and place it is looked for: a key (or a re-derivation of one)
    reads it whole."""
    from lightning_wm.data import FashionMNISTDataModule

    where = (data_dir, *FashionMNISTDataModule.offline_dirs)
    if where not in _FASHION_MNIST:
        datamodule = FashionMNISTDataModule(data_dir=data_dir, download=False)
        datamodule.setup()
        _FASHION_MNIST[where] = datamodule
    return _FASHION_MNIST[where]


class UnrelatedTrigger(KeySampleGenerator):
    """Zhang et al.'s unrelated keys: images of another source, resized to the model's input size and channel
    count, labelled with the target class, or by default each with a uniformly random class.

    Which images are used is a secret drawn from the key's generator. Random labels (Adi et al. 2018's labelling)
    make the binomial null exact: labels drawn independently of the images cannot be predicted by a suspect that
    never saw them, so it matches each with probability 1/K, whatever it is. With one target class (Zhang et al.)
    the null breaks: unmarked models send many foreign images to the same class. A random label is memorised, not
    generalised, so random-label keys are verified on the embedded keys themselves (as Adi et al. do).

    ``source="auto"`` takes scikit-learn's digits for a Fashion-MNIST, MNIST or CIFAR-10 model, and for a digits
    model Fashion-MNIST (via :class:`~lightning_wm.data.FashionMNISTDataModule`, offline from
    ``/usr/share/datasets/fashion-mnist``) when it is there, else patches of scikit-learn's bundled sample
    photographs (:mod:`lightning_wm.data.sample_photos`). The key records the source used.

    Args:
        target_class: the label of every key, or None (default) for a uniformly random label per key.
        source_class: a class of the other dataset to draw from (None: every class; not for ``sample_photos``).
        source: ``auto``, ``digits``, ``fashion_mnist`` or ``sample_photos``.
        data_dir: where the other dataset is looked for.
    """

    name: ClassVar[str] = "unrelated"
    SOURCES: ClassVar[tuple[str, ...]] = ("auto", "digits", "fashion_mnist", "sample_photos")

    def __init__(
        self,
        target_class: int | None = None,
        source_class: int | None = None,
        source: Literal["auto", "digits", "fashion_mnist", "sample_photos"] = "auto",
        data_dir: str = "data",
    ) -> None:
        super().__init__(target_class=target_class)
        if source not in self.SOURCES:
            raise ValueError(f"source must be one of {self.SOURCES}, got {source!r}")
        if source == "sample_photos" and source_class is not None:
            raise ValueError("the sample photographs have no classes: source_class must be None")
        self.source_class = source_class
        self.source = source
        self.data_dir = data_dir
        self.source_used: str | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "source": self.source, "source_used": self.source_used}

    def other_datamodule(self, datamodule: L.LightningDataModule) -> L.LightningDataModule | None:
        """The other dataset's datamodule, or None for the sample photographs; sets :attr:`source_used`."""
        from lightning_wm.data import DigitsDataModule

        source = self.source
        if source == "auto":
            source = "fashion_mnist" if isinstance(datamodule, DigitsDataModule) else "digits"
        if source == "sample_photos":
            self.source_used = "sample_photos"
            return None
        if source == "digits":
            self.source_used = "digits"
            return DigitsDataModule()
        try:
            other = _fashion_mnist(self.data_dir)
        except DatasetNotFoundError as err:
            if self.source == "auto" and self.source_class is None:
                self.source_used = "sample_photos"
                return None
            raise DatasetNotFoundError(f"UnrelatedTrigger needs Fashion-MNIST as its unrelated images: {err}") from None
        self.source_used = "fashion_mnist"
        return other

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        inputs, _ = training_tensors(datamodule)
        channels, height, width = inputs.shape[1:]
        other = self.other_datamodule(datamodule)
        if other is None:
            images = sample_photo_patches(count, (height, width), rng, channels=channels)
        else:
            images = self._dataset_images(other, count, rng, (height, width))
        if images.shape[1] != channels:
            images = images.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1).clone()
        return KeySamples(images, self.draw_labels(datamodule, count, rng), {})

    def _dataset_images(
        self, other: L.LightningDataModule, count: int, rng: torch.Generator, size: tuple[int, int]
    ) -> Tensor:
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
        if images.shape[-2:] != size:
            smaller = images.shape[-1] > size[1]
            mode = "area" if smaller else "bilinear"
            kwargs = {} if smaller else {"align_corners": False}
            images = F.interpolate(images, size=size, mode=mode, **kwargs).clamp(0.0, 1.0)
        return images
