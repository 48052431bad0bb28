"""``CollusionAttack``: users who each hold a fingerprinted copy average their weights (no training).

The collusion attack against fingerprinting of Chen et al. (DeepMarks, ICMR 2019): ``k`` users pool their copies
of one architecture and publish the element-wise mean of the parameters (and of the batch-norm statistics). A
linear read-out of the weights (Uchida's ``X·w̄``, DeepMarks' codes) then reads the mean of the copies' read-outs,
so the bits on which all colluders agree survive and the others are blurred.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim


class CollusionAttack(RemovalAttack):
    """Average the weights of ``victims`` (checkpoint paths or modules of one architecture) into one model.

    Floating-point entries of the state dicts are averaged; integer ones (batch-norm's ``num_batches_tracked``)
    are taken from the first copy. The attack runs at construction; ``fit`` with zero epochs changes nothing.

    Args:
        victims: at least two copies.
        optimizer: unused (no training), kept for the attacks' common signature.
        lr_scheduler: unused.

    Raises:
        ValueError: fewer than two copies, or copies whose state dicts differ in names or shapes.
    """

    def __init__(
        self,
        victims: Sequence[Victim],
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if len(victims) < 2:
            raise ValueError(f"a collusion needs at least two copies, got {len(victims)}")
        super().__init__(optimizer, lr_scheduler)
        copies = [copy_victim(v) for v in victims]
        states = [c.state_dict() for c in copies]
        for i, state in enumerate(states[1:], start=1):
            if state.keys() != states[0].keys() or any(state[n].shape != states[0][n].shape for n in state):
                raise ValueError(f"copy {i} does not have the architecture of copy 0: the copies cannot be averaged")
        averaged = {
            name: torch.stack([s[name].float() for s in states]).mean(0).to(tensor.dtype)
            if tensor.is_floating_point()
            else tensor
            for name, tensor in states[0].items()
        }
        self.model = copies[0]
        self.model.load_state_dict(averaged)
        self.colluders = len(copies)
