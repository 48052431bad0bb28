"""Backbones: any ``nn.Module`` works; these are shipped."""

from lightning_wm.models.resnet import resnet18_cifar
from lightning_wm.models.small_cnn import MLP, SmallCNN
from lightning_wm.models.wide_resnet import WideResNet

__all__ = ["MLP", "SmallCNN", "WideResNet", "resnet18_cifar"]
