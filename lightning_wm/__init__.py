"""lightning-wm: watermark deep neural networks on PyTorch Lightning (embed, attack, verify, benchmark)."""

from lightning_wm.classifier import ImageClassifier, load_classifier
from lightning_wm.mixin import WatermarkMixin

__all__ = ["ImageClassifier", "WatermarkMixin", "load_classifier"]
__version__ = "0.1.0"
