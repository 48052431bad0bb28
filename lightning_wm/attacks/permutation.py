"""Neuron-permutation removal attack: reorder one layer's output units so the function is unchanged but the weights
are not (the SoK's "weight shifting / neuron reordering" of model modification; Lukas et al., S&P 2022; the
permutation symmetry of hidden units, Hecht-Nielsen 1990).

What it does to a white-box mark: Uchida et al. read the filter average ``w̄ = W.mean(0)`` of the marked layer.
Permuting that layer's *output* filters leaves ``w̄`` unchanged (a mean over filters), so the mark survives;
permuting the *previous* layer's outputs permutes the marked layer's *input* channels, hence the blocks of ``w̄``,
and the bits read under the secret projection become coin flips. With Uchida's default ``conv3`` mark, permute
``conv2`` (the default here): on digits (SmallCNN width 32, 256 bits) the bit error rate goes from 0 to 0.52 with
the test accuracy unchanged (98.3%), so the mark is removed at no cost; permuting ``conv1`` or ``conv3`` leaves it
(BER 0). A white-box verifier must therefore be permutation-invariant. ``UchidaKey.verify(align=True)`` searches
the input-channel orders (Hungarian matching from the key alone) and finds the true one (BER 0 again), but a
p-value chosen after a search over the C! orders has to be corrected for it, here by a union bound: with C = 64
that costs log10(64!) = 89 orders of magnitude, more than the 77 that 256 bits at BER 0 carry, so the aligned
read cannot declare (p = 1). It does where T bits outweigh log10(C!): 64 bits over C = 8 channels (the
conformance example, 19 against 4.6 orders).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim
from lightning_wm.registry import AttackSpec

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _units(module: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a conv or linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels  # type: ignore[return-value]


def find_followers(model: nn.Module, layer: str) -> tuple[str | None, str]:
    """The batch norm right after ``layer`` (or None) and the next conv/linear layer, in registration order: the
    modules whose parameters follow ``layer``'s output units (as in a sequential network such as ``SmallCNN``).

    Raises:
        ValueError: ``layer`` is not a conv/linear layer of ``model`` or nothing reads its outputs after it.
    """
    modules = list(model.named_modules())
    names = [n for n, _ in modules]
    if layer not in names or not isinstance(dict(modules)[layer], _LAYERS):
        raise ValueError(f"{layer!r} is not a conv or linear layer of {type(model).__name__}")
    outputs = _units(dict(modules)[layer])[1]
    norm = None
    for name, module in modules[names.index(layer) + 1 :]:
        if isinstance(module, _NORMS) and norm is None and module.num_features == outputs:
            norm = name
        elif isinstance(module, _LAYERS):
            inputs = _units(module)[0]
            if inputs % outputs == 0:
                return norm, name
            raise ValueError(f"the layer after {layer!r}, {name!r}, takes {inputs} inputs, not a multiple of {outputs}")
    raise ValueError(f"no conv or linear layer follows {layer!r}")


@torch.no_grad()
def permute_units(model: nn.Module, layer: str, permutation: Tensor, norm: str | None, next_layer: str) -> None:
    """Reorder ``layer``'s output units by ``permutation`` in place, with ``norm``'s parameters and running
    statistics and ``next_layer``'s input units, so ``model`` computes the same function.

    A linear ``next_layer`` after a conv takes the flattened ``channels × positions`` features (channel-major, as
    ``flatten(1)`` lays them out); its input columns move in blocks of ``positions``.
    """
    modules = dict(model.named_modules())
    source, target = modules[layer], modules[next_layer]
    source.weight.copy_(source.weight[permutation])
    if source.bias is not None:
        source.bias.copy_(source.bias[permutation])
    if norm is not None:
        bn = modules[norm]
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(bn, name)
            if tensor is not None:
                tensor.copy_(tensor[permutation])
    block = _units(target)[0] // len(permutation)
    columns = (permutation[:, None] * block + torch.arange(block)).flatten()
    target.weight.copy_(target.weight[:, columns.to(target.weight.device)])


class NeuronPermutationAttack(RemovalAttack):
    """Permute the output units of one layer of a copy of the victim with a random permutation (no training).

    The network computes the same function (up to float rounding), so accuracy and every black-box mark are
    unchanged; what changes is where each unit sits, which removes white-box marks read in a fixed unit order
    (see the module docstring for Uchida's). Applied at construction, so ``trainer.fit`` with ``max_epochs=0``,
    ``validate`` or ``test`` evaluates the permuted model; epochs, if any, fine-tune it on the true labels.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        layer: the layer whose output units are permuted (``conv2``: the input channels of Uchida's ``conv3``).
        seed: seed of the permutation.
        norm: the batch norm after ``layer``; found in registration order when None.
        next_layer: the layer reading ``layer``'s outputs; found in registration order when None.
        optimizer: optimizer factory of an optional fine-tuning.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        layer: str = "conv2",
        seed: int = 0,
        norm: str | None = None,
        next_layer: str | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "optimizer", "lr_scheduler"])
        self.model = copy_victim(victim)
        found_norm, found_next = find_followers(self.model, layer)
        self.layer = layer
        self.norm = norm if norm is not None else found_norm
        self.next_layer = next_layer or found_next
        units = _units(dict(self.model.named_modules())[layer])[1]
        self.permutation = torch.randperm(units, generator=torch.Generator().manual_seed(seed))
        permute_units(self.model, layer, self.permutation, self.norm, self.next_layer)

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Which layer to permute and the permutation's seed."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        return {"layer": CategoricalDistribution(["conv1", "conv2", "conv3"]), "seed": IntDistribution(0, 1000)}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.supervised_step(batch[0], batch[1])


ATTACK = AttackSpec(
    name="permutation",
    attack=NeuronPermutationAttack,
    threat_model="white-box",
    category="model modification",
    example=lambda victim: NeuronPermutationAttack(victim, layer="conv1"),
    example_epochs=0,
)
"""The registry entry (entry point ``permutation`` of ``lightning_wm.attacks``)."""
