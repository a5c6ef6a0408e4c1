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
