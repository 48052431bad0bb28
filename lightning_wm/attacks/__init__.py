"""Removal attacks: each a LightningModule taking the victim (a checkpoint or a module), run by ``trainer.fit``."""

from lightning_wm.attacks.adversarial_training import AdversarialTrainingAttack
from lightning_wm.attacks.base import RemovalAttack, load_victim
from lightning_wm.attacks.chain import ChainAttack
from lightning_wm.attacks.collusion import CollusionAttack
from lightning_wm.attacks.distillation import DistillationAttack
from lightning_wm.attacks.ensemble_distillation import EnsembleDistillationAttack
from lightning_wm.attacks.evasion import EvasionAttack
from lightning_wm.attacks.fine_pruning import FinePruningAttack
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
from lightning_wm.attacks.knockoff import KnockoffAttack
from lightning_wm.attacks.label_smoothing import LabelNoiseAttack, LabelSmoothingAttack
from lightning_wm.attacks.neural_cleanse import NeuralCleanseAttack
from lightning_wm.attacks.overwrite import OverwriteAttack
from lightning_wm.attacks.permutation import NeuronPermutationAttack
from lightning_wm.attacks.prune import PruneAttack, prune_sweep
from lightning_wm.attacks.quantization import WeightQuantizationAttack
from lightning_wm.attacks.regularization import RegularizationAttack
from lightning_wm.attacks.retraining import RetrainingAttack
from lightning_wm.attacks.smooth_retraining import SmoothRetrainingAttack
from lightning_wm.attacks.transfer import TransferLearningAttack
from lightning_wm.attacks.weight_shifting import WeightShiftingAttack

__all__ = [
    "AdversarialTrainingAttack",
    "AutoencoderAttack",
    "ChainAttack",
    "CollusionAttack",
    "DistillationAttack",
    "EnsembleDistillationAttack",
    "EvasionAttack",
    "FeatureSqueezingAttack",
    "FinePruningAttack",
    "FineTuneAttack",
    "FlipAttack",
    "InputNoiseAttack",
    "InputTransformAttack",
    "JpegAttack",
    "KnockoffAttack",
    "LabelNoiseAttack",
    "LabelSmoothingAttack",
    "NeuralCleanseAttack",
    "NeuronPermutationAttack",
    "OcclusionAttack",
    "OverwriteAttack",
    "PruneAttack",
    "QuantizationAttack",
    "RegularizationAttack",
    "RemovalAttack",
    "RetrainingAttack",
    "SmoothRetrainingAttack",
    "SmoothingAttack",
    "TransferLearningAttack",
    "WeightQuantizationAttack",
    "WeightShiftingAttack",
    "load_victim",
    "prune_sweep",
]
