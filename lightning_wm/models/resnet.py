"""ResNet-18 adapted to 32×32 images."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with a 3×3 stem and no max-pool, the usual CIFAR-10 variant (last layer ``fc``)."""
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
