"""Fresh weights for an existing architecture."""

from __future__ import annotations

import copy

from torch import nn


def reinitialised_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s architecture with fresh weights (every submodule's ``reset_parameters``), trainable.

    The attacker of a distillation attack and the clean reference models of the benchmark and of USP know an
    architecture, not its weights; this gives them one, drawing from torch's global generator.
    """
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh.train().requires_grad_(True)
