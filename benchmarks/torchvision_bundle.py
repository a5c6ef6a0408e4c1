"""A torchvision classifier as a bundle for the speed benchmarks (random weights: only the
exit mix matters for speed; ``limit_sweep.py --extra BUNDLE=NPZ=25,25,25`` sets it).

    python benchmarks/torchvision_bundle.py [--model resnet18] [--size 64] [--out /tmp/tv]

Writes ``OUT/<model>_<size>.dg`` (``cuts=3``, d-gates, BatchNorm statistics estimated on
random images, verified against torch) and ``OUT/random<size>.npz`` (2048 uint8 images).
Needs torchvision beside torch (``pip install -e '.[export,models]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from conformance import _estimate_norm_statistics, _import_torchvision

import dgconvert as dg
from dgconvert.gating import GatedNetwork


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("/tmp/tv"))
    args = ap.parse_args()
    tv = _import_torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, args.model)(num_classes=10).eval()
    pix = torch.randint(0, 256, (2048, 3, args.size, args.size),
                        generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x = pix.float() / 255
    _estimate_norm_statistics(model, x[:256])
    net = GatedNetwork.from_backbone(model, 3, gate="dgate", example_input=x[:2]).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = dg.export(net, args.out / f"{args.model}_{args.size}.dg", verify_input=x[:64],
                       force=True)
    np.savez(args.out / f"random{args.size}.npz", x=pix.numpy(),
             y=np.random.default_rng(0).integers(0, 10, len(pix)))
    print(bundle.path, [round(c / bundle.exit_costs()[-1], 3) for c in bundle.exit_costs()])


if __name__ == "__main__":
    main()
