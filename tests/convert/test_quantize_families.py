"""``dgconvert quantize`` on every bundle family, not only cut backbones: a multi-exit model
(SDN-style exits, :mod:`tests.multi_exit_models`) and a GaterNet (one stage, no gates) are
quantized; the int8 bundle loads, says int8, and its labels agree with the fp32 bundle's.

Random weights give near-zero logit margins (on noise images every label is the same), so the
models' classifiers are centred and the images are Fashion-MNIST: labels vary, and agreement
is a check that can fail. The quantizer's own bounds are loosened for these tiny models; the
runner's agreement bound below is the test's claim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dgconvert as dg
from dgconvert.convert.quantize import (
    Bounds,
    QuantizeSettings,
    quantize_bundle,
    quantized_stages,
    weights_for_cpu,
)
from dgconvert.core.bundle import Bundle
from dgconvert.core.preprocess import normalize
from dgconvert.data import load_dataset
from dgconvert.gating import GatedNetwork
from dgconvert.runtime import GatedRunner
from tests import multi_exit_models as mm
from tests.gating.test_gaternet import tiny
from tests.models import NORMALIZATION

pytestmark = pytest.mark.usefixtures("one_thread")
#: share of images whose int8 label equals the fp32 label; these untrained tiny models are
#: fragile under int8 (the random GaterNet agrees on 88 % of 512 test images on an Intel Xeon
#: with VNNI, 84 % of 128 with uint8 weights on an AVX2 EPYC, 17 % there with int8 weights:
#: saturated), so the bound catches a broken quantization, not noise
AGREE = 0.80
LOOSE = Bounds(stage_agreement=0.8, full_agreement=0.8, score_correlation=0.95)


def _pixels(n: int, start: int = 0) -> np.ndarray:
    return load_dataset(f"fashion-mnist:train[{start}:{start + n}]").images


@pytest.fixture(autouse=True)
def _needs_fashion(fashion_available: bool) -> None:
    if not fashion_available:
        pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")


def _center_classifiers(net: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Subtract each 10-class head's mean logits on ``x`` from its bias: random weights
    otherwise give every image the same label, and label agreement would prove nothing."""
    heads = [m for name, m in net.named_modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == 10 and "gater" not in name]
    means: dict[int, torch.Tensor] = {}
    hooks = [h.register_forward_hook(lambda m, _i, out: means.__setitem__(id(m), out.mean(0)))
             for h in heads]
    with torch.no_grad():
        net(x)
        for h in heads:
            h.bias -= means[id(h)]
    for hook in hooks:
        hook.remove()
    return net


def _multi_exit(root: Path) -> Bundle:
    x = torch.from_numpy(normalize(_pixels(32), NORMALIZATION))
    net = GatedNetwork.from_multi_exit(
        _center_classifiers(mm.sdn_resnet(), x), ["exit1", "exit2"], "max-softmax", x[:4],
        normalization=NORMALIZATION,
        arch={"factory": "tests.multi_exit_models:sdn_resnet", "kwargs": {}}).eval()
    return dg.export(net, root / "sdn.dg", verify_input=x)


def _gaternet(root: Path) -> Bundle:
    calib = _pixels(48)
    verify = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    net = _center_classifiers(tiny(), torch.from_numpy(normalize(calib, NORMALIZATION)))
    return dg.export(net, root / "gn.dg", verify_input=verify, prune_images=calib,
                     prune_source="calib", exporter="dynamo", prune_multiple=1)


@pytest.mark.parametrize("family", ["multi-exit", "gaternet"])
def test_quantize_every_family(family: str, tmp_path: Path) -> None:
    src = (_multi_exit if family == "multi-exit" else _gaternet)(tmp_path)
    px = _pixels(96, 64)
    q, report = quantize_bundle(src, tmp_path / "int8.dg", px, data="fashion-mnist:train[64:160]",
                                settings=QuantizeSettings(calibration_images=48), bounds=LOOSE)
    q = Bundle.load(q.path)  # loads from disk on its own
    assert q.manifest.precision == "int8" and src.manifest.precision == "fp32"
    assert q.manifest.quantization is not None and q.num_stages == src.num_stages
    assert q.manifest.quantization.settings["weights"] == weights_for_cpu()
    assert q.num_gates == src.num_gates and quantized_stages(q) == list(range(q.num_stages))
    assert len(report.stage_agreement) == src.num_gates + 1
    test = load_dataset("fashion-mnist:test[:128]").images
    t: list[float] = []  # a GaterNet has no gates
    if src.num_gates:  # thresholds at the fp32 scores' median: samples exit at every gate
        with GatedRunner(src, backend="onnxruntime") as r32:
            rec = r32.collect(test)
        t = [float(np.median(rec.scores[:, k])) for k in range(src.num_gates)]
    with GatedRunner(src, backend="onnxruntime", thresholds=t) as r32, \
            GatedRunner(q, backend="onnxruntime", thresholds=t) as r8:
        want, got = r32.predict(test), r8.predict(test)
    assert len(set(want.exit_stage.tolist())) == src.num_gates + 1
    assert len(set(want.labels.tolist())) >= 4  # the labels vary: agreement can fail
    agree = float(np.mean(got.labels == want.labels))
    assert agree >= AGREE, f"{family}: int8 labels agree with fp32 on {100 * agree:.1f} %"
