"""Multi-exit models trained elsewhere (SDN-style ResNet, EENets-style CNN) exported as they
are, through the API and the CLI: verified, and the runtime equal to the models' own exit
rule sample by sample at batch 1, 7 and 200, with samples exiting at every exit."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dgconvert as dg
from dgconvert.cli import main
from dgconvert.convert.verify import own_exit_rule, verify_bundle
from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import ExportVerificationError
from dgconvert.core.preprocess import normalize
from dgconvert.gating import GatedNetwork
from dgconvert.runtime import GatedRunner
from tests import multi_exit_models as mm
from tests.models import NORMALIZATION

MODELS: dict[str, tuple[Callable[..., torch.nn.Module], str, list[str], str]] = {
    "sdn": (mm.sdn_resnet, "tests.multi_exit_models:sdn_resnet", ["exit1", "exit2"],
            "max-softmax"),
    "eenet": (mm.eenet, "tests.multi_exit_models:eenet", ["exit1", "exit2", "exit3"],
              "confidence"),
}


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread: None) -> Iterator[None]:
    yield


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (200, 1, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, pixels: np.ndarray) -> dict[str, Any]:
    """Both models converted with from_multi_exit and exported (verified) once."""
    root = tmp_path_factory.mktemp("multi")
    x = torch.from_numpy(normalize(pixels, NORMALIZATION))
    out = {}
    for name, (make, factory, exits, score) in MODELS.items():
        net = GatedNetwork.from_multi_exit(make(), exits, score, x[:4],
                                           normalization=NORMALIZATION,
                                           arch={"factory": factory, "kwargs": {}}).eval()
        reports: list[Any] = []
        bundle = dg.export(net, root / f"{name}.dg", verify_input=x, on_report=reports.append)
        out[name] = (net, bundle, reports[0])
    out["x"] = x
    return out


def _thresholds(scores: np.ndarray, kind: str, rng: np.random.Generator) -> list[float]:
    k = scores.shape[1]
    if kind == "spread":  # gate j lets through the top 1/(k+1-j) of the samples still there
        return [float(np.quantile(scores[:, j], 1 - 1 / (k + 1 - j))) for j in range(k)]
    if kind == "random":
        return [float(np.quantile(scores[:, j], rng.uniform(0.1, 0.9))) for j in range(k)]
    return [float("-inf")] * k if kind == "all-first" else [float("inf")] * k


@pytest.mark.parametrize("name", list(MODELS))
def test_export_verified_and_manifest_says_what_the_gates_are(exported: dict, name: str) -> None:
    net, bundle, report = exported[name]
    _, _, exits, score = MODELS[name]
    assert not report.mismatches and report.checks > 0
    m = bundle.manifest
    gates = [s.gate for s in m.stages[:-1]]
    assert [g.type for g in gates] == ["exit-head"] * len(exits)
    assert [g.score for g in gates] == [score] * len(exits)
    assert [g.extra["exit"] for g in gates] == exits
    assert m.stages[-1].gate is None
    assert m.source["multi_exit"] == {"model": type(net.backbone).__name__, "exits": exits,
                                      "score": score}


@pytest.mark.parametrize("kind", ["spread", "random", "all-first", "none"])
@pytest.mark.parametrize("batch", [1, 7, 200])
@pytest.mark.parametrize("name", list(MODELS))
def test_runtime_equals_the_models_own_exit_rule(exported: dict, name: str, batch: int,
                                                 kind: str) -> None:
    net, bundle, _ = exported[name]
    x = exported["x"]
    with torch.no_grad():
        scores = net.all_exits(x).scores.numpy()
    t = _thresholds(scores, kind, np.random.default_rng(batch))
    labels, stage, near = own_exit_rule(net, x, t, 1e-5)
    assert near.mean() <= 0.1  # the comparison is not vacuous
    if kind == "spread":  # samples exit at every exit
        assert (np.bincount(stage, minlength=net.num_gates + 1) > 0).all()
    runner = GatedRunner(bundle, backend="onnxruntime", thresholds=t, max_batch=batch)
    res = runner.predict(x.numpy())  # in chunks of `batch`
    np.testing.assert_array_equal(res.exit_stage[~near], stage[~near])
    np.testing.assert_array_equal(res.labels[~near], labels[~near])
    one = GatedRunner(bundle, backend="onnxruntime", thresholds=t).predict(x[:batch].numpy())
    ok = ~near[:batch]
    np.testing.assert_array_equal(one.exit_stage[ok], stage[:batch][ok])
    np.testing.assert_array_equal(one.labels[ok], labels[:batch][ok])


def test_verification_catches_a_different_exit_rule(exported: dict) -> None:
    _, bundle, _ = exported["sdn"]
    make, _, exits, _ = MODELS["sdn"]
    net = GatedNetwork.from_multi_exit(make(), exits, "max-softmax", exported["x"][:4])
    net.config.score = "margin-logits"  # the model's rule is not what was fused
    with pytest.raises(ExportVerificationError, match=r"own exits .*'margin-logits' rule"):
        verify_bundle(net, bundle, exported["x"][:64])


def _labelled(tmp_path: Path, model: torch.nn.Module, pixels: np.ndarray) -> Path:
    """A labelled .npz whose labels are the model's own final predictions."""
    x = torch.from_numpy(normalize(pixels, NORMALIZATION))
    with torch.no_grad():
        final = model(x)[-1]
    y = (final[0] if isinstance(final, tuple) else final).argmax(1).numpy()
    path = tmp_path / "data.npz"
    np.savez(path, x=pixels, y=y)
    return path


