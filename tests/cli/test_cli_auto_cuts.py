"""``gates fit --cut auto:K``, the near-chance stop (``gates fit``, ``export --data``) on a
small trained backbone and real Fashion-MNIST images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dgconvert as dg
from dgconvert.cli import main

DATA = "fashion-mnist:train[:1000]"
ARCH = "dgconvert.zoo:resnet"
KWARGS = {"widths": [8, 16, 24, 32]}
# pixels scaled to [0, 1] but not standardized as in training (mean 0.286, std 0.353): the
# tiny backbone scores about 10 % on them
WRONG = {"scale": 255.0, "mean": [0.0], "std": [1.0]}

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def test_gates_fit_auto_cuts(tiny_backbone: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.pt"
    code, text = _run("gates", "fit", str(tiny_backbone), "--data", DATA, "-o", str(out),
                      "--cut", "auto:2", "--epochs", "1")  # fmt: skip
    assert code == 0, text
    net = dg.load(out)
    assert net.num_gates == 2 and "cut points:" in text
    assert all(c in text for c in net.cuts)
    assert [g.layout for g in net.gates] == ["nchw", "nchw"]
    code, text = _run("gates", "fit", str(tiny_backbone), "--data", DATA, "-o",
                      str(tmp_path / "other.pt"), "--cut", "auto:x")  # fmt: skip
    assert code != 0 and "auto:K" in text


def test_near_chance_backbone_stops_fit_and_export(tiny_backbone: Path, tmp_path: Path) -> None:
    sd = tmp_path / "sd.pt"
    torch.save(torch.load(tiny_backbone, weights_only=True)["state_dict"], sd)
    out = tmp_path / "g.pt"
    args = ["gates", "fit", str(sd), "--data", DATA, "-o", str(out), "--epochs", "1",
            "--arch", ARCH, "--arch-kwargs", json.dumps(KWARGS)]  # fmt: skip
    code, text = _run(*args, "--normalization", json.dumps(WRONG))
    assert code != 0 and not out.exists()
    assert "scores" in text and "chance" in text and "--normalization" in text
    assert "--allow-near-chance" in text
    code, text = _run(*args, "--normalization", json.dumps(WRONG), "--allow-near-chance")
    assert code == 0, text
    # export with labelled --data measures the same and stops before writing anything
    bundle = tmp_path / "m.dg"
    code, text = _run("export", str(out), "-o", str(bundle), "--data", "fashion-mnist:test[:200]")
    assert code != 0 and "chance" in text and not bundle.exists()
