"""`dgconvert calibrate` end to end on a small exported bundle: write-back, cache, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dgconvert as dg
from dgconvert.calibrate import CalibrationError
from dgconvert.calibrate.workflow import calibrate_bundle
from dgconvert.cli import main
from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import InputError
from dgconvert.data import DataError
from dgconvert.runtime import GatedRunner
from tests.models import build


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cal")
    net = build("densenet", gate="softmax")
    return dg.export(net, root / "m.dg").path


@pytest.fixture()
def data(tmp_path: Path) -> str:
    """A labelled .npz whose labels follow the (random) model's own final prediction on
    most samples, so accuracy targets are meaningful."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (600, 1, 28, 28), dtype=np.uint8)
    return _with_labels(tmp_path, x, rng)


def _with_labels(tmp_path: Path, x: np.ndarray, rng: np.random.Generator) -> str:
    b = Bundle.load(_with_labels.bundle)  # type: ignore[attr-defined]
    pred = GatedRunner(b, backend="onnxruntime", thresholds=[np.inf] * b.num_gates).predict(x).labels
    y = np.where(rng.random(len(x)) < 0.8, pred, rng.integers(0, 10, len(x)))
    path = tmp_path / "cal.npz"
    np.savez(path, x=x, y=y.astype(np.int64))
    return str(path)


@pytest.fixture(autouse=True)
def _point_at_bundle(bundle_path: Path) -> None:
    _with_labels.bundle = bundle_path  # type: ignore[attr-defined]


def test_calibrate_writes_thresholds_and_runtime_uses_them(tmp_path: Path, bundle_path: Path, data: str) -> None:
    work = tmp_path / "b.dg"
    import shutil

    shutil.copytree(bundle_path, work)
    before = Bundle.load(work).thresholds
    out = calibrate_bundle(work, data, max_drop=2.0, backend="onnxruntime")
    b = Bundle.load(work)
    assert b.thresholds == pytest.approx(out.result.thresholds)
    assert b.thresholds != before
    cal = b.manifest.calibration
    assert cal["data_hash"] and cal["method"] and cal["target_accuracy"] == pytest.approx(
        out.result.full_accuracy - 0.02
    )
    assert out.result.accuracy >= out.result.target_accuracy
    assert not out.record["records_cached"]
    # the runtime's default thresholds are the calibrated ones
    assert GatedRunner(work, backend="onnxruntime").thresholds == pytest.approx(
        np.float32(out.result.thresholds).tolist()
    )
    # re-calibrating for another target reuses the collected scores
    again = calibrate_bundle(work, data, max_drop=5.0, backend="onnxruntime", write=False)
    assert again.record["records_cached"]
    assert again.result.cost_fraction <= out.result.cost_fraction
    assert Bundle.load(work).thresholds == b.thresholds  # write=False leaves it alone


def test_cli_json_plot_and_dry_run(tmp_path: Path, bundle_path: Path, data: str) -> None:
    manifest = (bundle_path / "manifest.json").read_text()
    res = CliRunner().invoke(
        main,
        ["calibrate", str(bundle_path), "--data", data, "--max-drop", "1", "--dry-run",
         "--backend", "onnxruntime", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "f.png")],
    )
    assert res.exit_code == 0, res.output
    assert "| Model |" in res.output and "dry run" in res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    for key in ("thresholds", "target_accuracy", "accuracy", "full_accuracy", "heldout_accuracy",
                "cost_fraction", "exit_fractions", "method"):
        assert key in rep
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (bundle_path / "manifest.json").read_text() == manifest


def test_unreachable_target(bundle_path: Path, data: str) -> None:
    with pytest.raises(CalibrationError, match="full model"):
        calibrate_bundle(bundle_path, data, target_acc=99.99, backend="onnxruntime", write=False)


def test_labels_outside_the_classes(tmp_path: Path, bundle_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 1, 28, 28), np.uint8), y=np.array([0, 1, 12, 3]))
    with pytest.raises(DataError, match="12"):
        calibrate_bundle(bundle_path, str(path), max_drop=1, backend="onnxruntime", write=False)


def test_data_that_does_not_fit_the_bundle(tmp_path: Path, bundle_path: Path) -> None:
    path = tmp_path / "rgb.npz"
    np.savez(path, x=np.zeros((4, 3, 32, 32), np.uint8), y=np.array([0, 1, 2, 3]))
    with pytest.raises(InputError, match=r"expected \[N, 1, 28, 28\]"):
        calibrate_bundle(bundle_path, str(path), max_drop=1, backend="onnxruntime", write=False)


def test_cli_needs_exactly_one_target(bundle_path: Path, data: str) -> None:
    res = CliRunner().invoke(main, ["calibrate", str(bundle_path), "--data", data])
    assert res.exit_code != 0 and "exactly one of --target-acc" in res.output


def test_measure_adds_timed_columns(bundle_path: Path, data: str) -> None:
    out = calibrate_bundle(bundle_path, data, max_drop=2.0, backend="onnxruntime", write=False,
                           measure=True, batch_size=32, threads=1)
    ms = out.record["measured_ms_per_image"]
    assert set(ms) == {"full", "ours", "sequential", "shared"}
    assert all(v > 0 for v in ms.values())
    header = next(line for line in out.table.splitlines() if line.startswith("| Model"))
    assert "ms/image" in header and "Speed-up" in header
