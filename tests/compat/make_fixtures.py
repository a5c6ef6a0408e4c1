"""Write the backward-compatibility fixtures: a tiny checkpoint of each network family as
dgconvert's main branch wrote it on 2026-12-06 (commit c2d20c1), one exported bundle, and
the outputs they gave on fixed inputs (``expected.npz``).

Run once, with *that* code (not the code under test)::

    cd /work/main && PYTHONPATH=/work/main .venv/bin/python \\
        /work/wt-families/tests/compat/make_fixtures.py --out /work/wt-families/tests/compat/data

``tests/compat/test_old_artifacts.py`` loads them with today's code and checks that the
outputs are identical. The script uses only the public API of that time (``dg.save``,
``dg.export``, ``GatedNetwork.from_backbone`` / ``from_multi_exit``, ``GaterNet.build``,
``gaternet_exits``), so it documents what an old artifact is.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # tests.multi_exit_models (the multi-exit model's --arch) when
    sys.path.append(str(ROOT))  # PYTHONPATH lacks it; last, so dgconvert is PYTHONPATH's

import dgconvert as dg  # noqa: E402

print(f"writing fixtures with dgconvert from {Path(dg.__file__).parent}")
from dgconvert.core.preprocess import normalize  # noqa: E402
from dgconvert.gating.gaternet import GaterNet  # noqa: E402
from dgconvert.gating.gaternet_exits import gaternet_exits  # noqa: E402
from dgconvert.gating.network import GatedNetwork  # noqa: E402
from dgconvert.zoo import resnet  # noqa: E402

NORMALIZATION = {"scale": 255.0, "mean": [0.2860], "std": [0.3530]}
RESNET = {"factory": "dgconvert.zoo:resnet", "kwargs": {"widths": [4, 4, 8, 8]}}
GATER = {"factory": "dgconvert.zoo:resnet", "kwargs": {"widths": [2, 2, 4, 4]}}
SDN = {"factory": "tests.multi_exit_models:sdn_resnet", "kwargs": {"width": 4, "seed": 3}}
SAMPLES = 32


def images() -> np.ndarray:
    """The fixed uint8 inputs ``[32, 1, 28, 28]`` every expected output is computed on."""
    return (np.random.default_rng(2026).random((SAMPLES, 1, 28, 28)) * 255).astype(np.uint8)


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():  # non-trivial statistics so that eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _spread(net: GatedNetwork, x: torch.Tensor) -> list[float]:
    """Thresholds at each gate's score quantiles, so that samples exit at every stage."""
    with torch.no_grad():
        scores = net.all_exits(x).scores.numpy()
    qs = np.linspace(0.8, 0.5, net.num_gates)
    return [float(np.quantile(scores[:, k], q)) for k, q in enumerate(qs)]


def _gated(prefix: str, net: GatedNetwork, x: torch.Tensor, out: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        out[f"{prefix}_logits"] = net(x).numpy()
        res = net.gated_forward(x, return_scores=True)
    out[f"{prefix}_labels"] = res.labels
    out[f"{prefix}_exit_stage"] = res.exit_stage
    out[f"{prefix}_scores"] = res.scores


def cut_backbone(x: torch.Tensor) -> GatedNetwork:
    torch.manual_seed(1)
    backbone = _randomize_bn(resnet(**RESNET["kwargs"]))
    gates = [{"type": "dgate"}, {"type": "softmax", "score": "margin"}, {"type": "dgate"}]
    net = GatedNetwork.from_backbone(backbone, ["layer1", "layer2", "layer3"], gate=gates,
                                     input_shape=[1, 28, 28], normalization=NORMALIZATION,
                                     classes=[f"c{i}" for i in range(10)], arch=RESNET).eval()
    net.thresholds = _spread(net, x)
    net.meta["fit"] = {"options": {"gate": "mixed", "train_samples": 7}, "final_accuracy": 0.5}
    return net


def multi_exit(x: torch.Tensor) -> GatedNetwork:
    from tests.multi_exit_models import sdn_resnet

    net = GatedNetwork.from_multi_exit(sdn_resnet(**SDN["kwargs"]), ["exit1", "exit2"],
                                       "margin-softmax", input_shape=[1, 28, 28],
                                       normalization=NORMALIZATION, arch=SDN).eval()
    net.thresholds = _spread(net, x)
    return net


def gaternet() -> GaterNet:
    torch.manual_seed(2)
    net = GaterNet.build(_randomize_bn(resnet(**RESNET["kwargs"])), None, GATER,
                         input_shape=[1, 28, 28], num_classes=10, arch=RESNET,
                         normalization=NORMALIZATION)
    with torch.no_grad():  # some gates off, some on, some input-dependent
        net.gater.fc2.bias.normal_(0.0, 3.0)
    net.meta["fit"] = {"options": {"sparsity": 2.0}, "accuracy": 0.25}
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    out_dir = ap.parse_args().out
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    imgs = images()
    x = torch.from_numpy(normalize(imgs, NORMALIZATION))
    expected: dict[str, np.ndarray] = {"images": imgs}

    cb = cut_backbone(x)
    dg.save(cb, out_dir / "cut_backbone.pt")
    dg.save(cb, out_dir / "cut_backbone_pickle.pt", pickle=True)  # trusted whole pickle
    _gated("cut_backbone", cb, x, expected)

    me = multi_exit(x)
    dg.save(me, out_dir / "multi_exit.pt")
    _gated("multi_exit", me, x, expected)

    gn = gaternet()
    dg.save(gn, out_dir / "gaternet.pt")
    with torch.no_grad():
        expected["gaternet_logits"] = gn(x).numpy()

    # GaterNet + d-gates has no checkpoint of its own in main (the CLI writes its bundle):
    # the fixture is the GaterNet checkpoint above plus the d-gate heads' weights.
    torch.manual_seed(4)
    ge = gaternet_exits(gn, ["layer1", "layer2"], "dgate")
    ge.thresholds = _spread(ge, x)
    torch.save({"cuts": ["layer1", "layer2"], "gate": "dgate", "thresholds": ge.thresholds,
                "gates_state": [g.state_dict() for g in ge.gates]},
               out_dir / "gaternet_exits_heads.pt")
    _gated("gaternet_exits", ge, x, expected)

    bundle_dir = out_dir / "cut_backbone.dg"
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    bundle = dg.export(cb, bundle_dir, verify_input=x, exporter="torchscript")
    res = dg.GatedRunner(bundle, backend="onnxruntime").predict(imgs)
    expected["bundle_labels"] = res.labels
    expected["bundle_exit_stage"] = res.exit_stage
    expected["bundle_scores"] = res.scores
    np.savez(out_dir / "expected.npz", **expected)
    for p in sorted(out_dir.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(out_dir)}: {p.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
