"""Rouhani et al., "DeepSigns: An End-to-End Watermarking Framework for Ownership Protection of Deep Neural
Networks", ASPLOS 2019 (arXiv 1804.00750).

A white-box watermark in the activations rather than the weights: the mean activation μ of one layer over secret
trigger inputs (a random subset of the owner's training images of chosen classes) is pushed by a loss term
λ·Σ_j BCE(σ(A·μ)_j, b_j) to carry T secret bits b under a secret random projection A. Verification feeds the
trigger inputs to the suspect's weights (white-box: the activations are read, not the outputs), extracts the bits
and counts errors.

Threat model (the SoK's white-box setting): the owner holds the suspect's weights in a dispute. A and b are
secret random draws independent of any model, so an unmarked suspect's bits match with probability 1/2 each and
the error count is Binomial(T, 1/2) exactly, whatever the suspect. The paper's Gaussian-mixture centre loss,
which makes the class activations cluster, is not reproduced: the projection term alone embeds the bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_wm.registry import SchemeSpec
from lightning_wm.verify.blackbox import Suspect, white_box_module
from lightning_wm.verify.derive import derived_rng
from lightning_wm.verify.keys import WatermarkKey
from lightning_wm.verify.stats import binomial_log10_p_value, binomial_threshold
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.base import MissingLayerError, WatermarkScheme, logs_this_step, resolve_layer


def mean_activation(model: nn.Module, layer: nn.Module, inputs: Tensor) -> Tensor:
    """μ: the output of ``layer`` averaged over ``inputs`` and over every non-channel dimension (fp32).

    ``model`` runs in eval mode (batch norm on running statistics, as the suspect is verified), the caller's
    gradient mode is kept, so the same function serves the loss term and verification.
    """
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(inputs.to(device=param.device, dtype=param.dtype))
    finally:
        handle.remove()
        model.train(was_training)
    activation = captured[0].float()
    per_channel = activation.transpose(0, 1).flatten(1) if activation.dim() > 2 else activation.t()
    return per_channel.mean(dim=1)


def draw_trigger_indices(labels: Tensor, classes: Sequence[int], count: int, rng: torch.Generator) -> Tensor:
    """``count`` indices drawn without replacement among the training images of ``classes`` (sorted)."""
    pool = torch.isin(labels.long(), torch.tensor(list(classes))).nonzero().flatten()
    if len(pool) < count:
        raise ValueError(f"DeepSigns: {count} trigger inputs asked for, the classes {list(classes)} have {len(pool)}")
    return pool[torch.randperm(len(pool), generator=rng)[:count]].sort().values


class DeepSignsKey(WatermarkKey):
    """The trigger inputs, the projection A, the bits b and the layer whose activations carry them."""

    scheme = "deepsigns"

    def extract(self, suspect: Suspect, layer: str | None = None) -> Tensor:
        """The bits the suspect's layer activations carry on the trigger inputs under A (white-box)."""
        module = white_box_module(suspect, self.scheme)
        name = layer or self.config["layer"]
        target = resolve_layer(module, name)
        with torch.no_grad():
            mu = mean_activation(module, target, self.tensors["trigger_inputs"])
        projection = self.tensors["projection"]
        if mu.numel() != projection.shape[1]:
            raise MissingLayerError(
                f"layer {name!r} of the suspect has {mu.numel()} channels, the key reads {projection.shape[1]}; "
                "name the matching layer with layer="
            )
        return (projection @ mu.cpu() >= 0).long()

    def derivation_problems(self, datamodule: Any = None) -> list[str] | None:
        """A, b and the trigger images re-drawn from the key's secret and the owner's training data (None without
        the data: the trigger images are then not checked, and a forger could have chosen them)."""
        if datamodule is None or not hasattr(datamodule, "dataset"):
            return None
        inputs, labels = datamodule.dataset("defender").tensors[:2]
        rng = derived_rng(self.secret, f"{self.scheme}/key")  # type: ignore[arg-type]
        bits, channels = self.tensors["projection"].shape
        index = draw_trigger_indices(labels, self.config["classes"], len(self.tensors["trigger_inputs"]), rng)
        problems = []
        if not torch.equal(torch.randn(bits, channels, generator=rng), self.tensors["projection"]):
            problems.append("projection")
        if not torch.equal(torch.randint(0, 2, (bits,), generator=rng), self.tensors["message"]):
            problems.append("message")
        if not torch.equal(inputs[index], self.tensors["trigger_inputs"]):
            problems.append("trigger_inputs")
        return problems

    def verify(self, suspect: Suspect, alpha: float = 0.01, layer: str | None = None) -> Verdict:
        bits = self.extract(suspect, layer)
        message = self.tensors["message"].long()
        total = len(message)
        errors = int((bits != message).sum())
        max_errors = total - binomial_threshold(total, 0.5, alpha)
        return Verdict.decide(
            scheme=self.scheme,
            statistic=errors / total,
            statistic_name="ber",
            log10_p=binomial_log10_p_value(total - errors, total, 0.5),
            alpha=alpha,
            threshold=max_errors / total,
            higher_is_watermarked=False,
            queries=len(self.tensors["trigger_inputs"]),
            null="A and b are secret random draws: each extracted bit matches with probability 1/2 (binomial)",
            details={"bits": total, "errors": errors, "layer": layer or self.config["layer"]},
        )