def test_cli_state_dict_with_arch_then_calibrate_and_predict(tmp_path: Path,
                                                             pixels: np.ndarray) -> None:
    model = mm.eenet(seed=1)
    torch.save(model.state_dict(), tmp_path / "eenet.pt")
    data = _labelled(tmp_path, model, pixels)
    bundle_path = tmp_path / "eenet.dg"
    res = CliRunner().invoke(main, [
        "export", str(tmp_path / "eenet.pt"), "-o", str(bundle_path),
        "--exits", "exit1,exit2,exit3", "--score", "confidence",
        "--arch", "tests.multi_exit_models:eenet", "--arch-kwargs", '{"seed": 1}',
        "--normalization", json.dumps(NORMALIZATION), "--data", str(data),
        "--verify-samples", "64",
    ])
    assert res.exit_code == 0, res.output
    assert "verified" in res.output and "4 stages, 3 gates" in res.output
    bundle = Bundle.load(bundle_path)
    assert bundle.manifest.input.shape == [None, 1, 28, 28]
    assert [s.gate.score for s in bundle.manifest.stages[:-1]] == ["confidence"] * 3
    res = CliRunner().invoke(main, ["calibrate", str(bundle_path), "--data", str(data),
                                    "--max-drop", "5", "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    t = Bundle.load(bundle_path).thresholds
    res = CliRunner().invoke(main, ["predict", str(bundle_path), "--data", str(data),
                                    "--backend", "onnxruntime", "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    # the calibrated bundle still follows the model's own rule, sample by sample
    x = torch.from_numpy(normalize(pixels, NORMALIZATION))
    net = GatedNetwork.from_multi_exit(model, ["exit1", "exit2", "exit3"], "confidence", x[:4])
    labels, stage, near = own_exit_rule(net, x, list(t), 1e-4)
    got = GatedRunner(bundle_path, backend="onnxruntime").predict(x.numpy())
    np.testing.assert_array_equal(got.exit_stage[~near], stage[~near])
    np.testing.assert_array_equal(got.labels[~near], labels[~near])


def test_cli_whole_pickle_needs_trust(tmp_path: Path, pixels: np.ndarray) -> None:
    model = mm.sdn_resnet(seed=2)
    path = tmp_path / "sdn.pt"
    torch.save(model, path)
    args = ["export", str(path), "--exits", "exit1,exit2", "--input-shape", "1,28,28",
            "--verify-samples", "32"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "--trust-pickle" in res.output
    res = CliRunner().invoke(main, [*args, "--trust-pickle"])
    assert res.exit_code == 0, res.output
    bundle = Bundle.load(tmp_path / "sdn.dg")
    assert [s.gate.extra["exit"] for s in bundle.manifest.stages[:-1]] == ["exit1", "exit2"]
    assert bundle.manifest.stages[0].gate.score == "max-softmax"  # the default rule


def test_cli_errors(tmp_path: Path) -> None:
    torch.save(mm.sdn_resnet().state_dict(), tmp_path / "sd.pt")
    res = CliRunner().invoke(main, ["export", str(tmp_path / "sd.pt"), "--score", "neg-entropy"])
    assert res.exit_code != 0 and "--score only apply to a multi-exit model" in res.output
    res = CliRunner().invoke(main, ["export", str(tmp_path / "sd.pt"), "--exits", "exit1"])
    assert res.exit_code != 0 and "--arch module:callable" in res.output
    base = ["export", str(tmp_path / "sd.pt"), "--arch", "tests.multi_exit_models:sdn_resnet"]
    res = CliRunner().invoke(main, [*base, "--exits", "exit1"])
    assert res.exit_code != 0 and "--input-shape C,H,W" in res.output
    res = CliRunner().invoke(main, [*base, "--exits", "exit2,exit1", "--input-shape", "1,28,28"])
    assert res.exit_code != 0 and "out of execution order" in res.output
    assert "Traceback" not in res.output
