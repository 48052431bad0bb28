"""Copies of a model: with its weights, or with fresh ones."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def clone_module(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares, rather than copies, the factories it holds.

    A module built by LightningCLI keeps its ``optimizer``/``lr_scheduler`` factories, whose jsonargparse
    instantiators reference the whole parser; deep-copying that graph is slow and can exceed Python's recursion
    limit. The factories are stateless (each call builds a new optimizer), so copies share them.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if callable(value) and not isinstance(value, (nn.Module, torch.Tensor)):
                memo[id(value)] = value
    return copy.deepcopy(model, memo)


def reinitialised_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s architecture with fresh weights (every submodule's ``reset_parameters``), trainable.

    The attacker of a distillation attack and the clean reference models of the benchmark and of USP know an
    architecture, not its weights; this gives them one, drawing from torch's global generator.
    """
    fresh = clone_module(model)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh.train().requires_grad_(True)