class DeepSignsWatermark(WatermarkScheme):
    """Embed T bits in the mean activation of one layer over secret trigger inputs (Rouhani et al., ASPLOS 2019).

    Every training step forwards the trigger inputs (in eval mode, so batch norm behaves as at verification) and
    adds λ·Σ_j BCE(σ(A·μ)_j, b_j), computed in fp32 outside autocast; logs ``wm/<name>/ber``. A layer of C
    channels separates at most about C random bits with margin: keep T well below C (SmallCNN's ``fc`` has 128). On
    digits (SmallCNN width 8, 6 epochs) λ = 0.01 embeds 32 bits with no error at no measurable accuracy cost
    (92.2-92.5% against 92.5% unmarked); λ = 0.1 costs 4-7 points.

    Args:
        layer: the layer whose output is read, a name from ``named_modules()`` (``fc``, ``conv3``).
        bits: T, the message length.
        classes: the classes whose training images the trigger inputs are drawn from.
        triggers: how many trigger inputs.
        strength: λ.
        key_path, seed, alpha, name: see :class:`~lightning_wm.watermarks.base.WatermarkScheme`.
    """

    key_scheme = "deepsigns"

    def __init__(
        self,
        layer: str = "fc",
        bits: int = 32,
        classes: Sequence[int] = (0,),
        triggers: int = 32,
        strength: float = 0.01,
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
        name: str | None = None,
    ) -> None:
        super().__init__(key_path=key_path, seed=seed, alpha=alpha, name=name)
        if bits < 1 or triggers < 1:
            raise ValueError(f"bits and triggers must be positive, got {bits} and {triggers}")
        if not classes:
            raise ValueError("classes must name at least one class")
        self.layer = layer
        self.bits = bits
        self.classes = [int(c) for c in classes]
        self.triggers = triggers
        self.strength = strength
        self._layer: nn.Module | None = None
        self._tensors: dict[str, Tensor] = {}

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> DeepSignsKey:
        datamodule = self.split_datamodule(trainer, "the trigger inputs are the owner's training images")
        inputs, labels = datamodule.dataset("defender").tensors[:2]
        target = resolve_layer(pl_module, self.layer)
        with torch.no_grad():
            channels = mean_activation(pl_module, target, inputs[:2]).numel()
        rng = self.key_rng()
        index = draw_trigger_indices(labels, self.classes, self.triggers, rng)
        projection = torch.randn(self.bits, channels, generator=rng)
        message = torch.randint(0, 2, (self.bits,), generator=rng)
        config = {"layer": self.layer, "classes": self.classes}
        return DeepSignsKey(config, {"trigger_inputs": inputs[index], "projection": projection, "message": message})

    def on_key_ready(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._layer = resolve_layer(pl_module, self.key.config["layer"])
        self._tensors = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._layer = None
        self._tensors = {}

    def training_loss(self, pl_module: L.LightningModule, batch: Any, output: Any) -> Tensor:
        if self._layer is None:
            self._layer = resolve_layer(pl_module, self.key.config["layer"])
        device = next(pl_module.parameters()).device
        if not self._tensors or self._tensors["projection"].device != device:
            self._tensors = {
                "projection": self.key.tensors["projection"].float().to(device),
                "message": self.key.tensors["message"].float().to(device),
            }
        mu = mean_activation(pl_module, self._layer, self.key.tensors["trigger_inputs"])
        with torch.autocast(device.type, enabled=False):
            logits = self._tensors["projection"] @ mu.float()
            loss = F.binary_cross_entropy_with_logits(logits, self._tensors["message"], reduction="sum")
        with torch.no_grad():
            ber = ((logits >= 0).float() != self._tensors["message"]).float().mean()
        if logs_this_step(pl_module):
            pl_module.log(f"wm/{self.name}/ber", ber, on_step=True, on_epoch=False, prog_bar=True)
        return self.strength * loss / math.sqrt(self.bits)


SCHEME = SchemeSpec(
    name="deepsigns",
    callback=DeepSignsWatermark,
    key=DeepSignsKey,
    higher_is_watermarked=False,
    access="weights",
    example=lambda seed=None, key_path=None: DeepSignsWatermark(
        layer="fc", bits=32, triggers=16, strength=0.01, seed=seed, key_path=key_path
    ),
)
"""DeepSigns' registry entry (entry point ``deepsigns`` of ``lightning_wm.schemes``)."""
