"""Removal attacks: each a LightningModule taking the victim (a checkpoint or a module), run by ``trainer.fit``."""

from lightning_wm.attacks.base import RemovalAttack, load_victim
from lightning_wm.attacks.distillation import DistillationAttack
from lightning_wm.attacks.evasion import EvasionAttack
from lightning_wm.attacks.fine_tune import FineTuneAttack
from lightning_wm.attacks.overwrite import OverwriteAttack
from lightning_wm.attacks.prune import PruneAttack, prune_sweep

__all__ = [
    "DistillationAttack",
    "EvasionAttack",
    "FineTuneAttack",
    "OverwriteAttack",
    "PruneAttack",
    "RemovalAttack",
    "load_victim",
    "prune_sweep",
]
