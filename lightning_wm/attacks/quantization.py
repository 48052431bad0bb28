"""Weight quantization, a model-modification attack of the SoK (Lukas et al., "SoK: How Robust is Image
Classification Deep Neural Network Watermarking?", S&P 2022): rounding every weight to one of ``2**bits`` levels
erases whatever a scheme wrote below the quantization step."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim
from lightning_wm.registry import AttackSpec

_QUANTIZED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def quantize(weight: Tensor, bits: int) -> Tensor:
    """``weight`` rounded to the nearest of ``2**bits`` evenly spaced levels from its minimum to its maximum
    (uniform per-tensor quantization; a constant tensor is returned as it is)."""
    low, high = weight.min(), weight.max()
    step = (high - low) / (2**bits - 1)
    if step == 0:
        return weight.clone()
    return torch.round((weight - low) / step) * step + low


class WeightQuantizationAttack(RemovalAttack):
    """Quantize every conv and linear weight of a copy of the victim to ``bits`` bits, optionally then fine-tune.

    The quantization is uniform and per tensor (:func:`quantize`), as in the SoK toolbox (5 bits by default there,
    which quantizes every parameter; here biases and batch norm stay in float, as a deployed int-weight model keeps
    them). It happens when the attack is built, so the attack's ``model`` is the quantized model without any
    ``fit``. With epochs, the model is fine-tuned on the attacker's data (true labels) and quantized again when
    ``fit`` ends, so the model handed over still holds at most ``2**bits`` values per weight tensor.

    Not :class:`~lightning_wm.attacks.input_transform.QuantizationAttack`, which quantizes the inputs.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        bits: bits per weight (``2**bits`` levels per tensor), at least 1.
        optimizer: optimizer factory of the optional fine-tuning.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        bits: int = 5,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if bits < 1:
            raise ValueError(f"bits must be at least 1, got {bits}")
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "optimizer", "lr_scheduler"])
        self.bits = bits
        self.model = copy_victim(victim)
        self.quantize()

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Bits per weight, then 0 (quantization alone) to 3 epochs of fine-tuning at a tuned learning rate."""
        from optuna.distributions import FloatDistribution, IntDistribution

        return {
            "bits": IntDistribution(1, 8),
            "epochs": IntDistribution(0, 3),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    def quantized_weights(self) -> list[Tensor]:
        """The weights this attack quantizes (every conv and linear layer's)."""
        return [m.weight for m in self.model.modules() if isinstance(m, _QUANTIZED)]

    @torch.no_grad()
    def quantize(self) -> None:
        """Quantize the model's conv and linear weights in place."""
        for weight in self.quantized_weights():
            weight.copy_(quantize(weight, self.bits))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.supervised_step(batch[0], batch[1])

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self.epochs:
            self.quantize()


ATTACK = AttackSpec(
    name="weight_quantization",
    attack=WeightQuantizationAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: WeightQuantizationAttack(victim, bits=5, optimizer=partial(torch.optim.SGD, lr=0.01)),
    example_epochs=0,
)
"""The registry entry (entry point ``weight_quantization`` of ``lightning_wm.attacks``)."""
