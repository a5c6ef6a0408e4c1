"""``dgconvert gates fit`` end to end on a small Fashion-MNIST slice; safe loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dgconvert as dg
from dgconvert.cli import main
from tests.models import NORMALIZATION

FMNIST = Path(os.environ.get("DGCONVERT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
DATA = "fashion-mnist:train[:1500]"
ARCH = "dgconvert.zoo:resnet"
KWARGS = {"widths": [8, 16, 24, 32]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone(tiny_backbone: Path) -> Path:
    return tiny_backbone  # conftest: trained once per session


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def test_gates_fit_end_to_end(backbone: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "gated.pt", tmp_path / "fit.json"
    code, text = _run("gates", "fit", str(backbone), "--data", DATA, "-o", str(out),
                      "--gate", "dgate", "--epochs", "3", "--holdout", "0.2", "--json", str(report))  # fmt: skip
    assert code == 0, text
    assert "gate 2 after layer3 (dgate, score margin" in text and "held-out samples: 300" in text
    assert f"wrote {out}" in text
    net = dg.load(out)  # weights-only load
    assert [g.gate_type for g in net.gates] == ["dgate"] * 3
    assert net.meta["cuts"] == ["layer1", "layer2", "layer3"]
    fit = json.loads(report.read_text())
    assert net.thresholds == pytest.approx([g["threshold"] for g in fit["gates"]])
    assert net.meta["fit"]["options"]["train_samples"] == 1200
    with torch.no_grad():
        labels, stages = net.gated_forward(torch.randn(4, 1, 28, 28))
    assert labels.shape == (4,) and stages.shape == (4,)
    # an existing output is not overwritten without --force
    code, text = _run("gates", "fit", str(backbone), "--data", DATA, "-o", str(out))
    assert code != 0 and "--force" in text


def test_gates_fit_paper_setting_and_state_dict(backbone: Path, tmp_path: Path) -> None:
    sd = tmp_path / "sd.pt"
    torch.save(torch.load(backbone, weights_only=True)["state_dict"], sd)
    out = tmp_path / "paper.pt"
    code, text = _run("gates", "fit", str(sd), "--data", DATA, "-o", str(out), "--paper", "--epochs", "2")
    assert code != 0 and "plain state_dict" in text and "--arch" in text  # arch is needed
    norm = {"scale": 255.0, "mean": [0.286], "std": [0.353]}
    code, text = _run("gates", "fit", str(sd), "--data", DATA, "-o", str(out), "--paper",
                      "--epochs", "2", "--arch", ARCH, "--arch-kwargs", json.dumps(KWARGS),
                      "--normalization", json.dumps(norm))  # fmt: skip
    assert code == 0, text
    net = dg.load(out)
    assert [(g.gate_type, g.score_kind) for g in net.gates] == [("dgate", "max")] * 3
    opts = net.meta["fit"]["options"]
    assert opts["hinge"] == "ovr" and opts["standardize"] is False
    assert net.normalization == norm
    assert dg.load_backbone(out)[1]["arch"] == {"factory": ARCH, "kwargs": KWARGS}


def test_pickles_are_refused_without_the_flag(backbone: Path, tmp_path: Path) -> None:
    model, _ = dg.load_backbone(backbone)
    pickled = tmp_path / "whole.pt"
    torch.save(model, pickled)
    out = tmp_path / "g.pt"
    code, text = _run("gates", "fit", str(pickled), "--data", DATA, "-o", str(out))
    assert code != 0 and not out.exists()
    assert "pickled Python objects" in text and "refused" in text and "--trust-pickle" in text
    # a whole pickle records no input normalization: pass the training's (else the
    # near-chance check stops the fit, as it should)
    code, text = _run("gates", "fit", str(pickled), "--data", DATA, "-o", str(out), "--trust-pickle",
                      "--arch", ARCH, "--arch-kwargs", json.dumps(KWARGS), "--epochs", "1",
                      "--gate", "softmax", "--normalization", json.dumps(NORMALIZATION))  # fmt: skip
    assert code == 0, text
    assert [g.gate_type for g in dg.load(out).gates] == ["softmax"] * 3


def test_bad_options_say_how_to_fix(backbone: Path, tmp_path: Path) -> None:
    code, text = _run("gates", "fit", str(backbone), "--data", DATA, "-o", str(tmp_path / "x.pt"), "--joint")
    assert code != 0 and "Fix: drop --joint or use --gate confidence" in text
    code, text = _run("gates", "fit", str(backbone), "--data", DATA, "-o", str(tmp_path / "x.pt"),
                      "--cut", "layer1,nope")  # fmt: skip
    assert code != 0 and "'nope'" in text and "not modules" in text


def test_train_reference_writes_a_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
    monkeypatch.setenv("DGCONVERT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ref.pt"
    code, text = _run("train-reference", "-o", str(out), "--epochs", "1", "--threads", "1",
                      "--data", "fashion-mnist:train[:256]", "--test-data", "fashion-mnist:test[:100]")  # fmt: skip
    assert code == 0, text
    assert f"backbone: {out} (test accuracy" in text
    model, info = dg.load_backbone(out)  # the recipe's checkpoint format, loaded safely
    assert info["arch"]["factory"] == "dgconvert.zoo:resnet" and info["input"]["shape"] == [1, 28, 28]
    cached = list((tmp_path / "cache").glob("backbone-resnet-*.pt"))
    assert len(cached) == 1 and cached[0].read_bytes() == out.read_bytes()  # -o copies the cache


def test_help_and_default_gate() -> None:
    from dgconvert.cli.gates import fit_cmd
    from dgconvert.gating.fit import DEFAULT_GATE, DEFAULT_HINGE

    code, text = _run("gates", "fit", "--help")
    assert code == 0 and "--trust-pickle" in text and "--holdout" in text
    defaults = {p.name: p.default for p in fit_cmd.params}
    # the CLI (torch-free at import) mirrors the library's defaults
    assert (defaults["gate"], defaults["hinge"]) == (DEFAULT_GATE, DEFAULT_HINGE)
    code, text = _run("train-reference", "--help")
    assert code == 0 and "--epochs" in text
