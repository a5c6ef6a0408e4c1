"""Small gated networks built from the zoo, shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dgconvert import zoo
from dgconvert.gating import GatedNetwork

NORMALIZATION = {"scale": 255.0, "mean": [0.2860], "std": [0.3530]}

ARCHS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "resnet": ("dgconvert.zoo:resnet", {"widths": [8, 16, 16, 32]}, ["layer1", "layer2", "layer3"]),
    "densenet": ("dgconvert.zoo:densenet", {"growth": 4, "layers": 2}, ["block1", "block2"]),
    "two_path": ("dgconvert.zoo:two_path_net", {"width": 8}, ["block3"]),
}


def build(name: str, gate: str = "dgate", seed: int = 0) -> GatedNetwork:
    """A randomly initialised gated network (BatchNorm statistics randomised too)."""
    factory, kwargs, cuts = ARCHS[name]
    torch.manual_seed(seed)
    backbone = getattr(zoo, factory.split(":")[1])(**kwargs)
    for m in backbone.modules():  # non-trivial BN statistics so eval != train
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    backbone.eval()
    return GatedNetwork.from_backbone(
        backbone, cuts, gate=gate, input_shape=[1, 28, 28], normalization=NORMALIZATION,
        arch={"factory": factory, "kwargs": kwargs},
    ).eval()


def train_tiny_backbone(path: Path, steps: int = 150, data: str = "fashion-mnist:train[:2000]") -> Path:
    """A small zoo ResNet trained ``steps`` SGD steps on real images (seconds); returns the
    dgconvert backbone checkpoint written to ``path``."""
    from dgconvert import train
    from dgconvert.data import load_dataset

    recipe = train.Recipe(widths=(8, 16, 24, 32), epochs=10, batch_size=64, lr=0.1, max_steps=steps)
    ds = load_dataset(data)
    model = train.build_model(recipe, num_classes=10)
    train.fit(model, ds, recipe, progress=False)
    return train.save_checkpoint(path, model.eval(), recipe, ds.classes, {})


# --------------------------------------------------------------------------- feature layouts
# Tiny stand-ins for the architectures whose stages hand over other layouts than NCHW maps:
# a ViT (token sequences [N, T, D] with a class token), a Swin-like network (NHWC maps
# [N, H, W, C] between its stages) and a ConvNeXt-like one (NCHW between blocks, NHWC
# inside). They mirror torchvision's structure (module names included) at a few thousand
# parameters, so cutting, gating, export and the runtime are tested on each layout in
# CI time without torchvision.


class _EncoderBlock(torch.nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(dim)
        self.self_attention = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TinyViT(torch.nn.Module):
    """ViT: patch embedding, class token, position embedding, encoder blocks, head on the
    class token (module names as torchvision's ``VisionTransformer``)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 patch: int = 7, dim: int = 16, depth: int = 4, heads: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.patch = patch
        self.conv_proj = torch.nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.class_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        tokens = (image_size // patch) ** 2 + 1
        self.pos_embedding = torch.nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.encoder = torch.nn.Module()
        self.encoder.layers = torch.nn.Sequential(
            *[_EncoderBlock(dim, heads) for _ in range(depth)]
        )
        self.encoder.ln = torch.nn.LayerNorm(dim)
        self.heads = torch.nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # [N, T, D]
        cls = self.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding
        x = self.encoder.ln(self.encoder.layers(x))
        return self.heads(x[:, 0])


class _NHWCBlock(torch.nn.Module):
    """Swin-like block on channels-last maps: x + MLP(LN(x)) and a token-mixing residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.mix = torch.nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H, W, C]
        x = x + self.mix(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(x))


class _PatchMerging(torch.nn.Module):
    """Halve H and W, concatenating 2x2 neighbours along C (channels-last, as Swin)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(4 * dim)
        self.reduction = torch.nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        x = torch.nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x0, x1 = x[:, 0::2, 0::2], x[:, 1::2, 0::2]
        x2, x3 = x[:, 0::2, 1::2], x[:, 1::2, 1::2]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3], dim=-1)))


class TinySwin(torch.nn.Module):
    """Swin-like: ``features`` hands NHWC maps [N, H, W, C] from stage to stage
    (torchvision's ``SwinTransformer`` layout), then norm, permute, pool, head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Sequential(torch.nn.Conv2d(in_channels, dim, 4, stride=4), _Permute(0, 2, 3, 1)),
            torch.nn.Sequential(_NHWCBlock(dim), _NHWCBlock(dim)),
            _PatchMerging(dim),
            torch.nn.Sequential(_NHWCBlock(2 * dim)),
            _PatchMerging(2 * dim),
            torch.nn.Sequential(_NHWCBlock(4 * dim)),
        )
        self.norm = torch.nn.LayerNorm(4 * dim)
        self.head = torch.nn.Linear(4 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.features(x))
        return self.head(x.permute(0, 3, 1, 2).mean(dim=(2, 3)))


class _Permute(torch.nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class _CNBlock(torch.nn.Module):
    """ConvNeXt block: depthwise 7x7 on NCHW, then LN + MLP channels-last, layer scale,
    residual; NCHW in and out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = torch.nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)
        )
        self.layer_scale = torch.nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class TinyConvNeXt(torch.nn.Module):
    """ConvNeXt-like: stem, stages of CN blocks with downsampling in between (NCHW)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, dim, 4, stride=4),
            torch.nn.Sequential(_CNBlock(dim), _CNBlock(dim)),
            torch.nn.Conv2d(dim, 2 * dim, 2, stride=2),
            torch.nn.Sequential(_CNBlock(2 * dim)),
        )
        self.head = torch.nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny_vit(**kwargs: Any) -> TinyViT:
    return TinyViT(**kwargs)


def tiny_swin(**kwargs: Any) -> TinySwin:
    return TinySwin(**kwargs)


def tiny_convnext(**kwargs: Any) -> TinyConvNeXt:
    return TinyConvNeXt(**kwargs)
