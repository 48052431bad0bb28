"""Small convolutional networks for MNIST-sized images (and the 8×8 digits)."""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Three 3×3 conv blocks and a two-layer head; works on any input size (adaptive pooling).

    Reaches about 91% on Fashion-MNIST in 10 epochs on a CPU. The conv layers are ``conv1``, ``conv2`` and
    ``conv3`` (named so that a white-box scheme can target ``conv2``), the last linear layer is ``head``.

    Args:
        in_channels: image channels.
        num_classes: output logits.
        width: channels of ``conv1``; ``conv2`` and ``conv3`` have ``2 * width``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * width, 128)
        self.head = nn.Linear(128, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        if x.shape[-1] >= 16:
            x = self.pool(x)
        x = self.pool(self.act(self.bn2(self.conv2(x))))
        x = self.gap(self.act(self.bn3(self.conv3(x))))
        return self.head(self.act(self.fc(x.flatten(1))))


class MLP(nn.Module):
    """A plain multilayer perceptron on flattened images: a student architecture unlike the CNN teachers.

    Args:
        in_features: flattened input size (64 for digits, 784 for MNIST-sized images).
        num_classes: output logits.
        hidden: widths of the hidden layers.
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: tuple[int, ...] = (256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
