"""Tiny multi-exit models as trained elsewhere (SDN, EENets) and broken variants, for the
``GatedNetwork.from_multi_exit`` tests. Inputs ``[N, 1, 28, 28]``, 10 classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class Block(nn.Module):
    """A ResNet basic block (its skip connection stays inside the block)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


def conv_pool_fc(cin: int, num_classes: int) -> nn.Sequential:
    """An SDN-style exit head: conv, pool, fully connected."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(4 * cin, num_classes))


def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():  # non-trivial BatchNorm statistics, so eval != train
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class SDNResNet(nn.Module):
    """Shallow-Deep Network style ResNet: conv+pool+fc exits after layer1 and layer2."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU())
        self.layer1 = Block(w, w, 1)
        self.exit1 = conv_pool_fc(w, num_classes)
        self.layer2 = Block(w, 2 * w, 2)
        self.exit2 = conv_pool_fc(2 * w, num_classes)
        self.layer3 = Block(2 * w, 4 * w, 2)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        x = self.layer1(self.stem(x))
        outs.append(self.exit1(x))
        x = self.layer2(x)
        outs.append(self.exit2(x))
        x = self.layer3(x)
        outs.append(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))
        return outs


class EENetExit(nn.Module):
    """An EENets "pool" exit block: pooled features -> (class logits, sigmoid confidence)."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.confidence = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.flatten(self.pool(x), 1)
        return self.classifier(z), torch.sigmoid(self.confidence(z))


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class EENet(nn.Module):
    """EENets style plain CNN: three exits returning (logits, confidence); the final entry
    is (logits, confidence) too."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = width
        self.block1 = _conv(1, w, 1)
        self.exit1 = EENetExit(w, num_classes)
        self.block2 = _conv(w, 2 * w, 2)
        self.exit2 = EENetExit(2 * w, num_classes)
        self.block3 = _conv(2 * w, 2 * w, 1)
        self.exit3 = EENetExit(2 * w, num_classes)
        self.block4 = _conv(2 * w, 4 * w, 2)
        self.final = EENetExit(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = self.block1(x)
        outs = [self.exit1(x)]  # the entry is the head's own tuple
        x = self.block2(x)
        logits, conf = self.exit2(x)  # unpacked and packed again
        outs.append((logits, conf))
        x = self.block3(x)
        outs.append(self.exit3(x))
        outs.append(self.final(self.block4(x)))
        return outs


class TwoInputExit(nn.Module):
    """An exit head reading two trunk tensors."""

    def __init__(self, a: int, b: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(a + b, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_avg_pool2d(y, 1)], 1)
        return self.fc(torch.flatten(z, 1))


class TwoTensorExitNet(SDNResNet):
    """exit2 reads layer1's and layer2's outputs."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__(num_classes, width)
        self.exit2 = TwoInputExit(width, 2 * width, num_classes)  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.layer1(self.stem(x))
        b = self.layer2(a)
        c = self.layer3(b)
        return [self.exit1(a), self.exit2(a, b),
                self.fc(torch.flatten(F.adaptive_avg_pool2d(c, 1), 1))]


class SameCutNet(SDNResNet):
    """exit1 and exit2 both read layer1's output."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.layer1(self.stem(x))
        c = self.layer3(self.layer2(a))
        return [self.exit1(a), self.exit2(torch.cat([a, a], 1)),
                self.fc(torch.flatten(F.adaptive_avg_pool2d(c, 1), 1))]


class SkipExitNet(SDNResNet):
    """exit2 reads a tensor inside layer2's residual block (a skip jumps over it)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.layer1(self.stem(x))
        h = F.relu(self.layer2.bn1(self.layer2.conv1(a)))
        b = F.relu(self.layer2.bn2(self.layer2.conv2(h)) + self.layer2.short(a))
        c = self.layer3(b)
        return [self.exit1(a), self.exit2(h),
                self.fc(torch.flatten(F.adaptive_avg_pool2d(c, 1), 1))]


class SingleOutputNet(nn.Module):
    """An ordinary classifier (one tensor out)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


def sdn_resnet(num_classes: int = 10, width: int = 8, seed: int = 0) -> SDNResNet:
    """The SDN-style test model, initialised from ``seed`` (importable: ``--arch``)."""
    torch.manual_seed(seed)
    return _randomize_bn(SDNResNet(num_classes, width))  # type: ignore[return-value]


def eenet(num_classes: int = 10, width: int = 8, seed: int = 0) -> EENet:
    """The EENets-style test model, initialised from ``seed`` (importable: ``--arch``)."""
    torch.manual_seed(seed)
    return _randomize_bn(EENet(num_classes, width))  # type: ignore[return-value]


class TemperatureExitNet(SDNResNet):
    """Ops after the exit-head modules (a temperature, a log-softmax) belong to the exit."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.layer1(self.stem(x))
        b = self.layer2(a)
        c = self.layer3(b)
        return [self.exit1(a) / 3.0, F.log_softmax(self.exit2(b), dim=1),
                self.fc(torch.flatten(F.adaptive_avg_pool2d(c, 1), 1))]


class TrainingOnlyExitsNet(SDNResNet):
    """Returns every exit in eval mode, only the final logits while training (the path
    converted is the inference one)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        outs = super().forward(x)
        return outs[-1:] if self.training else outs
