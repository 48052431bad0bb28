"""Input-preprocessing removal attacks: the stolen model is served behind a transform of every query (the SoK's
"input preprocessing" family, Lukas et al., "SoK: How Robust is Image Classification Deep Neural Network
Watermarking?", S&P 2022).

The transform is meant to wash out what a key sample carries (a trigger pattern, an adversarial perturbation)
while a clean input keeps its class: JPEG compression, input quantization, mean / median / Gaussian smoothing,
Gaussian input noise, a horizontal flip, feature squeezing (Xu et al., "Feature Squeezing: Detecting Adversarial
Examples in Deep Neural Networks", NDSS 2018), random occlusion and an autoencoder's reconstruction. Nothing is
trained except the autoencoder, and the victim's weights are never handed over: the thief serves an API, so a
white-box key raises :class:`~lightning_wm.verify.NotApplicable` on these attacks.

The math is in pure functions on images in ``[0, 1]`` (``NCHW`` floats), beside the thin attack classes that move
the normalised model inputs of a :class:`~lightning_wm.data.base.SplitDataModule` to pixels and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchvision.io import decode_jpeg, encode_jpeg

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim
from lightning_wm.attacks.evasion import ConvAutoencoder
from lightning_wm.models.hidden import HiddenModule
from lightning_wm.registry import AttackSpec

SmoothingKind = Literal["mean", "median", "gaussian"]

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

# ---------------------------------------------------------------------------------------------------------------
# Pure transforms of images in [0, 1]


def jpeg(pixels: Tensor, quality: int) -> Tensor:
    """JPEG-compress and decompress each image at ``quality`` (1-100) through torchvision's codec, on 8-bit
    pixels."""
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    decoded = decode_jpeg(encode_jpeg(list(images), quality=quality))
    return torch.stack(decoded).to(pixels.device, pixels.dtype) / 255


def quantize(pixels: Tensor, bits: int) -> Tensor:
    """Round each pixel to one of ``2**bits`` evenly spaced levels of ``[0, 1]`` (bit-depth reduction)."""
    levels = 2**bits - 1
    return (pixels.clamp(0, 1) * levels).round() / levels


def _reflect(x: Tensor, kernel_size: int) -> Tensor:
    """Reflect-pad for a ``kernel_size`` window centred on each pixel (the extra pixel of an even window goes right
    and below)."""
    before, after = (kernel_size - 1) // 2, kernel_size // 2
    mode = "reflect" if max(before, after) < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (before, after, before, after), mode=mode)


def mean_blur(x: Tensor, kernel_size: int) -> Tensor:
    """Each pixel replaced by the mean of its ``kernel_size`` × ``kernel_size`` window (box filter)."""
    return F.avg_pool2d(_reflect(x, kernel_size), kernel_size, stride=1)


def median_blur(x: Tensor, kernel_size: int) -> Tensor:
    """Each pixel replaced by the median of its ``kernel_size`` × ``kernel_size`` window (the lower median of an
    even window, as Xu et al.'s 2 × 2 filter)."""
    windows = _reflect(x, kernel_size).unfold(-2, kernel_size, 1).unfold(-2, kernel_size, 1)
    return windows.flatten(-2).median(dim=-1).values


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int | None = None) -> Tensor:
    """Gaussian smoothing at ``sigma`` pixels; the kernel spans ±3σ unless ``kernel_size`` (odd) is given."""
    size = kernel_size or 2 * max(1, round(3 * sigma)) + 1
    return TF.gaussian_blur(x, kernel_size=[size, size], sigma=[sigma, sigma])


def gaussian_noise(pixels: Tensor, sigma: float) -> Tensor:
    """Additive Gaussian noise of standard deviation ``sigma`` (in pixel units), clipped to ``[0, 1]``."""
    return TF.gaussian_noise(pixels, mean=0.0, sigma=sigma, clip=True)


def horizontal_flip(x: Tensor) -> Tensor:
    """Mirror each image left to right (an involution)."""
    return TF.horizontal_flip(x)


def feature_squeeze(pixels: Tensor, bits: int, kernel_size: int) -> Tensor:
    """Xu et al.'s squeezers in sequence: bit-depth reduction to ``bits`` then median smoothing."""
    squeezed = quantize(pixels, bits)
    return median_blur(squeezed, kernel_size) if kernel_size > 1 else squeezed


