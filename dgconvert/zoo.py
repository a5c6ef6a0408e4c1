"""Small, importable architectures.

Every constructor here is referenced from checkpoints as ``dgconvert.zoo:<name>`` and
rebuilt from its keyword arguments, so the signatures are part of the checkpoint format.

- :func:`resnet` — ResNet-style (residual adds), the reference backbone for 28x28
  grayscale images (Fashion-MNIST); cut points ``layer1 … layer3``.
- :func:`densenet` — DenseNet-style (concatenations inside each dense block).
- :func:`two_path_net` — a model whose ``block1`` output is *not* the only tensor
  crossing it (a long skip connection), used to test the multi-tensor-cut refusal.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual add (projection shortcut when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = _conv_bn(cout, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv1(x))
        out = self.conv2(out)
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-style classifier: stem, four stages of basic blocks, pool, linear head."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        blocks: tuple[int, ...] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"widths and blocks need 4 entries, got {widths} and {blocks}")
        self.stem = nn.Sequential(_conv_bn(in_channels, widths[0]), nn.ReLU())
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet(
    in_channels: int = 1,
    num_classes: int = 10,
    widths: list[int] | tuple[int, ...] = (16, 32, 64, 128),
    blocks: list[int] | tuple[int, ...] = (1, 1, 1, 1),
) -> ResNet:
    """ResNet-style backbone; cut at ``layer1``, ``layer2``, ``layer3``."""
    return ResNet(in_channels, num_classes, tuple(widths), tuple(blocks))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], dim=1)


def _transition(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2)
    )


class DenseNet(nn.Module):
    """DenseNet-style classifier: dense blocks (concatenations) joined by transitions."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, growth: int = 8, layers: int = 3
    ) -> None:
        super().__init__()
        c = 2 * growth
        self.stem = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        blocks = []
        for i in range(3):
            dense = []
            for _ in range(layers):
                dense.append(DenseLayer(c, growth))
                c += growth
            if i < 2:
                dense.append(_transition(c, c // 2))
                c //= 2
            blocks.append(nn.Sequential(*dense))
        self.block1, self.block2, self.block3 = blocks
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        x = torch.relu(self.norm(x))
        return self.fc(x.mean(dim=(2, 3)))


def densenet(
    in_channels: int = 1, num_classes: int = 10, growth: int = 8, layers: int = 3
) -> DenseNet:
    """DenseNet-style backbone; cut at ``block1``, ``block2``."""
    return DenseNet(in_channels, num_classes, growth, layers)


class TwoPathNet(nn.Module):
    """A long skip connection jumps over ``block2``: cutting at ``block1`` alone would
    carry two tensors across the cut (the stem output and block1's output)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.block3 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        h = self.block1(s)
        h = self.block2(h) + s
        h = self.block3(h)
        return self.fc(h.mean(dim=(2, 3)))


def two_path_net(in_channels: int = 1, num_classes: int = 10, width: int = 8) -> TwoPathNet:
    """Long-skip model; ``block3`` is a valid single-tensor cut, ``block1``/``block2`` are not."""
    return TwoPathNet(in_channels, num_classes, width)
