"""Wide residual networks (Zagoruyko & Komodakis 2016), the host network of Uchida et al. 2017."""

from __future__ import annotations

from torch import Tensor, nn


class _WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.act(self.bn1(x)))
        out = self.conv2(self.act(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-N-k for 32×32 images: a 16-filter stem, three groups of ``N`` blocks of widths 16k, 32k, 64k.

    Uchida et al. embed into the second conv of the first block of the first group (``group1.0.conv2``,
    a 3×3×64×64 kernel for k = 4), with N = 1, k = 4 (papers.md §1.4).

    Args:
        depth_blocks: blocks per group (N).
        widen_factor: k.
        in_channels: image channels.
        num_classes: output logits.
    """

    def __init__(self, depth_blocks: int = 1, widen_factor: int = 4, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        in_planes = 16
        groups = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(depth_blocks):
                blocks.append(_WideBasic(in_planes, width, stride=1 if i == 0 or j > 0 else 2))
                in_planes = width
            groups.append(nn.Sequential(*blocks))
        self.group1, self.group2, self.group3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.group3(self.group2(self.group1(self.conv1(x))))
        return self.head(self.pool(self.act(self.bn(x))).flatten(1))