def occlude(x: Tensor, size: float, fill: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Set one random square per image, of side ``size`` × the image side, to ``fill``."""
    height, width = x.shape[-2:]
    side_h, side_w = max(1, round(size * height)), max(1, round(size * width))
    top = torch.randint(0, height - side_h + 1, (len(x), 1, 1), generator=generator).to(x.device)
    left = torch.randint(0, width - side_w + 1, (len(x), 1, 1), generator=generator).to(x.device)
    rows = torch.arange(height, device=x.device).view(1, -1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, -1)
    patch = (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
    return x.masked_fill(patch.unsqueeze(1), fill)


# ---------------------------------------------------------------------------------------------------------------
# The attacks


def statistics(datamodule: Any) -> dict[str, list[float]]:
    """``mean`` and ``std`` per channel of a :class:`~lightning_wm.data.base.SplitDataModule`'s normalisation
    (read through its ``denormalize``), as the keyword arguments of the attacks that work on pixels."""
    channels = int(datamodule.input_shape[0])
    mean = datamodule.denormalize(torch.zeros(channels, 1, 1))
    std = datamodule.denormalize(torch.ones(channels, 1, 1)) - mean
    return {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}


def _digits_statistics() -> dict[str, list[float]]:
    from lightning_wm.data import DigitsDataModule

    return statistics(DigitsDataModule())


class InputTransformAttack(RemovalAttack):
    """Serve the victim behind a transform of every query: ``attack(x)`` is the victim's logits on
    ``transform(x)``.

    The base of the input-preprocessing attacks. The victim is held outside the attack's parameters and
    checkpoints (an API serves it; its weights are never handed over, so ``exposes_weights`` is False and a
    white-box key raises :class:`~lightning_wm.verify.NotApplicable`): a copy of a model, or, when the victim is
    another attack (a :class:`~lightning_wm.attacks.ChainAttack`'s previous part), that attack itself. The model
    inputs are normalised; a transform on pixels moves them to ``[0, 1]`` with the data's ``mean`` and ``std``,
    given or taken from the Trainer's :class:`~lightning_wm.data.base.SplitDataModule` at ``setup``. Serving
    costs no training epochs and no queries; ``test`` logs ``test/acc`` on transformed test images (the accuracy
    cost). Only transforms that learn (the autoencoder) have parameters; without them ``fit`` needs no optimizer.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier``, a backbone or an attack.
        mean: per-channel mean of the training images in ``[0, 1]`` (the datamodule's normalisation).
        std: per-channel standard deviation of the training images.
        optimizer: optimizer factory of a transform that learns.
        lr_scheduler: optional scheduler factory.
    """

    exposes_weights = False

    def __init__(
        self,
        victim: Victim,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (then they come from the datamodule at setup)")
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "autoencoder", "optimizer", "lr_scheduler"])
        held = victim if isinstance(victim, RemovalAttack) else copy_victim(victim)
        self._victim = HiddenModule(held)
        self.register_buffer("mean", None if mean is None else _channels(mean), persistent=False)
        self.register_buffer("std", None if std is None else _channels(std), persistent=False)

    @property
    def model(self) -> nn.Module:  # type: ignore[override]
        """The served model (this module): the victim behind the transform."""
        return self

    def transform(self, x: Tensor) -> Tensor:
        """The served query for the model input ``x`` (identity here; each attack overrides it)."""
        return x

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self._victim(self.transform(x))

    def to_pixels(self, x: Tensor) -> Tensor:
        """Model inputs as images in ``[0, 1]`` (clipped)."""
        mean, std = self._statistics(x)
        return (x * std + mean).clamp(0, 1)

    def from_pixels(self, pixels: Tensor) -> Tensor:
        """Images in ``[0, 1]`` as model inputs."""
        mean, std = self._statistics(pixels)
        return (pixels - mean) / std

    def _statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError(
                f"{type(self).__name__} works on pixels and needs the data's normalisation: give mean= and std= "
                "(lightning_wm.attacks.input_transform.statistics(datamodule)) or run it through a Trainer with a "
                "lightning_wm SplitDataModule"
            )
        return self.mean.to(x), self.std.to(x)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None)
        if self.mean is None and hasattr(datamodule, "denormalize"):
            stats = statistics(datamodule)
            self.mean, self.std = _channels(stats["mean"]), _channels(stats["std"])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return None

    def configure_optimizers(self) -> Any:
        return super().configure_optimizers() if self.trainable_parameters() else None


def _channels(values: Sequence[float]) -> Tensor:
    return torch.as_tensor(list(values), dtype=torch.float32).view(-1, 1, 1)


class JpegAttack(InputTransformAttack):
    """JPEG compression of every query at ``quality`` (1-100; lower removes more). See
    :class:`InputTransformAttack` for ``victim``, ``mean`` and ``std``."""

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The JPEG quality: lower washes out more of a trigger and costs more accuracy."""
        from optuna.distributions import IntDistribution

        return {"quality": IntDistribution(5, 95)}

    def __init__(
        self,
        victim: Victim,
        quality: int = 50,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        super().__init__(victim, mean, std)
        self.quality = quality

    def transform(self, x: Tensor) -> Tensor:
        return self.from_pixels(jpeg(self.to_pixels(x), self.quality))


class QuantizationAttack(InputTransformAttack):
    """Input quantization: every query's pixels rounded to ``2**bits`` levels. See :class:`InputTransformAttack`
    for ``victim``, ``mean`` and ``std``."""

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The bit depth: fewer bits wash out more and cost more."""
        from optuna.distributions import IntDistribution

        return {"bits": IntDistribution(1, 8)}

    def __init__(
        self,
        victim: Victim,
        bits: int = 4,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if not 1 <= bits <= 16:
            raise ValueError(f"bits must be in [1, 16], got {bits}")
        super().__init__(victim, mean, std)
        self.bits = bits

    def transform(self, x: Tensor) -> Tensor:
        return self.from_pixels(quantize(self.to_pixels(x), self.bits))


class SmoothingAttack(InputTransformAttack):
    """Input smoothing: a mean or median filter of ``kernel_size``, or a Gaussian filter of ``sigma`` pixels. The
    filters commute with the per-channel normalisation, so they run on the model inputs.

    Args:
        victim: see :class:`InputTransformAttack`.
        kind: ``mean``, ``median`` or ``gaussian``.
        kernel_size: window side of the mean and median filters; for ``gaussian``, the kernel side (odd;
            default ±3σ).
        sigma: standard deviation of the Gaussian filter, in pixels.
    """

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The filter and the Gaussian's σ (the mean and median filters at their 3 × 3 default)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        return {"kind": CategoricalDistribution(["mean", "median", "gaussian"]), "sigma": FloatDistribution(0.3, 2.0)}

    def __init__(
        self, victim: Victim, kind: SmoothingKind = "gaussian", kernel_size: int | None = None, sigma: float = 1.0
    ) -> None:
        if kind not in ("mean", "median", "gaussian"):
            raise ValueError(f"kind must be 'mean', 'median' or 'gaussian', got {kind!r}")
        if kernel_size is not None and kernel_size < 1:
            raise ValueError(f"kernel_size must be positive, got {kernel_size}")
        if kind == "gaussian" and (sigma <= 0 or (kernel_size is not None and kernel_size % 2 == 0)):
            raise ValueError(f"gaussian smoothing needs sigma > 0 and an odd kernel_size, got {sigma}, {kernel_size}")
        super().__init__(victim)
        self.kind = kind
        self.kernel_size = kernel_size
        self.sigma = sigma

    def transform(self, x: Tensor) -> Tensor:
        if self.kind == "gaussian":
            return gaussian_blur(x, self.sigma, self.kernel_size)
        blur = mean_blur if self.kind == "mean" else median_blur
        return blur(x, self.kernel_size or 3)


class InputNoiseAttack(InputTransformAttack):
    """Gaussian noise of ``sigma`` (pixel units, clipped to ``[0, 1]``) added to every query, freshly drawn for
    each. See :class:`InputTransformAttack` for ``victim``, ``mean`` and ``std``."""

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The noise's standard deviation in pixel units."""
        from optuna.distributions import FloatDistribution

        return {"sigma": FloatDistribution(0.01, 0.5, log=True)}

    def __init__(
        self,
        victim: Victim,
        sigma: float = 0.1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if sigma < 0:
            raise ValueError(f"sigma must be non-negative, got {sigma}")
        super().__init__(victim, mean, std)
        self.sigma = sigma

    def transform(self, x: Tensor) -> Tensor:
        return self.from_pixels(gaussian_noise(self.to_pixels(x), self.sigma))


class FlipAttack(InputTransformAttack):
    """Every query mirrored left to right before the victim answers. See :class:`InputTransformAttack`."""

    def transform(self, x: Tensor) -> Tensor:
        return horizontal_flip(x)


class FeatureSqueezingAttack(InputTransformAttack):
    """Feature squeezing (Xu et al., NDSS 2018) as a preprocessing defence turned removal attack: bit-depth
    reduction to ``bits`` then a ``kernel_size`` median filter (their MNIST setting: 1 bit, 2 × 2). See
    :class:`InputTransformAttack` for ``victim``, ``mean`` and ``std``."""

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The bit depth and the median filter's side (1: none)."""
        from optuna.distributions import IntDistribution

        return {"bits": IntDistribution(1, 8), "kernel_size": IntDistribution(1, 3)}

    def __init__(
        self,
        victim: Victim,
        bits: int = 1,
        kernel_size: int = 2,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if not 1 <= bits <= 16:
            raise ValueError(f"bits must be in [1, 16], got {bits}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be positive, got {kernel_size}")
        super().__init__(victim, mean, std)
        self.bits = bits
        self.kernel_size = kernel_size

    def transform(self, x: Tensor) -> Tensor:
        return self.from_pixels(feature_squeeze(self.to_pixels(x), self.bits, self.kernel_size))


class OcclusionAttack(InputTransformAttack):
    """Random occlusion: one random square of side ``size`` × the image side per query set to the data's mean
    (0 in the normalised input space), a new position for every query.

    Args:
        victim: see :class:`InputTransformAttack`.
        size: side of the patch as a share of the image side, in (0, 1].
    """

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The patch side, as a share of the image side."""
        from optuna.distributions import FloatDistribution

        return {"size": FloatDistribution(0.1, 0.6)}

    def __init__(self, victim: Victim, size: float = 0.25) -> None:
        if not 0.0 < size <= 1.0:
            raise ValueError(f"size must be in (0, 1], got {size}")
        super().__init__(victim)
        self.size = size

    def transform(self, x: Tensor) -> Tensor:
        return occlude(x, self.size)


class AutoencoderAttack(InputTransformAttack):
    """Every query replaced by an autoencoder's reconstruction, the autoencoder trained on the attacker's clean
    data (mean squared error, model-input space): what it cannot reconstruct (an off-distribution trigger) it
    washes out. ``fit`` trains the autoencoder; the victim and its weights are untouched and never saved.

    Args:
        victim: see :class:`InputTransformAttack`.
        autoencoder: input → reconstruction; default a :class:`~lightning_wm.attacks.evasion.ConvAutoencoder`.
        in_channels: image channels of the default autoencoder; default: those of the victim's first conv, else 1.
        width: hidden channels of the default autoencoder.
        code: code channels (at a quarter of the resolution) of the default autoencoder.
        optimizer: optimizer factory of the autoencoder.
        lr_scheduler: optional scheduler factory.
    """

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """The code's channels, the training epochs and the learning rate of the autoencoder."""
        from optuna.distributions import FloatDistribution, IntDistribution

        return {
            "code": IntDistribution(4, 32, log=True),
            "epochs": IntDistribution(1, 30),
            "lr": FloatDistribution(1e-4, 1e-2, log=True),
        }

    def __init__(
        self,
        victim: Victim,
        autoencoder: nn.Module | None = None,
        in_channels: int | None = None,
        width: int = 32,
        code: int = 16,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(victim, optimizer=optimizer, lr_scheduler=lr_scheduler)
        if autoencoder is None:
            if in_channels is None:
                convs = [m for m in self._victim.module.modules() if isinstance(m, nn.Conv2d)]
                in_channels = convs[0].in_channels if convs else 1
            autoencoder = ConvAutoencoder(in_channels, width, code)
        self.autoencoder = autoencoder

    def transform(self, x: Tensor) -> Tensor:
        return self.autoencoder(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0]
        loss = F.mse_loss(self.autoencoder(x), x)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.autoencoder.parameters())


def _spec(name: str, attack: type, example: Any, example_epochs: int = 0) -> AttackSpec:
    return AttackSpec(
        name=name,
        attack=attack,
        threat_model="api-side",
        category="input preprocessing",
        example=example,
        example_epochs=example_epochs,
    )


JPEG = _spec("jpeg", JpegAttack, lambda victim: JpegAttack(victim, quality=50, **_digits_statistics()))
QUANTIZATION = _spec(
    "input_quantization", QuantizationAttack, lambda victim: QuantizationAttack(victim, bits=4, **_digits_statistics())
)
SMOOTHING = _spec("smoothing", SmoothingAttack, lambda victim: SmoothingAttack(victim, kind="gaussian", sigma=1.0))
INPUT_NOISE = _spec(
    "input_noise", InputNoiseAttack, lambda victim: InputNoiseAttack(victim, sigma=0.1, **_digits_statistics())
)
FLIP = _spec("flip", FlipAttack, lambda victim: FlipAttack(victim))
FEATURE_SQUEEZING = _spec(
    "feature_squeezing",
    FeatureSqueezingAttack,
    lambda victim: FeatureSqueezingAttack(victim, bits=1, kernel_size=2, **_digits_statistics()),
)
OCCLUSION = _spec("occlusion", OcclusionAttack, lambda victim: OcclusionAttack(victim, size=0.25))
AUTOENCODER = _spec(
    "autoencoder",
    AutoencoderAttack,
    lambda victim: AutoencoderAttack(victim, optimizer=partial(torch.optim.Adam, lr=2e-3)),
    example_epochs=1,
)
"""The registry entries (entry points of ``lightning_wm.attacks``, one per attack)."""
