"""``HiddenModule``: a module that follows its owner's device and dtype but is no part of its parameters, state
or checkpoints (a victim an attacker only queries; a teacher a student only learns from)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


class HiddenModule(nn.Module):
    """Carries a module along with its owner's device and dtype, invisible to everything else.

    The black-box threat model: the attacker queries the victim but holds none of its weights; a distilled student
    learns from its teacher but its checkpoint must not carry the teacher. The wrapped module follows the
    Trainer's ``.to(device)`` / precision casts of the owner (``_apply`` is forwarded), yet it is not a registered
    child: it is absent from ``parameters()`` (so no optimizer or DDP sees it), from ``state_dict()``
    (so no checkpoint holds it) and from ``train()`` (it stays in eval mode).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "module", module.eval().requires_grad_(False))

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> HiddenModule:
        self.module._apply(fn, recurse)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)
