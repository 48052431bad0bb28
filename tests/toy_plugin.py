"""A scheme that lives outside lightning-wm, as a user's plugin package would ship it: registered (here, in
``conftest.py``) and from then on held to the conformance suite, read by ``lightning-wm verify`` and run by the
benchmark, with no edit to lightning-wm.

The toy: T secret random bits written into the signs of T secret weights of the last linear layer by a hinge
regularizer. For weights the owner did not train, each sign matches an independent fair bit with probability 1/2,
so the number of matches is Binomial(T, 1/2) for any suspect.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_wm.registry import SchemeSpec
from lightning_wm.verify import Verdict, WatermarkKey, binomial_log10_p_value, white_box_module
from lightning_wm.verify.stats import binomial_threshold
from lightning_wm.watermarks import WatermarkScheme


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in white_box_module(model, "toy_sign").modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the suspect has no linear layer to read")
    return linears[-1]


class ToySignKey(WatermarkKey):
    scheme = "toy_sign"

    def verify(self, suspect: Any, alpha: float = 0.01) -> Verdict:
        weight = _last_linear(suspect).weight.detach().flatten().cpu()
        index, bits = self.tensors["index"], self.tensors["bits"]
        if int(index.max()) >= len(weight):
            raise ValueError("the suspect's last layer is smaller than the key's")
        matches = int(((weight[index] > 0).long() == bits).sum())
        return Verdict.decide(
            scheme=self.scheme,
            statistic=matches / len(bits),
            statistic_name="sign_match",
            log10_p=binomial_log10_p_value(matches, len(bits), 0.5),
            alpha=alpha,
            threshold=binomial_threshold(len(bits), 0.5, alpha) / len(bits),
            null="each sign matches a random bit with probability 1/2 (binomial)",
        )


class ToySignWatermark(WatermarkScheme):
    key_scheme = "toy_sign"

    def __init__(self, bits: int = 32, key_path: str | None = None, seed: int | None = None, name: str | None = None):
        super().__init__(key_path=key_path, seed=seed, name=name)
        self.bits = bits

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ToySignKey:
        rng = self.key_rng()
        size = _last_linear(pl_module).weight.numel()
        index = torch.randperm(size, generator=rng)[: self.bits]
        return ToySignKey({}, {"index": index, "bits": torch.randint(0, 2, (self.bits,), generator=rng)})

    def training_loss(self, pl_module: L.LightningModule, batch: Any, output: Any) -> Tensor:
        weight = _last_linear(pl_module).weight.flatten()
        signs = self.key.tensors["bits"].to(weight.device).float() * 2 - 1
        return F.relu(0.01 - signs * weight[self.key.tensors["index"].to(weight.device)]).sum()


TOY = SchemeSpec(
    name="toy_sign",
    callback=ToySignWatermark,
    key=ToySignKey,
    higher_is_watermarked=True,
    access="weights",
    example=lambda seed=None, key_path=None: ToySignWatermark(seed=seed, key_path=key_path),
    example_epochs=8,
)
