"""The ``plain`` family: a classifier without exits, saved, loaded and exported whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dgconvert as dg
from dgconvert.gating.families import family
from dgconvert.runtime import GatedRunner

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = {"factory": "dgconvert.zoo:resnet", "kwargs": {"widths": [4, 4, 8, 8]}}


def test_plain_classifier_round_trips_and_exports_as_one_stage(tmp_path: Path) -> None:
    fam = family("plain")
    torch.manual_seed(0)
    net = fam.build(fam.Config(arch=ARCH, input_shape=[1, 28, 28]))
    x = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    back = dg.load(dg.save(net, tmp_path / "plain.pt"))
    assert back.family == "plain" and back.num_classes == 10
    with torch.no_grad():
        logits = net(x).numpy()
        np.testing.assert_array_equal(back(x).numpy(), logits)
    bundle = dg.export(back, tmp_path / "plain.dg", verify_input=x)  # verified sample by sample
    assert bundle.num_stages == 1 and bundle.num_gates == 0
    res = GatedRunner(bundle, backend="onnxruntime").predict(x.numpy())
    assert (res.exit_stage == 0).all()
    assert (res.labels == logits.argmax(1)).mean() >= 0.95  # label ties may differ
