"""Uchida et al., "Embedding Watermarks into Deep Neural Networks", ICMR 2017 (arXiv 1701.04082).

A white-box watermark: a regularizer λ·Σ_j BCE(σ(X·w̄)_j, b_j) makes the filter-averaged weights w̄ of one
layer carry T secret bits b under a secret projection X; verification reads the bits back and counts errors.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_wm.registry import SchemeSpec
from lightning_wm.verify.blackbox import Suspect, white_box_module
from lightning_wm.verify.derive import derived_rng
from lightning_wm.verify.keys import WatermarkKey
from lightning_wm.verify.stats import binomial_log10_p_value, binomial_threshold
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.base import MissingLayerError, WatermarkScheme, logs_this_step, resolve_layer

Projection = Literal["random", "direct", "diff"]


def filter_mean(weight: Tensor) -> Tensor:
    """w̄: the layer's weight averaged over output filters, flattened (``conv.weight.mean(0).flatten()``)."""
    return weight.float().mean(dim=0).flatten()


def projection_bce(projection: Tensor, target: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The embedding loss Σ_j BCE(σ(X·w̄)_j, b_j), in fp32 outside autocast, and the bit error rate it leaves."""
    with torch.autocast(weight.device.type, enabled=False):
        logits = projection @ filter_mean(weight)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    with torch.no_grad():
        ber = ((logits >= 0).float() != target).float().mean()
    return loss, ber


def make_projection(kind: Projection, bits: int, size: int, rng: torch.Generator) -> Tensor:
    """The secret matrix X (T×M) of the three types of the authors' code (papers.md §1.2)."""
    if kind == "random":
        return torch.randn(bits, size, generator=rng)
    if kind not in ("direct", "diff"):
        raise ValueError(f"projection must be 'random', 'direct' or 'diff', got {kind!r}")
    needed = bits if kind == "direct" else 2 * bits
    if needed > size:
        raise ValueError(f"projection {kind!r} needs {needed} distinct weights, the layer has {size}")
    index = torch.randperm(size, generator=rng)[:needed]
    x = torch.zeros(bits, size)
    rows = torch.arange(bits)
    x[rows, index[:bits]] = 1.0
    if kind == "diff":
        x[rows, index[bits:]] = -1.0
    return x


def align_input_channels(weight: Tensor, projection: Tensor, message: Tensor) -> Tensor:
    """The order of the suspect layer's input channels that best fits the key: ``weight[:, order]`` is the aligned
    weight, undoing a permutation of the previous layer's outputs (``lightning_wm.attacks.permutation``).

    The key holds no original weights, only X and b, so the order is the assignment that maximises the summed
    signed margins ``Σ_j (2b_j - 1)·(X·w̄)_j``: linear in the assignment (each key position c scores a suspect
    channel d by ``<Σ_j (2b_j - 1)·X_{j,c}, w̄_d>``), solved exactly by the Hungarian method. The order is chosen
    with the message, so bits read after it are not Binomial(T, 1/2) under the null: a p-value must be corrected
    for the search (``UchidaKey.verify(align=True)`` multiplies by the C! orders).
    """
    from scipy.optimize import linear_sum_assignment

    channels = weight.shape[1]
    w_bar = filter_mean(weight.detach()).reshape(channels, -1).cpu().double()
    signs = 2.0 * message.double() - 1.0
    pull = (signs @ projection.double().cpu()).reshape(channels, -1)
    _, order = linear_sum_assignment((pull @ w_bar.T).numpy(), maximize=True)
    return torch.as_tensor(order, dtype=torch.long)


class UchidaKey(WatermarkKey):
    """The projection X, the message b and the layer they read."""

    scheme = "uchida"

    def extract(self, suspect: nn.Module, layer: str | None = None) -> Tensor:
        """The bits the suspect's layer carries under X (white-box)."""
        suspect = white_box_module(suspect, self.scheme)
        name = layer or self.config["layer"]
        weight = resolve_layer(suspect, name).weight
        expected = tuple(self.config["weight_shape"])
        if tuple(weight.shape[1:]) != expected[1:]:
            raise MissingLayerError(
                f"layer {name!r} of the suspect has weight shape {tuple(weight.shape)}, the key reads a layer of "
                f"shape (*, {', '.join(map(str, expected[1:]))}); name the matching layer with layer="
            )
        projection = self.tensors["projection"]
        with torch.no_grad():
            return (projection.to(weight.device) @ filter_mean(weight) >= 0).long().cpu()

    def derivation_problems(self, datamodule: Any = None) -> list[str]:
        """X, and b unless the owner gave the message, re-drawn from the key's secret as ``make_key`` drew them."""
        rng = derived_rng(self.secret, f"{self.scheme}/key")  # type: ignore[arg-type]
        bits, size = len(self.tensors["message"]), math.prod(self.config["weight_shape"][1:])
        problems = []
        if not torch.equal(make_projection(self.config["projection"], bits, size, rng), self.tensors["projection"]):
            problems.append("projection")
        message = torch.randint(0, 2, (bits,), generator=rng)
        if self.config.get("message") == "derived" and not torch.equal(message, self.tensors["message"]):
            problems.append("message")
        return problems

    def verify(self, suspect: Suspect, alpha: float = 0.01, layer: str | None = None, align: bool = False) -> Verdict:
        """Bit errors of the suspect's layer against the message, binomial p-value.

        ``align=True`` first reorders the layer's input channels by :func:`align_input_channels` (a suspect whose
        previous layer's outputs were permuted) and corrects the p-value for that search by a union bound over
        the ``C!`` orders of C input channels: ``p ≤ C!·P[Bin(T, 1/2) ≥ matches]``, so an aligned read can only
        be declared when T bits carry more than ``log10(C!)`` orders of evidence.
        """
        bits = self.extract(suspect, layer)  # type: ignore[arg-type]
        message = self.tensors["message"].long()
        total = len(message)
        details: dict[str, Any] = {"layer": layer or self.config["layer"]}
        log10_search = 0.0
        if align:
            weight = resolve_layer(white_box_module(suspect, self.scheme), details["layer"]).weight.detach()  # type: ignore[arg-type]
            order = align_input_channels(weight, self.tensors["projection"], message).to(weight.device)
            with torch.no_grad():
                read = self.tensors["projection"].to(weight.device) @ filter_mean(weight[:, order])
            bits = (read >= 0).long().cpu()
            log10_search = math.lgamma(weight.shape[1] + 1) / math.log(10)
            details.update(aligned=True, log10_orders_searched=log10_search)
        errors = int((bits != message).sum())
        if align:
            level = math.log10(alpha) - log10_search
            max_errors = next(
                (e for e in range(total, -1, -1) if binomial_log10_p_value(total - e, total, 0.5) < level), -1
            )
        else:
            max_errors = total - binomial_threshold(total, 0.5, alpha)
        return Verdict.decide(
            scheme=self.scheme,
            statistic=errors / total,
            statistic_name="ber",
            log10_p=binomial_log10_p_value(total - errors, total, 0.5) + log10_search,
            alpha=alpha,
            threshold=max_errors / total,
            higher_is_watermarked=False,
            queries=0,
            null="each bit of an unmarked layer matches with probability 1/2 (binomial)"
            + (", union bound over the C! input-channel orders searched" if align else ""),
            details={"bits": total, "errors": errors, **details},
        )


class ProjectedWeightWatermark(WatermarkScheme):
    """The embedding Uchida et al. (ICMR 2017) and DeepMarks (Chen et al., ICMR 2019) share: the loss term
    λ·Σ_j BCE(σ(X·w̄)_j, b_j) on one layer's filter-averaged weights w̄, in fp32 outside autocast, logged as
    ``wm/<name>/ber``. The key holds X (``projection``) and the layer's name and shape; subclasses say which bits
    b are embedded (:meth:`target_bits`)."""

    def __init__(
        self, layer: str, strength: float, key_path: str | None, seed: int | None, alpha: float, name: str | None
    ) -> None:
        super().__init__(key_path=key_path, seed=seed, alpha=alpha, name=name)
        self.layer = layer
        self.strength = strength
        self._projection: Tensor | None = None
        self._target: Tensor | None = None
        self._layer: nn.Module | None = None

    def target_bits(self) -> Tensor:
        """The bits b this fit embeds, from the key."""
        raise NotImplementedError

    def on_key_ready(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._layer = resolve_layer(pl_module, self.key.config["layer"])
        if list(self._layer.weight.shape) != list(self.key.config["weight_shape"]):
            raise ValueError(
                f"the key reads a layer of shape {self.key.config['weight_shape']}, "
                f"layer {self.key.config['layer']!r} has shape {list(self._layer.weight.shape)}"
            )
        self._projection = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._layer = None

    def training_loss(self, pl_module: L.LightningModule, batch: Any, output: Any) -> Tensor:
        if self._layer is None:
            self._layer = resolve_layer(pl_module, self.key.config["layer"])
        weight = self._layer.weight
        if self._projection is None or self._projection.device != weight.device:
            self._projection = self.key.tensors["projection"].float().to(weight.device)
            self._target = self.target_bits().float().to(weight.device)
        loss, ber = projection_bce(self._projection, self._target, weight)
        if logs_this_step(pl_module):
            pl_module.log(f"wm/{self.name}/ber", ber, on_step=True, on_epoch=False, prog_bar=True)
        return self.strength * loss


class UchidaWatermark(ProjectedWeightWatermark):
    """Embed T bits into one conv/linear layer's weights with a regularizer (Uchida et al., ICMR 2017).

    Adds λ·Σ_j BCE(σ(X·w̄)_j, b_j) to the loss (a sum over bits, as the authors' code does), computed in fp32
    outside autocast. The three embedding situations of the paper are three configs of the same callback: from
    scratch, while fine-tuning a trained model (``ckpt`` given to the model), and while distilling a teacher
    (the module trained on soft labels); see ``configs/*/uchida*.yaml``. Logs ``wm/uchida/ber`` every step.

    How fast the bits embed depends on T/M, M being the layer's weights per filter (in_channels × kernel area):
    the paper has T/M = 256/576; SmallCNN's ``conv3`` (M = 576 at width 32) embeds 256 bits in about a hundred
    Adam steps at λ = 0.01, its ``conv2`` (M = 288) needs several times more, and a warning is given above
    T/M = 1/2.

    Args:
        layer: the layer to mark, a name from ``named_modules()`` (``conv3`` or ``backbone.conv3``).
        bits: T, the message length.
        strength: λ.
        projection: ``random`` (recommended), ``direct`` (one weight per bit) or ``diff`` (sign of a difference).
        message: the bits as a string of 0/1 of length ``bits``; random (from ``seed``) when None.
        key_path, seed, alpha, name: see :class:`~lightning_wm.watermarks.base.WatermarkScheme`.
    """

    key_scheme = "uchida"

    def __init__(
        self,
        layer: str = "conv3",
        bits: int = 256,
        strength: float = 0.01,
        projection: Projection = "random",
        message: str | None = None,
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
        name: str | None = None,
    ) -> None:
        super().__init__(layer, strength, key_path, seed, alpha, name)
        if bits < 1:
            raise ValueError(f"bits must be positive, got {bits}")
        if projection not in ("random", "direct", "diff"):
            raise ValueError(f"projection must be 'random', 'direct' or 'diff', got {projection!r}")
        if message is not None and (len(message) != bits or set(message) - {"0", "1"}):
            raise ValueError(f"message must be a string of {bits} characters 0/1")
        self.bits = bits
        self.projection = projection
        self.message = message

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> UchidaKey:
        weight = resolve_layer(pl_module, self.layer).weight
        rng = self.key_rng()
        size = weight[0].numel()
        if 2 * self.bits > size:
            rank_zero_warn(
                f"UchidaWatermark: T={self.bits} bits in layer {self.layer!r} with M={size} filter-averaged weights; "
                "with T/M above 1/2 embedding slows down sharply (the paper uses T=256, M=576): choose a wider "
                "layer or fewer bits"
            )
        projection = make_projection(self.projection, self.bits, size, rng)
        if self.message is None:
            message = torch.randint(0, 2, (self.bits,), generator=rng)
        else:
            message = torch.tensor([int(c) for c in self.message])
        config = {
            "layer": self.layer,
            "weight_shape": list(weight.shape),
            "projection": self.projection,
            "message": "derived" if self.message is None else "given",
        }
        return UchidaKey(config, {"projection": projection, "message": message})

    def target_bits(self) -> Tensor:
        return self.key.tensors["message"]


SCHEME = SchemeSpec(
    name="uchida",
    callback=UchidaWatermark,
    key=UchidaKey,
    higher_is_watermarked=False,
    access="weights",
    example=lambda seed=None, key_path=None: UchidaWatermark(
        layer="conv2", bits=64, strength=0.1, seed=seed, key_path=key_path
    ),
)
"""Uchida's registry entry (entry point ``uchida`` of ``lightning_wm.schemes``)."""
