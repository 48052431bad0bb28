"""Removal attacks: each a LightningModule taking the victim (a checkpoint or a module), run by ``trainer.fit``."""

from lightning_wm.attacks.base import RemovalAttack, load_victim
from lightning_wm.attacks.chain import ChainAttack
from lightning_wm.attacks.distillation import DistillationAttack
from lightning_wm.attacks.evasion import EvasionAttack
from lightning_wm.attacks.fine_tune import FineTuneAttack
from lightning_wm.attacks.input_transform import (
    AutoencoderAttack,
    FeatureSqueezingAttack,
    FlipAttack,
    InputNoiseAttack,
    InputTransformAttack,
    JpegAttack,
    OcclusionAttack,
    QuantizationAttack,
    SmoothingAttack,
)
from lightning_wm.attacks.overwrite import OverwriteAttack
from lightning_wm.attacks.prune import PruneAttack, prune_sweep

__all__ = [
    "AutoencoderAttack",
    "ChainAttack",
    "DistillationAttack",
    "EvasionAttack",
    "FeatureSqueezingAttack",
    "FineTuneAttack",
    "FlipAttack",
    "InputNoiseAttack",
    "InputTransformAttack",
    "JpegAttack",
    "OcclusionAttack",
    "OverwriteAttack",
    "PruneAttack",
    "QuantizationAttack",
    "RemovalAttack",
    "SmoothingAttack",
    "load_victim",
    "prune_sweep",
]
